"""optim.name (AdamW, Muon, Lion, Adafactor), optim.schedule (cosine, WSD, linear, constant) and
train.z_loss, each against its update rule written out in numpy here (not from the code under test).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llm.config import AdafactorConfig, LionConfig, MuonConfig, OptimConfig, WSDConfig
from llm.registry import ConfigError
from llm.train import optimizer as opt

NS = (3.4445, -4.7750, 2.0315)
# A constant learning rate, no clipping, no decay: the direction is all that differs.
PLAIN = OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", clip_norm=0.0, weight_decay=0.0)


def run(cfg, params, grads, param_axes=None):
    """Apply the optimizer to `grads` (a list of gradient trees), return the params after each."""
    tx, _ = opt.make_optimizer(cfg, 100, param_axes=param_axes)
    state, out = tx.init(params), []
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        out.append(jax.tree.map(np.asarray, params))
    return out


def grads_like(params, n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(n)
    ]


def np_adam(p, gs, lr, b1, b2, eps):
    m = v = 0
    for t, g in enumerate(gs, 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


def np_orthogonalize(x):
    """Muon's quintic Newton-Schulz iteration (5 steps) on a Frobenius-normalised matrix."""
    t = x.shape[0] > x.shape[1]
    x = x.T if t else x
    x = x / (np.linalg.norm(x) + 1e-8)
    a, b, c = NS
    for _ in range(5):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if t else x


def np_muon(p, gs, lr, beta, rms=0.2):
    """Nesterov momentum (bias-corrected as optax does), orthogonalised, RMS-matched to AdamW."""
    mu = 0
    for t, g in enumerate(gs, 1):
        mu = beta * mu + (1 - beta) * g
        mu_hat = beta * mu / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta**t)
        p = p - lr * np_orthogonalize(mu_hat) * np.sqrt(max(p.shape)) * rms
    return p


def test_adamw_matches_numpy():
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    gs = grads_like(params, 3)
    got = run(PLAIN, params, gs)[-1]
    for k in params:
        want = np_adam(np.asarray(params[k]), [np.asarray(g[k]) for g in gs], 0.1, 0.9, 0.95, 1e-8)
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-6)


def test_muon_matches_numpy_on_matrices_adam_elsewhere():
    cfg = dataclasses.replace(PLAIN, name="muon", lr=0.02)
    params = {"kernel": jnp.ones((6, 4)) * 0.1, "embed": jnp.ones((5, 4)), "scale": jnp.ones(4)}
    axes = {"kernel": P("embed", "mlp"), "embed": P("vocab", "embed"), "scale": P("norm")}
    gs = grads_like(params, 3, seed=1)
    got = run(cfg, params, gs, axes)[-1]
    seq = lambda k: [np.asarray(g[k], np.float64) for g in gs]  # noqa: E731
    np.testing.assert_allclose(got["kernel"], np_muon(np.asarray(params["kernel"], np.float64), seq("kernel"), 0.02, 0.95),
                               rtol=2e-4, atol=2e-5)  # fmt: skip
    for k in ("embed", "scale"):  # vocab-indexed tables and vectors: Adam
        np.testing.assert_allclose(
            got[k], np_adam(np.asarray(params[k]), seq(k), 0.02, 0.9, 0.95, 1e-8), rtol=1e-5
        )


