"""The layer contract: per-layer kinds through the registries, layer patterns, the scanned layout
(super-blocks) and its conversion to and from the unrolled one, and the loss / metrics channels.

Two kinds are registered here for the tests only: an attention kind that is the causal one under
another name (so a pattern has two distinct kinds without new math), and a toy FFN that sows a
weighted loss and metrics computed from its own parameters (so their expected values are known
without running the model).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.model import Transformer, channels, layout
from llm.model.attention import CausalSelfAttention
from llm.model.config import AttentionConfig, FFNConfig, ModelConfig
from llm.model.registries import ATTENTION, FFN, MLP
from llm.train.step import forward

TOY_WEIGHT = 0.25


@ATTENTION.register("test_causal_b")
class _CausalB(CausalSelfAttention):
    """The causal kind under a second name."""


@FFN.register("test_toy")
class _ToyFFN(nn.Module):
    """The dense MLP, plus: loss TOY_WEIGHT * sum(fc_in^2), metrics mean(fc_in) and |fc_in| per column pair."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, ctx=None):
        mlp = MLP.get(self.cfg.mlp)(self.cfg, name="inner")
        y = mlp(x_BTD)
        w = nn.meta.unbox(mlp.variables["params"]["fc_in"]["kernel"])
        channels.add_loss(self, "toy_l2", jnp.sum(w**2), TOY_WEIGHT)
        channels.add_metric(self, "toy_mean", jnp.mean(w))
        channels.add_metric(self, "toy_vec", jnp.abs(w[:2, :2]).sum(0))
        return y


def cfg_of(n_layers=5, pattern=None, scan=False, ffn="dense", **kw):
    return ModelConfig(vocab_size=64, d_model=32, n_layers=n_layers, max_seq_len=16, scan_layers=scan,
                       attention=AttentionConfig(n_heads=4, pattern=pattern), ffn=FFNConfig(kind=ffn), **kw)  # fmt: skip


TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)))


def init(cfg, seed=0):
    return nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(seed), TOKENS)["params"])


def apply(cfg, params, **kw):
    return Transformer(cfg).apply({"params": params}, TOKENS, **kw)


def test_plan_cuts_a_prefix_and_a_repeating_super_block():
    specs = lambda p: [(s.attention, s.ffn) for s in p.unit]  # noqa: E731
    p = layout.plan(cfg_of(4, scan=True))
    assert (p.prefix, p.period, p.repeats) == (0, 1, 4)  # uniform: today's layout
    p = layout.plan(cfg_of(4, pattern=("causal", "causal"), scan=True))
    assert (p.prefix, p.period, p.repeats) == (0, 1, 4)  # a pattern of one kind is uniform
    p = layout.plan(cfg_of(5, pattern=("causal", "test_causal_b"), scan=True))
    assert (p.prefix, p.period, p.repeats) == (1, 2, 2)  # c | (b c) x 2
    assert specs(p) == [("test_causal_b", "dense"), ("causal", "dense")]
    # Gemma-3 style: five local then one global, 26 layers: 2 unrolled, then 6 x 4.
    g3 = ("test_causal_b",) * 5 + ("causal",)
    p = layout.plan(cfg_of(26, pattern=g3, scan=True))
    assert (p.prefix, p.period, p.repeats) == (2, 6, 4)
    assert [s.attention for s in p.specs] == [g3[i % 6] for i in range(26)]
    assert not layout.plan(cfg_of(5, pattern=g3)).scanned


def test_pattern_of_the_default_kind_equals_the_model_without_a_pattern():
    for scan in (False, True):
        base, pat = cfg_of(4, scan=scan), cfg_of(4, pattern=("causal", "causal"), scan=scan)
        params = init(base)
        assert jax.tree.structure(params) == jax.tree.structure(init(pat))
        jax.tree.map(np.testing.assert_array_equal, params, init(pat))  # same init, same names
        np.testing.assert_array_equal(np.asarray(apply(base, params)), np.asarray(apply(pat, params)))


@pytest.mark.parametrize("n_layers,pattern", [(4, None), (5, ("causal", "test_causal_b")),
                                              (6, ("test_causal_b", "test_causal_b", "causal"))])  # fmt: skip
def test_scanned_and_unrolled_give_equal_outputs_and_convert_both_ways(n_layers, pattern):
    unrolled, scanned = cfg_of(n_layers, pattern), cfg_of(n_layers, pattern, scan=True)
    p_unrolled = init(unrolled)
    p_scanned = layout.to_layout(p_unrolled, scanned)
    # The converted tree is exactly what the scanned model initialises (names, shapes), ...
    assert jax.tree.structure(p_scanned) == jax.tree.structure(init(scanned))
    for a, b in zip(jax.tree.leaves(p_scanned), jax.tree.leaves(init(scanned))):
        assert a.shape == b.shape
    # ... computes the same function, and converts back to the same parameters.
    np.testing.assert_allclose(apply(scanned, p_scanned), apply(unrolled, p_unrolled), rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, layout.to_unrolled(p_scanned, scanned), p_unrolled)
    if pattern and len(set(pattern)) > 1:
        assert any(k.startswith("block_") for k in p_scanned["layers"])  # a real super-block


