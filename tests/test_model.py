"""The transformer against an independent numpy reference, plus structural properties."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.model import AttentionConfig, ModelConfig, Transformer
from llm.model.positional import alibi_slopes, apply_rope, rope_inv_freq, rope_sin_cos, sinusoidal_table
from tests import reference

TOL = dict(rtol=2e-4, atol=2e-4)  # fp32 model vs float64 reference


def small(**kw):
    att = kw.pop("attention", {})
    base = dict(vocab_size=50, d_model=32, n_layers=2, max_seq_len=16, init_std=0.3)
    base.update(kw)
    return ModelConfig(**base, attention=AttentionConfig(**{"n_heads": 4, **att}))


def init(cfg, t=8, seed=0):
    model = Transformer(cfg)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, t), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
    return model, jax.tree.map(np.asarray, nn_unbox(params))


def nn_unbox(p):
    import flax.linen as nn

    return nn.meta.unbox(p)


VARIANTS = [
    dict(positional=pos, norm=norm, mlp=mlp)
    for pos, norm, mlp in itertools.product(
        ["learned", "sinusoidal", "rope", "alibi", "none"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"]
    )
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v.values()))
def test_matches_numpy_reference(variant):
    cfg = small(**variant)
    model, params = init(cfg)
    tokens = np.random.RandomState(0).randint(0, 50, (2, 8))
    got = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    want = reference.forward(cfg, params, tokens)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize(
    "kw",
    [
        dict(attention=dict(n_kv_heads=2)),  # GQA
        dict(attention=dict(n_kv_heads=1), positional="rope"),  # MQA
        dict(norm_position="post", tie_embeddings=False),
        dict(use_bias=False, positional="alibi", attention=dict(n_heads=8, n_kv_heads=2)),
    ],
    ids=["gqa", "mqa-rope", "postnorm-untied", "nobias-alibi8-gqa"],
)
def test_layouts_match_reference(kw):
    cfg = small(**kw)
    model, params = init(cfg)
    tokens = np.random.RandomState(1).randint(0, 50, (2, 8))
    got = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, reference.forward(cfg, params, tokens), **TOL)


def test_packed_documents_do_not_attend_across():
    """Doc B's logits inside a packed row equal doc B's logits computed alone."""
    for pos in ["learned", "rope", "alibi"]:
        cfg = small(positional=pos)
        model, params = init(cfg)
        rs = np.random.RandomState(2)
        a, b = rs.randint(0, 50, 5), rs.randint(0, 50, 7)
        packed = np.concatenate([a, b])[None]
        seg = np.array([[1] * 5 + [2] * 7])
        posn = np.array([list(range(5)) + list(range(7))])
        out = model.apply({"params": params}, jnp.asarray(packed), jnp.asarray(posn), jnp.asarray(seg))
        alone = model.apply({"params": params}, jnp.asarray(b[None]))
        np.testing.assert_allclose(np.asarray(out)[0, 5:], np.asarray(alone)[0], **TOL)
        want = reference.forward(cfg, params, packed, posn, seg)
        np.testing.assert_allclose(np.asarray(out), want, **TOL)


@pytest.mark.parametrize("pos", ["learned", "rope", "alibi"])
def test_causality_through_gradients(pos):
    """d logits[t] / d input-embedding[s] is exactly zero for s > t."""
    cfg = small(positional=pos)
    model, params = init(cfg)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 50, (1, 8)))
    zeros = {"embedded": jnp.zeros((1, 8, cfg.d_model))}
    for t in range(8):
        f = lambda pert: model.apply({"params": params, "perturbations": pert}, tokens)[0, t].sum()  # noqa: E731
        g = np.asarray(jax.grad(f)(zeros)["embedded"])[0]  # [T, D]
        norms = np.abs(g).sum(-1)
        assert np.all(norms[t + 1 :] == 0.0), (t, norms)
        assert norms[t] > 0


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = small(attention=dict(n_heads=4, n_kv_heads=2), positional="rope")
    mha = small(attention=dict(n_heads=4, n_kv_heads=4), positional="rope")
    model_g, p_g = init(gqa)
    model_m, p_m = init(mha)
    # Build MHA params: each kv head is repeated for the query heads of its group.
    p_m = jax.tree.map(np.copy, p_g)
    for li in range(2):
        for name in ("key", "value"):
            q = p_m[f"layer_{li}"]["attn"][name]
            q["kernel"] = np.repeat(q["kernel"], 2, axis=1)
            q["bias"] = np.repeat(q["bias"], 2, axis=0)
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, 50, (2, 8)))
    np.testing.assert_allclose(
        np.asarray(model_g.apply({"params": p_g}, tokens)), np.asarray(model_m.apply({"params": p_m}, tokens)),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_rope_scores_depend_only_on_relative_position():
    rs = np.random.RandomState(5)
    q = jnp.asarray(rs.randn(1, 1, 1, 16), jnp.float32)
    k = jnp.asarray(rs.randn(1, 1, 1, 16), jnp.float32)

    def score(m, n):
        qm = apply_rope(q, jnp.array([[m]]), 10000.0)
        kn = apply_rope(k, jnp.array([[n]]), 10000.0)
        return float(jnp.sum(qm * kn))

    for m, n in [(5, 2), (9, 0), (3, 3)]:
        for shift in (1, 7, 100):
            assert abs(score(m, n) - score(m + shift, n + shift)) < 1e-4
    assert abs(score(5, 2) - score(6, 2)) > 1e-3  # and it does depend on the offset


def test_rope_tables_are_exact_at_any_position_and_with_llama3_scaling():
    """The CPU path (constant sin/cos tables, angle addition) against float64 math: positions from
    negative to 2^24 - 1, with and without Llama-3.1 frequency scaling."""
    from llm.model.config import RopeScalingConfig  # noqa: PLC0415
    from llm.model.positional import rope_inv_freq  # noqa: PLC0415

    assert jax.default_backend() == "cpu"
    rs = np.random.RandomState(6)
    x = rs.randn(2, 6, 3, 16).astype(np.float32)
    pos = np.array([[0, 1, 4095, 4096, 70_001, -3], [123_457, 2**20 + 9, 2**24 - 1, 17, 255, 4097]], np.int32)
    scaling = RopeScalingConfig(kind="llama3", factor=8.0, original_max_len=64)
    for sc in (None, scaling):
        inv = rope_inv_freq(16, 10000.0, sc).astype(np.float64)
        ang = pos[..., None] * inv
        s, c = np.sin(ang)[:, :, None], np.cos(ang)[:, :, None]
        want = np.concatenate([x[..., :8] * c - x[..., 8:] * s, x[..., 8:] * c + x[..., :8] * s], -1)
        got = np.asarray(jax.jit(lambda a, p: apply_rope(a, p, 10000.0, sc))(x, pos))
        np.testing.assert_allclose(got, want, atol=2e-6)
    # llama3 scaling leaves the fastest frequencies, divides the slowest by `factor`.
    plain, scaled = rope_inv_freq(16, 10000.0), rope_inv_freq(16, 10000.0, scaling)
    assert scaled[0] == plain[0] and np.isclose(scaled[-1], plain[-1] / 8.0)


def test_rope_gradient_is_the_inverse_rotation():
    """apply_rope's hand-written backward (rotation by minus the angle) against the transpose of the
    rotation written out as a float64 matrix per position (incl. a negative one), and against jax's
    own autodiff of the same rotation without the custom VJP; bf16 input keeps its dtype."""
    rs = np.random.RandomState(7)
    x = rs.randn(2, 5, 3, 8).astype(np.float32)
    g = rs.randn(2, 5, 3, 8).astype(np.float32)
    pos = np.array([[0, 1, 7, 300, -2], [4096, 5, 9, 11, 70_001]], np.int32)
    got = np.asarray(jax.vjp(lambda a: apply_rope(a, pos, 10000.0), jnp.asarray(x))[1](jnp.asarray(g))[0])
    inv = rope_inv_freq(8, 10000.0).astype(np.float64)  # float32 frequencies, as the model uses
    want = np.zeros_like(got, dtype=np.float64)
    for b, t in itertools.product(range(2), range(5)):
        rot = np.zeros((8, 8))
        for i, f in enumerate(inv):  # out[i] = x[i] c - x[i+4] s; out[i+4] = x[i+4] c + x[i] s
            c, s = np.cos(pos[b, t] * f), np.sin(pos[b, t] * f)
            rot[i, i], rot[i, i + 4], rot[i + 4, i + 4], rot[i + 4, i] = c, -s, c, s
        want[b, t] = g[b, t].astype(np.float64) @ rot  # vjp of out = rot @ x: g @ rot (per head row)
    np.testing.assert_allclose(got, want, atol=2e-5)

    def plain(a, p):  # the same rotation, differentiated by jax
        sin_BTh, cos_BTh = rope_sin_cos(jnp.asarray(p), rope_inv_freq(8, 10000.0))
        s_, c_ = sin_BTh[:, :, None], cos_BTh[:, :, None]
        return jnp.concatenate([a[..., :4] * c_ - a[..., 4:] * s_, a[..., 4:] * c_ + a[..., :4] * s_], -1)

    auto = jax.vjp(lambda a: plain(a, pos), jnp.asarray(x))[1](jnp.asarray(g))[0]
    np.testing.assert_array_equal(got, np.asarray(auto))
    xb = jnp.asarray(x, jnp.bfloat16)
    gb = jax.grad(lambda a: jnp.sum(apply_rope(a, pos, 10000.0).astype(jnp.float32)))(xb)
    assert gb.dtype == jnp.bfloat16


def test_sinusoidal_and_alibi_tables_match_papers():
    pos = jnp.arange(6)[None]
    got = np.asarray(sinusoidal_table(pos, 8))[0]
    want = np.stack([reference.sinusoid(p, 8) for p in range(6)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alibi_slopes(8), [1 / 2**i for i in range(1, 9)], rtol=1e-6)
    # Non power of two (paper's recipe): the 8 slopes of 8 heads, then every other one of 16.
    want12 = [2 ** (-i) for i in range(1, 9)] + [2 ** (-(2 * i + 1) / 2) for i in range(0, 4)]
    np.testing.assert_allclose(alibi_slopes(12), want12, rtol=1e-6)


def test_scan_and_remat_give_the_same_function():
    cfg = small(positional="rope")
    model, params = init(cfg)
    scanned = Transformer(cfg.replace(scan_layers=True, remat="full"))
    # Stack per-layer params along a leading axis to form the scanned layout.
    layers = [params[f"layer_{i}"] for i in range(cfg.n_layers)]
    sp = {k: v for k, v in params.items() if not k.startswith("layer_")}
    sp["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    tokens = jnp.asarray(np.random.RandomState(6).randint(0, 50, (2, 8)))
    np.testing.assert_allclose(
        np.asarray(model.apply({"params": params}, tokens)), np.asarray(scanned.apply({"params": sp}, tokens)),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_bf16_compute_keeps_fp32_params_and_is_close():
    cfg = small(positional="rope", dtype="bfloat16")
    model, params = init(cfg)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    tokens = jnp.asarray(np.random.RandomState(7).randint(0, 50, (2, 8)))
    out = model.apply({"params": params}, tokens)
    assert out.dtype == jnp.bfloat16
    ref = Transformer(cfg.replace(dtype="float32")).apply({"params": params}, tokens)
    # bf16 has ~3 significant digits; logits here are O(10).
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=0.05, atol=0.5)


@pytest.mark.parametrize("impl", ["einsum", "jax"])
def test_autocast_matmuls_keep_f32_activations_and_are_close(impl):
    """model.matmul_dtype=bfloat16 with dtype=float32: f32 logits, bf16-close to full fp32."""
    cfg = small(positional="rope", matmul_dtype="bfloat16", attention=dict(impl=impl))
    model, params = init(cfg)
    tokens = jnp.asarray(np.random.RandomState(7).randint(0, 50, (2, 8)))
    out = model.apply({"params": params}, tokens)
    assert out.dtype == jnp.float32
    ref = Transformer(cfg.replace(matmul_dtype=None)).apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0.05, atol=0.5)
    assert not np.allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_jax_attention_impl_matches_einsum():
    for kw in [dict(), dict(positional="alibi"), dict(attention=dict(n_kv_heads=2), positional="rope")]:
        cfg = small(**kw)
        model, params = init(cfg)
        att = dict(kw.get("attention", {}), impl="jax")
        other = Transformer(small(**{**kw, "attention": att}))
        tokens = jnp.asarray(np.random.RandomState(8).randint(0, 50, (2, 8)))
        seg = jnp.asarray([[1] * 3 + [2] * 5, [1] * 8])
        np.testing.assert_allclose(
            np.asarray(model.apply({"params": params}, tokens, None, seg)),
            np.asarray(other.apply({"params": params}, tokens, None, seg)), rtol=1e-4, atol=1e-4,
        )  # fmt: skip