def test_muon_treats_stacked_and_expert_kernels_as_separate_matrices():
    """A scanned stack [L, D, F] and the attention output (L, H, Dh, D) are orthogonalised per
    layer slice, exactly as the unstacked matrices would be (not passed to Adam as 3-D/4-D arrays)."""
    cfg = dataclasses.replace(PLAIN, name="muon", lr=0.02)
    rng = np.random.default_rng(2)
    stacked = {"up": jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32),
               "out": jnp.asarray(rng.normal(size=(2, 2, 3, 6)), jnp.float32)}  # fmt: skip
    axes = {"up": P("layers", "embed", "mlp"), "out": P("layers", "heads", "head_dim", "embed")}
    gs = grads_like(stacked, 2, seed=3)
    got = run(cfg, stacked, gs, axes)[-1]
    for layer in range(2):
        g_up = [np.asarray(g["up"][layer], np.float64) for g in gs]
        np.testing.assert_allclose(got["up"][layer], np_muon(np.asarray(stacked["up"][layer], np.float64), g_up, 0.02, 0.95),
                                   rtol=2e-4, atol=2e-5)  # fmt: skip
        # The output projection is a (heads * head_dim) x embed matrix.
        g_out = [np.asarray(g["out"][layer], np.float64).reshape(6, 6) for g in gs]
        want = np_muon(np.asarray(stacked["out"][layer], np.float64).reshape(6, 6), g_out, 0.02, 0.95)
        np.testing.assert_allclose(got["out"][layer].reshape(6, 6), want, rtol=2e-4, atol=2e-5)
    d = opt.muon_dimension_numbers
    assert d("layers/mlp/w_in", ("layers", "expert", "embed", "mlp")).reduction_axis == (2,)
    assert d("layers/attn/out/kernel", ("layers", "heads", "head_dim", "embed")) == ((1, 2), (3,))
    assert d("layers/attn/query/kernel", ("layers", "embed", "heads", "head_dim")) == ((1,), (2, 3))
    assert (
        d("lm_head/kernel", ("embed", "vocab")) is None
        and d("layers/mlp/router", ("layers", "embed", None)) is None
    )
    assert d("layers/norm/scale", ("layers", "norm")) is None
    with pytest.raises(ValueError, match="silently fall back to Adam"):
        opt.make_optimizer(cfg, 10)


def test_muon_runs_in_a_scanned_model(tmp_path):
    """End to end: a scanned Llama trains with Muon, and its stacked kernels hold Muon momentum."""
    from llm.train.loop import build
    from tests.test_train import tiny_cfg

    exp = build(tiny_cfg("llama", **{"optim.name": "muon", "model.scan_layers": True}), str(tmp_path))
    state = exp.trainer.init_state()
    muon_state = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "ns_coeffs"))
                  if hasattr(s, "ns_coeffs")]  # fmt: skip
    assert len(muon_state) == 1
    mu = muon_state[0].mu["layers"]
    assert mu["attn"]["query"]["kernel"].shape == state.params["layers"]["attn"]["query"]["kernel"].shape
    assert isinstance(
        mu["norm_attn"]["scale"], type(muon_state[0].mu["embed"]["embedding"])
    )  # masked: Adam's


def test_lion_matches_numpy():
    cfg = dataclasses.replace(PLAIN, name="lion", lr=0.01, lion=LionConfig(b1=0.9, b2=0.99))
    params = {"w": jnp.ones((3, 4))}
    gs = grads_like(params, 3, seed=4)
    p, m = np.ones((3, 4)), 0
    for g in gs:
        g = np.asarray(g["w"])
        p = p - 0.01 * np.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    np.testing.assert_allclose(run(cfg, params, gs)[-1]["w"], p, rtol=1e-6)