def _sown(cfg, params):
    batch = {"tokens": TOKENS, "positions": jnp.broadcast_to(jnp.arange(12), TOKENS.shape),
             "segment_ids": jnp.ones_like(TOKENS)}  # fmt: skip
    _, aux = jax.jit(lambda p: forward(p, Transformer(cfg), batch))(params)
    return aux


@pytest.mark.parametrize("pattern", [None, ("causal", "test_causal_b")])
def test_aux_losses_and_metrics_sum_the_same_over_scanned_and_unrolled_layers(pattern):
    n = 5
    unrolled, scanned = cfg_of(n, pattern, ffn="test_toy"), cfg_of(n, pattern, scan=True, ffn="test_toy")
    params = init(unrolled)
    kernels = [
        np.asarray(params[f"layer_{i}"]["mlp"]["inner"]["fc_in"]["kernel"], np.float64) for i in range(n)
    ]
    want_loss = TOY_WEIGHT * sum((w**2).sum() for w in kernels)  # weighted, summed over all layers
    got_u = _sown(unrolled, params)
    got_s = _sown(scanned, layout.to_layout(params, scanned))
    for got in (got_u, got_s):
        assert set(got["losses"]) == {"toy_l2"}
        np.testing.assert_allclose(float(got["losses"]["toy_l2"]), want_loss, rtol=1e-5)
        m = got["metrics"]
        for i, w in enumerate(kernels):
            np.testing.assert_allclose(float(m[f"toy_mean/layer_{i}"]), w.mean(), rtol=1e-5, atol=1e-7)
            for k in range(2):
                np.testing.assert_allclose(
                    float(m[f"toy_vec/layer_{i}/{k}"]), np.abs(w[:2, k]).sum(), rtol=1e-5
                )
        np.testing.assert_allclose(
            float(m["toy_mean"]), np.mean([w.mean() for w in kernels]), rtol=1e-5, atol=1e-7
        )
    assert set(got_u["metrics"]) == set(got_s["metrics"])


def test_channels_reject_wrong_shapes():
    class Bad(nn.Module):
        @nn.compact
        def __call__(self, x):
            channels.add_loss(self, "per_token", x)
            return x

    with pytest.raises(ValueError, match="auxiliary loss must be a scalar per layer; 'per_token'"):
        Bad().init(jax.random.PRNGKey(0), jnp.ones((2, 3)))


def test_unknown_kinds_in_a_pattern_or_ffn_name_the_field():
    from llm.config import ConfigError

    with pytest.raises(
        ConfigError, match=r"unknown attention kind 'locl' \(config field model.attention.pattern\)"
    ):
        cfg_of(4, pattern=("causal", "locl"))
    with pytest.raises(ConfigError, match=r"unknown ffn kind 'mo' \(config field model.ffn.kind\)"):
        cfg_of(4, ffn="mo")
    with pytest.raises(ConfigError, match="model.attention.pattern is empty"):
        dataclasses.replace(cfg_of(4), attention=AttentionConfig(n_heads=4, pattern=()))


def test_loop_logs_the_metrics_channel_and_adds_only_losses(tmp_path):
    """Through a real (tiny) run: aux losses enter the loss, metrics only metrics.jsonl/TensorBoard."""
    from llm.train.loop import train
    from llm.train.metrics import read_metrics
    from tests.test_train import tiny_cfg

    cfg = tiny_cfg(**{"model.ffn.kind": "test_toy", "model.scan_layers": True, "train.steps": 3,
                      "train.log_every": 1, "train.eval_every": 0, "checkpoint.every": 0})  # fmt: skip
    train(cfg, str(tmp_path))
    rows = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    assert len(rows) == 3
    for r in rows:
        assert {
            "model/toy_mean",
            "model/toy_mean/layer_0",
            "model/toy_mean/layer_1",
            "model/toy_vec/layer_1/1",
        } <= set(r)
        np.testing.assert_allclose(r["total_loss"] - r["loss"], r["aux/toy_l2"], rtol=1e-4)
        assert r["aux/toy_l2"] > 0
    tags = _tensorboard_tags(tmp_path / "tb")
    assert "model/toy_mean/layer_1" in tags and "aux/toy_l2" in tags


def _tensorboard_tags(tb_dir) -> set[str]:
    from tensorboardX.proto import event_pb2

    tags = set()
    for f in tb_dir.iterdir():
        data = f.read_bytes()
        i = 0
        while i + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            n = int.from_bytes(data[i : i + 8], "little")
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            tags.update(v.tag for v in ev.summary.value)
            i += 12 + n + 4
    return tags
