"""Pause tokens: inserted in pretraining at the configured rate and never scored, appended after
instruction prompts (masked; the answer's first token is predicted from the last pause) and at
inference before the answer; a run trains with them."""

import numpy as np
import pytest

from llm.config import PAUSE
from llm.data import sources
from llm.data.instructions import InstructionSource
from llm.data.tokenizers import ByteTokenizer
from llm.registry import ConfigError
from llm.train.loop import train
from tests.test_train import tiny_cfg

BYTE_PAUSE = {"data.tokenizer.kind": "byte", "data.tokenizer.special_tokens": (PAUSE,)}


def test_pretraining_inserts_pauses_at_the_rate_and_never_scores_them():
    cfg = tiny_cfg(**BYTE_PAUSE, **{"data.pause.rate": 0.2})
    tok = ByteTokenizer((PAUSE,))
    pid = tok.special_id(PAUSE)
    train_w, eval_w = sources.source_for(cfg.data).windows(tok)
    toks = np.concatenate([train_w[i]["tokens"] for i in range(len(train_w))])
    frac = np.mean(toks == pid)
    assert 0.15 < frac < 0.19  # rate/(1+rate) = 0.167 of the stream
    for i in range(len(train_w)):
        e = train_w[i]
        assert not np.any(e["loss_mask"][e["targets"] == pid])
        assert np.any(
            e["loss_mask"][(e["tokens"] == pid) & (e["targets"] != pid)]
        )  # a pause's output is scored
    # removing the pauses gives back the text; the held-out split has none
    text_ids = train_w.ids[train_w.ids != pid]
    again, _ = sources.source_for(cfg.data).windows(tok)
    assert np.array_equal(again.ids, train_w.ids)  # seeded: the same stream
    assert not np.any(eval_w.ids == pid) and len(text_ids) < len(train_w.ids)


def test_instruction_prompts_end_with_k_pauses_that_carry_no_loss():
    cfg = tiny_cfg(**BYTE_PAUSE, **{"data.kind": "instructions", "data.corpus": "builtin:instruction-data.json",
                                    "data.seq_len": 320, "model.max_seq_len": 320, "data.pause.k": 3,
                                    "data.instructions.prompt_loss": True})  # fmt: skip
    tok = ByteTokenizer((PAUSE,))
    pid = tok.special_id(PAUSE)
    ex = InstructionSource(cfg.data).examples(tok, "train")
    prompt, response = ex.encoded[0]
    assert prompt[-3:] == [pid] * 3 and pid not in prompt[:-3]
    e = ex[0]
    n = len(prompt)
    assert e["targets"][n - 1] == response[0] and e["loss_mask"][n - 1] == 1  # predicted at the last pause
    assert not np.any(e["loss_mask"][e["targets"] == pid])  # pauses unscored even with prompt_loss


def test_inference_appends_the_pauses(monkeypatch):
    from llm.infer import generation

    seen = {}

    def fake(model, params, prompts, max_new_tokens, **kw):
        seen["prompts"] = prompts
        return [[65] for _ in prompts]

    monkeypatch.setattr(generation, "generate_ids", fake)
    tok = ByteTokenizer((PAUSE,))

    class M:
        class cfg:
            max_seq_len = 64

    out = generation.generate(M(), None, tok, ["hi", "yo"], max_new_tokens=4, pause_tokens=2)
    assert out == ["A", "A"] and all(p[-2:] == [tok.special_id(PAUSE)] * 2 for p in seen["prompts"])
    assert seen["prompts"][0][:2] == list(b"hi")


def test_pauses_need_the_special_token_and_a_run_trains_with_them(tmp_path):
    with pytest.raises(ConfigError, match="special_tokens"):
        tiny_cfg(**{"data.pause.rate": 0.1})
    result = train(tiny_cfg(**BYTE_PAUSE, **{"data.pause.rate": 0.1, "train.steps": 4}), str(tmp_path / "w"))
    assert np.isfinite(result["eval_loss"])
