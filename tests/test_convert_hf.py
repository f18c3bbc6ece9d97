"""Hugging Face import/export against `transformers` itself (torch, CPU, fp32): tiny random models
built here, saved with save_pretrained, imported, compared logit by logit and token by token,
exported back and loaded by `transformers`. Shapes are chosen to catch layout bugs: head counts
that are not powers of two, GQA with a group of 2, vocab sizes that are not multiples of 64,
untied heads, a sliding window shorter than the sequence, Llama-3.1 rope scaling."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llm import convert  # noqa: E402
from llm.api import load  # noqa: E402
from llm.infer.engine import Sampling  # noqa: E402
from llm.infer.generation import generate_ids  # noqa: E402
from llm.registry import ConfigError  # noqa: E402

T = 14


def _hf_models():
    llama = dict(hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=3, vocab_size=301, max_position_embeddings=64, rms_norm_eps=1e-6,
                 tie_word_embeddings=False)  # fmt: skip
    return {
        "gpt2": (
            transformers.GPT2LMHeadModel,
            transformers.GPT2Config(
                n_embd=30,
                n_layer=2,
                n_head=3,
                n_positions=64,
                vocab_size=50257,
                resid_pdrop=0,
                embd_pdrop=0,
                attn_pdrop=0,
            ),
            "gpt2",
        ),  # fmt: skip
        "llama3": (
            transformers.LlamaForCausalLM,
            transformers.LlamaConfig(
                **llama,
                rope_theta=500000.0,
                rope_scaling=dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=16,
                ),
            ),
            "byte",
        ),  # fmt: skip
        "mistral": (
            transformers.MistralForCausalLM,
            transformers.MistralConfig(**llama, sliding_window=5),
            "byte",
        ),
        "mixtral": (
            transformers.MixtralForCausalLM,
            transformers.MixtralConfig(
                **llama, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
            ),
            "byte",
        ),  # fmt: skip
    }


def _make(name, tmp_path):
    cls, cfg, tok = _hf_models()[name]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger than the 0.02 init, so attention and routing are not uniform
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    d = tmp_path / f"hf_{name}"
    model.save_pretrained(str(d))
    return model, str(d), tok


def _ours_logits(run, tokens):
    return np.asarray(run.model.apply({"params": run.params}, jnp.asarray(tokens)))


@pytest.mark.parametrize("name", ["gpt2", "llama3", "mistral", "mixtral"])
def test_import_matches_transformers_logits_generation_and_export_round_trips(name, tmp_path):
    hf, hf_dir, tok = _make(name, tmp_path)
    work = str(tmp_path / "run")
    convert.import_hf(hf_dir, work, tokenizer=tok, progress=False)
    run = load(work)
    tokens = np.random.default_rng(0).integers(0, min(hf.config.vocab_size, 258), (2, T))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours = _ours_logits(run, tokens)
    assert np.max(np.abs(ours - ref)) <= 1e-4, np.max(np.abs(ours - ref))
    # greedy generation of 20 tokens: the same ids as transformers' generate
    prompt = tokens[0, :5].tolist()
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                           pad_token_id=0)[0, 5:].tolist()  # fmt: skip
    got = generate_ids(run.model, run.params, [prompt], 20, sampling=Sampling(temperature=0.0))[0]
    assert got == want
    # export: transformers loads it and gives the same logits
    out = str(tmp_path / "exported")
    convert.export_hf(work, out, progress=False)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(tokens)).logits.numpy(), ref, atol=1e-5, rtol=0)
    # import -> export -> import changes no parameter bit
    work2 = str(tmp_path / "run2")
    convert.import_hf(out, work2, tokenizer=tok, progress=False)
    again = load(work2)
    same = jax.tree.map(
        lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), run.params, again.params
    )
    assert all(jax.tree.leaves(same))


def test_sharded_export_writes_an_index_transformers_reads(tmp_path):
    hf, hf_dir, tok = _make("llama3", tmp_path)
    work = str(tmp_path / "run")
    convert.import_hf(hf_dir, work, tokenizer=tok, progress=False)
    out = str(tmp_path / "sharded")
    files = convert.export_hf(work, out, shard_gb=20_000 / 2**30, progress=False)  # ~20 kB shards
    assert len(files) > 3 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.tensor([[1, 2, 3, 250]])
    with torch.no_grad():
        np.testing.assert_allclose(back(tokens).logits.numpy(), hf(tokens).logits.numpy(), atol=1e-5, rtol=0)
    # and our reader takes the sharded directory too
    convert.import_hf(out, str(tmp_path / "run2"), tokenizer=tok, progress=False)


def test_unsupported_config_fields_are_named(tmp_path):
    hf, hf_dir, tok = _make("llama3", tmp_path)
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    for key, value, msg in (("attention_bias", True, "attention_bias"), ("hidden_act", "gelu", "hidden_act"),
                            ("qk_layernorm", True, "qk_layernorm")):  # fmt: skip
        json.dump({**cfg, key: value}, open(os.path.join(hf_dir, "config.json"), "w"))
        with pytest.raises(ConfigError, match=msg):
            convert.import_hf(hf_dir, str(tmp_path / f"bad_{key}"), tokenizer=tok, progress=False)


def test_imported_run_refuses_resume_and_the_gpt2_tokenizer_travels(tmp_path):
    hf, hf_dir, tok = _make("gpt2", tmp_path)
    work = str(tmp_path / "run")
    convert.import_hf(hf_dir, work, tokenizer="gpt2", progress=False)
    run = load(work)
    assert run.tokenizer.kind == "gpt2" and run.tokenizer.encode("Hello world") == [15496, 995]
    out = str(tmp_path / "exported")
    convert.export_hf(work, out, progress=False)
    ref = transformers.AutoTokenizer.from_pretrained(out)
    assert ref("Hello world  🤗", add_special_tokens=False)["input_ids"] == run.tokenizer.encode(
        "Hello world  🤗"
    )
    from llm.checkpoint import Checkpointer

    ckpt = Checkpointer(os.path.join(work, "checkpoints"), async_save=False)
    with pytest.raises(ConfigError, match="parameters only"):
        ckpt.restore(0, abstract_state=None)
    assert ckpt.steps() == [0]  # nothing quarantined