def test_adafactor_matches_numpy():
    """Factored second moments for a matrix (both dims >= min_dim_size_to_factor), a full one for
    a vector; decay 1 - t^-0.8; update RMS clipped to 1."""
    a = AdafactorConfig(min_dim_size_to_factor=2)
    cfg = dataclasses.replace(PLAIN, name="adafactor", lr=0.01, adafactor=a)
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    gs = grads_like(params, 3, seed=5)
    want = {}
    for k in params:
        p, r, c, v = np.asarray(params[k], np.float64), 0, 0, 0
        for t, g in enumerate(gs, 1):
            g = np.asarray(g[k], np.float64)
            beta = 1 - t**-0.8
            g2 = g * g + 1e-30
            if g.ndim == 2:
                r = beta * r + (1 - beta) * g2.mean(axis=1)
                c = beta * c + (1 - beta) * g2.mean(axis=0)
                v_hat = np.outer(r, c) / r.mean()
            else:
                v = v_hat = beta * v + (1 - beta) * g2
            u = g / np.sqrt(v_hat)
            u = u / max(1.0, np.sqrt(np.mean(u * u)) / 1.0)
            p = p - 0.01 * u
        want[k] = p
    got = run(cfg, params, gs)[-1]
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)
    # Its state for a matrix is a row and a column: O(R + C), not O(R C) like Adam's.
    tx, _ = opt.make_optimizer(dataclasses.replace(cfg, adafactor=AdafactorConfig()), 10)
    big = {"w": jnp.ones((256, 512))}
    n_state = sum(x.size for x in jax.tree.leaves(tx.init(big)) if hasattr(x, "size") and x.ndim)
    assert n_state == 256 + 512 + 1  # (plus the 1-element unfactored placeholder)


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_schedule_values(shape):
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd",
                      wsd=WSDConfig(decay_fraction=0.2, decay_shape=shape))  # fmt: skip
    s = opt.make_schedule(cfg, 100)  # decay over steps 80..100
    f = {"linear": lambda x: x, "cosine": lambda x: (1 - np.cos(np.pi * x)) / 2, "sqrt": np.sqrt}[shape]
    for step, want in [
        (0, 0.0),
        (5, 0.5),
        (10, 1.0),
        (50, 1.0),
        (80, 1.0),
        (90, 1 - 0.9 * f(0.5)),
        (100, 0.1),
    ]:
        assert float(s(step)) == pytest.approx(want, abs=1e-6), step


def test_other_schedules_values():
    base = dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lin = opt.make_schedule(OptimConfig(schedule="linear", **base), 100)
    const = opt.make_schedule(OptimConfig(schedule="constant", **base), 100)
    cos = opt.make_schedule(OptimConfig(schedule="cosine", **base), 100)
    for step, want in [(5, 0.5), (10, 1.0), (55, 0.55), (100, 0.1)]:
        assert float(lin(step)) == pytest.approx(want, abs=1e-6)
    assert [float(const(s)) for s in (5, 10, 99)] == pytest.approx([0.5, 1.0, 1.0])
    assert float(cos(55)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 45 / 90)), abs=1e-6)


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="optim.name.*adafactor"):
        OptimConfig(name="adafacter")
    with pytest.raises(ConfigError, match="optim.schedule"):
        OptimConfig(schedule="wsdd")
    with pytest.raises(ConfigError, match="decay_shape"):
        OptimConfig(wsd=WSDConfig(decay_shape="exp"))
    assert MuonConfig().consistent_rms == 0.2


def test_z_loss_adds_mean_squared_log_partition():
    from llm.train import step
    from llm.train.builder import build_model
    from tests.test_train import tiny_cfg

    cfg = tiny_cfg(**{"model.vocab_size": 320})
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, 320, (2, 16)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, 320, (2, 16)), jnp.int32),
             "positions": jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1)),
             "segment_ids": jnp.ones((2, 16), jnp.int32),
             "loss_mask": jnp.asarray(rng.integers(0, 2, (2, 16)), jnp.int32)}  # fmt: skip
    params = model.init(jax.random.PRNGKey(0), batch["tokens"])["params"]
    n = step.scored_tokens(batch)
    plain, (nll0, _) = step._loss(params, model, batch, jax.random.PRNGKey(1), n, 1.0)
    with_z, (nll, aux) = step._loss(params, model, batch, jax.random.PRNGKey(1), n, 1.0, z_loss=1e-2)
    logits = np.asarray(model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"]),
                        np.float64)  # fmt: skip
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    mask = np.asarray(batch["loss_mask"], np.float64)
    z = 1e-2 * (lse**2 * mask).sum() / mask.sum()
    assert float(nll) == pytest.approx(float(nll0), rel=1e-6)
    assert float(aux["losses"]["z_loss"]) == pytest.approx(z, rel=1e-5)
    assert float(with_z) == pytest.approx(float(plain) + z, rel=1e-5)
