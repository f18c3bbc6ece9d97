"""Instruction tuning: the customary split, response-only loss masks, no gradient from prompt
positions (and gradient from them with prompt_loss on), and an end-to-end run that writes answers."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.data.instructions import InstructionSource, alpaca
from llm.data.tokenizers import ByteTokenizer
from llm.model import Transformer
from llm.train import step
from llm.train.loop import train
from tests.test_train import tiny_cfg

INSTR = {"data.kind": "instructions", "data.corpus": "builtin:instruction-data.json", "data.seq_len": 64}


def _source(**kw):
    return InstructionSource(tiny_cfg(**INSTR, **kw).data)


def test_customary_split_and_template():
    sp = _source().splits()
    assert [len(sp[k]) for k in ("train", "validation", "test")] == [935, 55, 110]
    text = alpaca({"instruction": "Add.", "input": "2 + 2", "output": "4"})
    assert text.endswith("### Input:\n2 + 2\n\n### Response:\n") and "### Instruction:\nAdd." in text
    assert "### Input" not in alpaca({"instruction": "Hi.", "output": "Hello."})


def test_loss_mask_covers_the_response_and_eos_only():
    tok = ByteTokenizer()
    ex = _source().examples(tok, "train")
    prompt, response = tok.encode("P" * 10), tok.encode("abc")
    e = ex.example(prompt, response)
    # targets at input positions 9..12 are 'a','b','c',EOS: exactly those are scored
    assert np.flatnonzero(e["loss_mask"]).tolist() == [9, 10, 11, 12]
    assert e["targets"][12] == tok.eos_id and e["segment_ids"][:13].all() and not e["segment_ids"][13:].any()
    ex.prompt_loss = True
    assert np.flatnonzero(ex.example(prompt, response)["loss_mask"]).tolist() == list(range(13))


@pytest.mark.parametrize("prompt_loss", [False, True])
def test_no_gradient_flows_from_prompt_positions(prompt_loss):
    tok = ByteTokenizer()
    ex = _source(**{"data.instructions.prompt_loss": prompt_loss}).examples(tok, "train")
    batch = {k: jnp.asarray(np.stack([ex[i][k] for i in range(4)])) for k in ex[0]}
    model = Transformer(tiny_cfg(**{"model.vocab_size": 320}).model)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch["tokens"])["params"])
    n = step.scored_tokens(batch)
    grad = lambda b: jax.grad(lambda p: step._loss(p, model, b, jax.random.PRNGKey(0), n, 1.0)[0])(params)  # noqa: E731
    # change every target at a prompt position (scored or not depends on prompt_loss)
    prompt_pos = (batch["loss_mask"] == 0) & (batch["segment_ids"] != 0) if not prompt_loss else None
    if prompt_pos is None:
        prompt_pos = jnp.asarray(np.stack([np.arange(64) < len(ex.encoded[i][0]) - 1 for i in range(4)]))
    changed = {**batch, "targets": jnp.where(prompt_pos, (batch["targets"] + 7) % 256, batch["targets"])}
    g0, g1 = grad(batch), grad(changed)
    same = all(
        bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True)
    )
    assert same != prompt_loss


def test_instruction_run_trains_and_writes_answers(tmp_path):
    from llm.evaluate import format_result, run_suite

    wd = str(tmp_path / "run")
    cfg = tiny_cfg(**{**INSTR, "data.tokenizer.kind": "byte", "model.max_seq_len": 320, "data.seq_len": 320,
                      "train.steps": 6, "train.batch_size": 8})  # fmt: skip
    result = train(cfg, wd)
    assert np.isfinite(result["eval_loss"])
    suite = run_suite(wd, batch_size=32, answer_tokens=8)
    r = suite["instructions"]
    assert r["n_answers"] == 110 and r["test"]["response_tokens"] > 0
    lines = [json.loads(x) for x in open(r["answers_jsonl"], encoding="utf-8")]
    assert len(lines) == 110 and set(lines[0]) == {"instruction", "input", "output", "generated"}
    assert "answers to 110 test instructions" in format_result(suite)
