"""The analytic FLOP count against independent counts (the params tree, XLA), peaks and MFU rows."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import flops
from llm.config import ConfigError
from llm.model import ModelConfig, Transformer
from llm.model.config import AttentionConfig
from llm.model.presets import PRESETS
from llm.train.loop import train
from llm.train.metrics import read_metrics
from llm.train.step import _loss
from tests.test_train import tiny_cfg


def model_cfg(mlp: str, **kw) -> ModelConfig:
    gqa = mlp == "swiglu"
    return ModelConfig(vocab_size=1024, d_model=256, n_layers=2, max_seq_len=256, mlp=mlp, use_bias=False,
                       tie_embeddings=not gqa, attention=AttentionConfig(n_heads=4, n_kv_heads=2 if gqa else 4),
                       **kw)  # fmt: skip


def abstract_params(cfg: ModelConfig, seq_len: int):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
    return nn.meta.unbox(boxed)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_matmul_params_match_the_params_tree(mlp):
    """Count every >=2-d kernel in the real params tree; the LM head is the tied table or lm_head."""
    cfg = model_cfg(mlp, positional="learned" if mlp == "gelu" else "rope")
    leaves = jax.tree_util.tree_leaves_with_path(abstract_params(cfg, 64))
    keys = lambda path: [str(getattr(k, "key", k)) for k in path]  # noqa: E731
    is_kernel = lambda path: keys(path)[-1] == "kernel" and "lm_head" not in keys(path)  # noqa: E731
    kernels = sum(int(np.prod(x.shape)) for p, x in leaves if is_kernel(p))
    head = cfg.d_model * cfg.vocab_size
    if not cfg.tie_embeddings:
        assert sum(int(np.prod(x.shape)) for p, x in leaves if "lm_head" in keys(p)) == head
    assert flops.matmul_params(cfg) == kernels
    assert flops.flops_per_token(cfg, 64) == 6 * (kernels + head) + 12 * cfg.n_layers * 64 * cfg.d_model


@pytest.mark.parametrize("kind,att", [
    ("mla", dict(mla=dict(q_lora_rank=32, kv_lora_rank=48, qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=40))),
    ("mla", dict(mla=dict(q_lora_rank=None))),
    ("differential", {}),
    ("local", dict(local=dict(window=16))),
], ids=["mla-q-lora", "mla", "differential", "local"])  # fmt: skip
def test_attention_kinds_report_their_matmul_weights_and_score_work(kind, att):
    """Each kind's `matmul_params` against the kernels of its real params tree (MLA's up-projection
    `kv_b` is a bare param), and the attention term of the FLOPs by hand."""
    from llm.model.config import LocalConfig, MLAConfig

    a = AttentionConfig(n_heads=4, n_kv_heads=2, kind=kind, local=LocalConfig(**att.get("local", {})),
                        mla=MLAConfig(**att.get("mla", {})))  # fmt: skip
    cfg = ModelConfig(vocab_size=1024, d_model=256, n_layers=2, max_seq_len=256, mlp="gelu", use_bias=False,
                      positional="rope", attention=a)  # fmt: skip
    leaves = jax.tree_util.tree_leaves_with_path(abstract_params(cfg, 64))
    keys = lambda path: [str(getattr(k, "key", k)) for k in path]  # noqa: E731
    weights = sum(int(np.prod(x.shape)) for p, x in leaves
                  if keys(p)[-1] in ("kernel", "kv_b") and "lm_head" not in keys(p))  # fmt: skip
    assert flops.matmul_params(cfg) == weights
    t, n, h = 64, 4, cfg.head_dim
    m = a.mla
    per_layer = {"mla": t * n * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim),
                 "differential": t * n * (h + 2 * h),  # two half-width maps, two weighted sums
                 "local": 16 * n * 2 * h}[kind]  # fmt: skip
    head = cfg.d_model * cfg.vocab_size
    assert flops.flops_per_token(cfg, t) == 6 * (weights + head) + 6 * 2 * per_layer


def test_gpt2_124m_by_hand():
    """12 layers of 12*D^2 matmul weights, a 768x50257 head, attention at T=1024."""
    cfg = ModelConfig(**{**PRESETS["gpt2-124m"], "attention": AttentionConfig(n_heads=12)})
    n, head, attn = 12 * 12 * 768**2, 768 * 50257, 12 * 12 * 1024 * 768
    assert flops.matmul_params(cfg) == n == 84_934_656
    assert flops.flops_per_token(cfg, 1024) == 6 * (n + head) + attn == 854_438_400


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_flops_match_xla_cost_analysis(mlp):
    """XLA's own count for forward+backward; it also counts softmax, norms and activations, which
    add ~1% at this size, so the analytic (matmul-only) count must be within [0.97, 1.0] of it.
    One query block: the formula counts the full causal square (PaLM's convention), which the
    default causal query blocks do not compute; with them XLA counts (n+1)/2n of the score work."""
    cfg, b, t = model_cfg(mlp), 2, 256
    cfg = cfg.replace(attention=dataclasses.replace(cfg.attention, query_block=0))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(cfg, t))
    tokens = jnp.zeros((b, t), jnp.int32)
    batch = {"tokens": tokens, "targets": tokens, "positions": jnp.broadcast_to(jnp.arange(t), (b, t)),
             "segment_ids": jnp.ones((b, t), jnp.int32), "loss_mask": jnp.ones((b, t), jnp.int32)}  # fmt: skip
    grad = jax.jit(jax.grad(lambda p: _loss(p, Transformer(cfg), batch, jax.random.PRNGKey(0), 1.0, 1.0)[0]))
    cost = grad.lower(params).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert 0.97 <= flops.flops_per_token(cfg, t) * b * t / xla <= 1.0


def test_peak_table_by_device_kind():
    assert flops.peak_tflops("TPU v5 lite", "bfloat16") == 197.0  # v5e as jax names it
    assert flops.peak_tflops("TPU v5", "bfloat16") == 459.0  # v5p
    assert flops.peak_tflops("TPU v6 lite", "bfloat16") == 918.0
    assert flops.peak_tflops("TPU v4", "bfloat16") == 275.0
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert flops.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert flops.peak_tflops("NVIDIA H200", "float32") == 494.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == 156.0
    assert flops.peak_tflops("TPU v4", "float32") is None
    assert flops.peak_tflops("cpu", "float32") is None


def test_throughput_metrics():
    cfg = model_cfg("gelu")
    cpu = flops.Throughput(cfg, 256, jax.devices()[:4])
    m = cpu.metrics(tokens_per_sec=1e6)
    assert m == {"tflops_per_device": pytest.approx(flops.flops_per_token(cfg, 256) * 1e6 / 4 / 1e12)}
    with_peak = flops.Throughput(cfg, 256, jax.devices()[:4], peak_override=0.5).metrics(1e6)
    assert with_peak["mfu"] == pytest.approx(with_peak["tflops_per_device"] / 0.5)


def test_metrics_rows_report_tflops_and_mfu(tmp_path):
    """On CPU the table has no peak: tflops only, unless train.peak_tflops is given."""
    common = {"train.steps": 2, "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 1}
    train(tiny_cfg(**common, **{"train.peak_tflops": 0.01}), str(tmp_path / "a"))
    rows = [r for r in read_metrics(str(tmp_path / "a")) if "loss" in r]
    assert len(rows) == 2 and all(r["tflops_per_device"] > 0 for r in rows)
    assert all(r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.01) for r in rows)
    with pytest.raises(ConfigError, match="train.peak_tflops"):
        tiny_cfg(**{"train.peak_tflops": -1.0})
