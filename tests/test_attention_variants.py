"""Attention kinds and options (local windows, NoPE, QK-norm, soft-capping, sinks, MLA,
differential attention) against numpy references written here from the papers, their properties,
cached decode, and meshes.

The references read the Flax params but share no code with llm/model: loops over batch rows and
heads, explicit masks, tests/reference.py's textbook RMSNorm, RoPE and softmax, float64.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.model import Transformer, layout
from llm.model.config import AttentionConfig, LocalConfig, MLAConfig, ModelConfig
from llm.model.context import training_context
from llm.model.registries import ATTENTION, _load_all
from tests.reference import rmsnorm, rope_vec, softmax

_load_all()
RTOL = ATOL = 1e-5  # fp32 model against a float64 reference

B, T = 2, 12


def cfg_of(kind="causal", n_layers=2, impl="einsum", **att):
    local = LocalConfig(**att.pop("local", {}))
    mla = MLAConfig(**att.pop("mla", {}))
    return ModelConfig(
        vocab_size=64, d_model=32, n_layers=n_layers, max_seq_len=64, positional="rope", norm="rmsnorm",
        mlp="swiglu", use_bias=False, tie_embeddings=False,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, kind=kind, impl=impl, local=local, mla=mla, **att),
    )  # fmt: skip


def _inputs(seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(B, T, 32)).astype(np.float32)
    positions = np.tile(np.arange(T), (B, 1))
    segments = np.ones((B, T), np.int32)
    positions[1, 5:] = np.arange(T - 5)  # row 1 packs a second document from slot 5
    segments[1, 5:] = 2
    return x, positions, segments


def run_layer(cfg, kind, params=None, layer=0, seed=0, x=None):
    """(output, params) of one attention module of `kind` on fixed inputs."""
    xs, pos, seg = _inputs()
    x = xs if x is None else x
    mod = ATTENTION.get(kind)(cfg)
    ctx = training_context(jnp.asarray(pos), jnp.asarray(seg), True).replace(layer=layer)
    if params is None:
        params = nn.meta.unbox(mod.init(jax.random.PRNGKey(seed), jnp.asarray(x), ctx)["params"])
        params = sharpen(params)
        # Sinks start at zero; give them values so a wrong sign or a missing term shows.
        if "sinks" in params:
            params["sinks"] = jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)
    return mod.apply({"params": params}, jnp.asarray(x), ctx), params


def sharpen(params, by=20.0):
    """Query/key projections scaled up: scores of a few units (init's are ~0.01), so caps bind,
    softmaxes are peaked and sinks matter."""

    def f(path, a):
        name = jax.tree_util.keystr(path)
        return a * by if any(f"'{k}'" in name for k in ("query", "key", "q_b", "kv_b")) else a

    return jax.tree_util.tree_map_with_path(f, params)


# ---- numpy references ------------------------------------------------------------------------------


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _visible(cfg, pos, seg, bi, i, j, window=None):
    ok = j <= i and seg[bi, j] == seg[bi, i]
    return ok and (window is None or pos[bi, i] - pos[bi, j] < window)


def _softmax_row(scores, sink=None):
    """Softmax over the visible scores (-inf elsewhere), a sink logit joining the denominator."""
    if sink is None:
        return softmax(scores)
    p = softmax(np.append(scores, sink))
    return p[:-1]


def _head_qkv(p, x_TD, head, kv_head):
    """One query head's q and its kv head's k, v for one row: [T, H] each."""
    return (x_TD @ p["query"]["kernel"][:, head], x_TD @ p["key"]["kernel"][:, kv_head],
            x_TD @ p["value"]["kernel"][:, kv_head])  # fmt: skip


def reference_mha(cfg, p, x, pos, seg, window=None, nope=False):
    """causal / local / nope with qk_norm, logit_softcap and sinks, GQA by head // group."""
    a, h, eps = cfg.attention, cfg.head_dim, cfg.norm_eps
    p = _np(p)
    g = a.n_heads // a.kv_heads
    out = np.zeros((B, T, a.n_heads, h))
    for bi in range(B):
        for head in range(a.n_heads):
            q, k, v = _head_qkv(p, x[bi], head, head // g)
            if a.qk_norm:
                q, k = rmsnorm(q, p["q_norm"]["scale"], eps), rmsnorm(k, p["k_norm"]["scale"], eps)
            if not nope:
                q = np.stack([rope_vec(q[i], pos[bi, i], cfg.rope_theta) for i in range(T)])
                k = np.stack([rope_vec(k[i], pos[bi, i], cfg.rope_theta) for i in range(T)])
            for i in range(T):
                s = np.full(T, -np.inf)
                for j in range(T):
                    if _visible(cfg, pos, seg, bi, i, j, window):
                        s[j] = q[i] @ k[j] / math.sqrt(h)
                        if a.logit_softcap is not None:
                            s[j] = a.logit_softcap * math.tanh(s[j] / a.logit_softcap)
                out[bi, i, head] = _softmax_row(s, p["sinks"][head] if a.sinks else None) @ v
    return np.einsum("btnh,nhd->btd", out, p["out"]["kernel"])


def reference_mla(cfg, p, x, pos, seg):
    """DeepSeek-V2 eqs. 9-19: latent c_kv, per-head k_nope / v from it, one shared rotary key."""
    a, m, eps = cfg.attention, cfg.attention.mla, cfg.norm_eps
    p = _np(p)
    dn, dr, dv, r = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
    out = np.zeros((B, T, a.n_heads, dv))
    for bi in range(B):
        if m.q_lora_rank:
            cq = rmsnorm(x[bi] @ p["q_a"]["kernel"], p["q_a_norm"]["scale"], eps)
            q_all = np.einsum("tr,rnd->tnd", cq, p["q_b"]["kernel"])
        else:
            q_all = np.einsum("td,dnq->tnq", x[bi], p["query"]["kernel"])
        kv_a = x[bi] @ p["kv_a"]["kernel"]
        c = rmsnorm(kv_a[:, :r], p["kv_a_norm"]["scale"], eps)
        k_rope = np.stack([rope_vec(kv_a[i, r:], pos[bi, i], cfg.rope_theta) for i in range(T)])
        for head in range(a.n_heads):
            w = p["kv_b"][:, head]
            k = np.concatenate([c @ w[:, :dn], k_rope], axis=-1)
            v = c @ w[:, dn:]
            q_rope = np.stack([rope_vec(q_all[i, head, dn:], pos[bi, i], cfg.rope_theta) for i in range(T)])
            q = np.concatenate([q_all[:, head, :dn], q_rope], axis=-1)
            for i in range(T):
                s = np.full(T, -np.inf)
                for j in range(T):
                    if _visible(cfg, pos, seg, bi, i, j):
                        s[j] = q[i] @ k[j] / math.sqrt(dn + dr)
                out[bi, i, head] = softmax(s) @ v
    return np.einsum("btnv,nvd->btd", out, p["out"]["kernel"])


def reference_differential(cfg, p, x, pos, seg, layer=0):
    """Ye et al. 2024 eqs. 1-3: (softmax(Q1K1) - lambda softmax(Q2K2)) V, per-head RMSNorm, x(1 - lambda_init)."""
    a, h, eps = cfg.attention, cfg.head_dim, cfg.norm_eps
    p = _np(p)
    half, g = h // 2, a.n_heads // a.kv_heads
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * layer)  # the paper's l is 1-based: l - 1 = layer
    lam = math.exp(p["lambda_q1"] @ p["lambda_k1"]) - math.exp(p["lambda_q2"] @ p["lambda_k2"]) + lam_init
    out = np.zeros((B, T, a.n_heads, h))
    for bi in range(B):
        for head in range(a.n_heads):
            q, k, v = _head_qkv(p, x[bi], head, head // g)

            def rot(z, part):
                return np.stack([rope_vec(z[i, part * half : (part + 1) * half], pos[bi, i], cfg.rope_theta)
                                 for i in range(T)])  # fmt: skip

            q1, q2, k1, k2 = rot(q, 0), rot(q, 1), rot(k, 0), rot(k, 1)
            for i in range(T):
                s1, s2 = np.full(T, -np.inf), np.full(T, -np.inf)
                for j in range(T):
                    if _visible(cfg, pos, seg, bi, i, j):
                        s1[j], s2[j] = q1[i] @ k1[j] / math.sqrt(half), q2[i] @ k2[j] / math.sqrt(half)
                o = (softmax(s1) - lam * softmax(s2)) @ v
                out[bi, i, head] = rmsnorm(o, p["subln"]["scale"], eps) * (1 - lam_init)
    return np.einsum("btnh,nhd->btd", out, p["out"]["kernel"])


# ---- each kind/option against its reference ----------------------------------------------------------

MHA_CASES = {
    "causal": ("causal", {}),
    "nope": ("nope", {}),
    "local": ("local", {"local": {"window": 3}}),
    "qk_norm": ("causal", {"qk_norm": True}),
    "softcap": ("causal", {"logit_softcap": 2.0}),  # binds on the sharpened scores
    "sinks": ("causal", {"sinks": True}),
    "local+sinks+softcap+qk_norm": (
        "local",
        {"local": {"window": 4}, "sinks": True, "logit_softcap": 0.7, "qk_norm": True},
    ),  # fmt: skip
}


@pytest.mark.parametrize("impl", ["einsum", "fused"])
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_mha_kinds_and_options_equal_the_numpy_reference(case, impl):
    kind, att = MHA_CASES[case]
    cfg = cfg_of(kind, impl=impl, **att)
    got, p = run_layer(cfg, kind)
    x, pos, seg = _inputs()
    want = reference_mha(cfg, p, x.astype(np.float64), pos, seg,
                         window=cfg.attention.local.window if kind == "local" else None, nope=kind == "nope")  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("q_lora_rank", [None, 16], ids=["full-rank-q", "q-lora"])
def test_mla_equals_the_numpy_reference(q_lora_rank):
    cfg = cfg_of("mla", mla={"q_lora_rank": q_lora_rank, "kv_lora_rank": 12, "qk_nope_head_dim": 8,
                             "qk_rope_head_dim": 4, "v_head_dim": 6})  # fmt: skip
    got, p = run_layer(cfg, "mla")
    x, pos, seg = _inputs()
    assert p["out"]["kernel"].shape == (4, 6, 32)  # v_head_dim of its own
    np.testing.assert_allclose(np.asarray(got), reference_mla(cfg, p, x.astype(np.float64), pos, seg),
                               rtol=RTOL, atol=ATOL)  # fmt: skip


@pytest.mark.parametrize("layer", [0, 5])
def test_differential_equals_the_numpy_reference(layer):
    cfg = cfg_of("differential")
    got, p = run_layer(cfg, "differential", layer=layer)
    x, pos, seg = _inputs()
    want = reference_differential(cfg, p, x.astype(np.float64), pos, seg, layer)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


# ---- properties ------------------------------------------------------------------------------------


def _rel_diff(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_window_at_least_the_sequence_equals_causal_attention():
    causal, p = run_layer(cfg_of("causal"), "causal")
    local, _ = run_layer(cfg_of("local", local={"window": T}), "local", params=p)
    narrow, _ = run_layer(cfg_of("local", local={"window": 3}), "local", params=p)
    np.testing.assert_allclose(np.asarray(local), np.asarray(causal), rtol=1e-6, atol=1e-6)
    assert _rel_diff(narrow, causal) > 0.01


@pytest.mark.parametrize("impl", ["einsum", "fused"])
def test_local_output_does_not_depend_on_tokens_beyond_the_window(impl):
    w = 3
    cfg = cfg_of("local", impl=impl, local={"window": w})
    _, p = run_layer(cfg, "local")
    x, pos, seg = _inputs()
    seg = np.ones_like(seg)  # one document per row: only the window limits what is seen
    pos = np.tile(np.arange(T), (B, 1))
    mod = ATTENTION.get("local")(cfg)
    ctx = training_context(jnp.asarray(pos), jnp.asarray(seg), True)
    # d out[row 0, query i] / d x[row 0, key j] for every (i, j): [T, D, T, D] -> |.| summed to [T, T]
    jac = jax.jacrev(lambda x: mod.apply({"params": p}, x, ctx)[0])(jnp.asarray(x))[:, :, 0]
    dep_TT = np.abs(np.asarray(jac)).sum(axis=(1, 3))
    dist = np.arange(T)[:, None] - np.arange(T)[None, :]
    assert np.all(dep_TT[(dist >= w) | (dist < 0)] == 0.0)  # nothing beyond the window (or ahead)
    assert np.all(dep_TT[(dist >= 0) & (dist < w)] > 1e-6)  # everything inside it


def test_softcap_with_a_huge_cap_equals_no_cap():
    base, p = run_layer(cfg_of("causal", impl="fused"), "causal")
    capped, _ = run_layer(cfg_of("causal", impl="fused", logit_softcap=1e6), "causal", params=p)
    tight, _ = run_layer(cfg_of("causal", impl="fused", logit_softcap=2.0), "causal", params=p)
    np.testing.assert_allclose(np.asarray(capped), np.asarray(base), rtol=1e-5, atol=1e-6)
    assert _rel_diff(tight, base) > 0.01


def test_differential_with_lambda_zero_equals_one_softmax_attention():
    cfg = cfg_of("differential")
    layer = 2
    _, p = run_layer(cfg, "differential", layer=layer)
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * layer)
    half = cfg.head_dim // 2
    # lambda = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init = 1 - (1 + lambda_init) + lambda_init = 0
    p = dict(p, lambda_q1=jnp.zeros(half), lambda_k1=jnp.zeros(half),
             lambda_q2=jnp.zeros(half).at[0].set(math.sqrt(math.log(1 + lam_init))),
             lambda_k2=jnp.zeros(half).at[0].set(math.sqrt(math.log(1 + lam_init))))  # fmt: skip
    got, _ = run_layer(cfg, "differential", params=p, layer=layer)
    # One softmax attention over the first halves (the second map has weight 0), then the head norm.
    x, pos, seg = _inputs()
    pn = _np(p)
    g = cfg.attention.n_heads // cfg.attention.kv_heads
    out = np.zeros((B, T, 4, cfg.head_dim))
    for bi in range(B):
        for head in range(4):
            q = x[bi] @ pn["query"]["kernel"][:, head, :half]
            k = x[bi] @ pn["key"]["kernel"][:, head // g, :half]
            v = x[bi] @ pn["value"]["kernel"][:, head // g]
            q = np.stack([rope_vec(q[i], pos[bi, i], cfg.rope_theta) for i in range(T)])
            k = np.stack([rope_vec(k[i], pos[bi, i], cfg.rope_theta) for i in range(T)])
            for i in range(T):
                s = np.array([q[i] @ k[j] / math.sqrt(half) if _visible(cfg, pos, seg, bi, i, j) else -np.inf
                              for j in range(T)])  # fmt: skip
                out[bi, i, head] = rmsnorm(softmax(s) @ v, pn["subln"]["scale"], cfg.norm_eps) * (
                    1 - lam_init
                )
    want = np.einsum("btnh,nhd->btd", out, pn["out"]["kernel"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


def test_nope_every_drops_rotation_on_every_kth_layer_only():
    cfg = cfg_of("causal", n_layers=6, nope_every=3)
    assert [s.nope for s in layout.layer_specs(cfg)] == [False, False, True, False, False, True]
    # NoPE layers ignore positions: with every layer NoPE (nope_every=1), the model's logits are
    # the same for the true positions and for all-zero ones; with RoPE layers they are not.
    tokens = jax.random.randint(jax.random.PRNGKey(4), (B, T), 0, 64)
    zeros = jnp.zeros((B, T), jnp.int32)

    def logits(cfg, positions):
        model = Transformer(cfg)
        p = sharpen(nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"]))
        return model.apply({"params": p}, tokens, positions)

    all_nope = cfg_of("causal", nope_every=1)
    np.testing.assert_allclose(logits(all_nope, zeros), logits(all_nope, None), rtol=1e-6, atol=1e-6)
    rope = cfg_of("causal")
    assert _rel_diff(logits(rope, zeros), logits(rope, None)) > 1e-3


def test_final_logit_softcap_and_the_logit_monitor():
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, 64)
    cfg = dataclasses.replace(cfg_of("causal"), monitor_logits=True)
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    raw, state = model.apply({"params": params}, tokens, mutable=["metrics"])
    from llm.model.channels import layer_metrics

    m = layer_metrics(state["metrics"], cfg)
    assert float(m["logit_max"]) == pytest.approx(float(jnp.max(raw)), rel=1e-6)
    per_layer = [float(m[f"attn_logit_max/layer_{i}"]) for i in range(2)]
    assert float(m["attn_logit_max"]) == pytest.approx(max(per_layer))
    capped = Transformer(dataclasses.replace(cfg, final_logit_softcap=0.05)).apply({"params": params}, tokens)
    np.testing.assert_allclose(
        np.asarray(capped), 0.05 * np.tanh(np.asarray(raw) / 0.05), rtol=1e-5, atol=1e-7
    )


def test_attention_logit_max_is_the_largest_visible_score():
    cfg = dataclasses.replace(cfg_of("local", local={"window": 3}, impl="fused"), monitor_logits=True)
    x, pos, seg = _inputs()
    mod = ATTENTION.get("local")(cfg)
    ctx = training_context(jnp.asarray(pos), jnp.asarray(seg), True)
    p = nn.meta.unbox(mod.init(jax.random.PRNGKey(0), jnp.asarray(x), ctx)["params"])
    _, state = mod.apply({"params": p}, jnp.asarray(x), ctx, mutable=["metrics"])
    got = float(jax.tree.leaves(state["metrics"])[0])
    # Largest q.k/sqrt(h) over visible pairs, from the reference's projections.
    _, state_i = mod.apply({"params": p}, jnp.asarray(x), ctx, mutable=["intermediates"])
    logits = np.asarray(jax.tree.leaves(state_i["intermediates"]["attn_logits"])[0])
    assert got == pytest.approx(float(logits[logits > -1e29].max()), rel=1e-5)


def test_scanned_layer_index_reaches_differential_lambda_init():
    """Scanned and unrolled stacks of differential layers give the same logits: each layer sees
    its own depth (lambda_init differs per layer) whether the scan or the loop calls it."""
    tokens = jax.random.randint(jax.random.PRNGKey(2), (B, T), 0, 64)
    unrolled = cfg_of("differential", n_layers=4, pattern=("differential", "causal"))
    scanned = dataclasses.replace(unrolled, scan_layers=True)
    p = nn.meta.unbox(Transformer(unrolled).init(jax.random.PRNGKey(0), tokens)["params"])
    want = Transformer(unrolled).apply({"params": p}, tokens)
    got = Transformer(scanned).apply({"params": layout.to_layout(p, scanned)}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


# ---- cached decode ------------------------------------------------------------------------------

DECODE_CASES = {
    "causal+options": ("causal", {"qk_norm": True, "logit_softcap": 2.0, "sinks": True}),
    "nope_every": ("causal", {"nope_every": 2}),
    "local-ring-wraps": ("local", {"local": {"window": 4}, "sinks": True}),
    "gemma2-pattern": ("local", {"local": {"window": 4}, "pattern": ("local", "causal")}),
    "mla": (
        "mla",
        {"mla": {"kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6}},
    ),
    "mla-absorb": (
        "mla",
        {
            "mla": {
                "q_lora_rank": 16,
                "kv_lora_rank": 12,
                "qk_nope_head_dim": 8,
                "qk_rope_head_dim": 4,
                "v_head_dim": 6,
                "absorb": True,
            }
        },
    ),  # fmt: skip
    "differential": ("differential", {}),
}


def _decode_all(model, params, tokens, prompt):
    """Logits of a left-padded prefill of `prompt` tokens then one cached step per token."""
    from llm.infer import engine

    b, n = tokens.shape
    cache = engine.init_cache(model, b, n)
    sizes = [jax.tree.map(lambda a: a.shape, cache)]
    logits, cache = engine.prefill(model, params, tokens[:, :prompt], jnp.full((b,), prompt), cache)
    out = [logits]
    decode_step = jax.jit(lambda p, tok, pos, c: engine.decode_step(model, p, tok, pos, c))
    for t in range(prompt, n):
        step, cache = decode_step(params, tokens[:, t], jnp.full((b,), t), cache)
        out.append(step[:, None])
        sizes.append(jax.tree.map(lambda a: a.shape, cache))
    return jnp.concatenate(out, axis=1), cache, sizes


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_prefill_and_cached_decode_equal_the_full_forward(case, scan):
    kind, att = DECODE_CASES[case]
    cfg = dataclasses.replace(cfg_of(kind, n_layers=2, impl="fused", **att), scan_layers=scan)
    n = 16  # 4x the local window
    tokens = jax.random.randint(jax.random.PRNGKey(6), (B, n), 0, 64)
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    if cfg.attention.sinks:  # nonzero sinks so the decode path must carry them
        params = jax.tree_util.tree_map_with_path(
            lambda path, a: a + 0.7 if "sinks" in jax.tree_util.keystr(path) else a, params
        )
    full = model.apply({"params": params}, tokens)
    got, cache, sizes = _decode_all(model, params, tokens, prompt=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=1e-4, atol=1e-5)
    assert all(s == sizes[0] for s in sizes)  # no cache entry grows while decoding
    leaves = {jax.tree_util.keystr(path): a.shape for path, a in jax.tree_util.tree_leaves_with_path(cache)}
    if kind == "local":
        ring = [shape for path, shape in leaves.items() if "ring_key" in path]
        assert ring and all(4 in shape for shape in ring)  # window slots, not 16 tokens
        if "pattern" not in att:  # Mistral-style: no layer keeps a full-length K/V cache
            assert not [p for p in leaves if "cached_key" in p]
    if kind == "mla":  # only the latent and the shared rotary key are cached
        assert not [p for p in leaves if "cached_key']" in p or "cached_value" in p]
        lat = [shape for path, shape in leaves.items() if "cached_latent" in path]
        assert lat and all(shape[-1] == 12 for shape in lat)


def test_mla_absorbed_decode_equals_the_naive_decode():
    mla = {"kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6}
    naive_cfg, absorb_cfg = cfg_of("mla", mla=mla), cfg_of("mla", mla={**mla, "absorb": True})
    tokens = jax.random.randint(jax.random.PRNGKey(3), (B, 10), 0, 64)
    params = nn.meta.unbox(Transformer(naive_cfg).init(jax.random.PRNGKey(0), tokens)["params"])
    naive, _, _ = _decode_all(Transformer(naive_cfg), params, tokens, prompt=4)
    absorbed, _, _ = _decode_all(Transformer(absorb_cfg), params, tokens, prompt=4)
    np.testing.assert_allclose(np.asarray(absorbed), np.asarray(naive), rtol=1e-4, atol=1e-5)


def test_mla_caches_fewer_bytes_per_token_than_mha():
    from llm.infer import engine

    def cache_bytes(cfg):
        cache = engine.init_cache(Transformer(cfg), 1, 32)
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache) if a.ndim >= 3)

    mla = cache_bytes(cfg_of("mla", mla={"kv_lora_rank": 12, "qk_rope_head_dim": 4}))
    mha = cache_bytes(
        dataclasses.replace(cfg_of("causal"), attention=AttentionConfig(n_heads=4, n_kv_heads=4))
    )
    # per token and layer: MLA (12 + 4) floats, MHA 2 * 4 heads * 8 dims = 64
    assert mla * 64 == mha * 16


# ---- meshes -----------------------------------------------------------------------------------------

MESH_CASES = {
    "local+qk_norm+softcap+sinks": {
        "model.attention.kind": "local",
        "model.attention.local.window": 8,
        "model.attention.qk_norm": True,
        "model.attention.logit_softcap": 20.0,
        "model.attention.sinks": True,
    },  # fmt: skip
    "mla": {"model.attention.kind": "mla", "model.attention.mla.q_lora_rank": 16},
    "differential+nope_every": {"model.attention.kind": "differential", "model.attention.nope_every": 2},
    # Infini-attention's memory (M, z) is sharded along kv heads with the projections.
    "infini": {
        "model.attention.kind": "infini",
        "model.attention.infini.segment_len": 16,
        "model.attention.infini.update_rule": "delta",
    },  # fmt: skip
}
MESHES = [(2, 2, 1, 2), (1, 4, 1, 2)]  # (data, fsdp, expert, tensor)
MESH_STEPS = 4


@pytest.mark.parametrize("case", list(MESH_CASES))
def test_two_meshes_train_like_one_device(case, tmp_path):
    from llm.data import pipeline
    from llm.train import loop
    from tests.test_train import tiny_cfg

    def build(mesh):
        keys = ("mesh.data", "mesh.fsdp", "mesh.expert", "mesh.tensor")
        cfg = tiny_cfg("llama", **{**MESH_CASES[case], "train.steps": MESH_STEPS, "train.eval_every": 0,
                                   "model.attention.impl": "fused", **dict(zip(keys, mesh))})  # fmt: skip
        exp = loop.build(cfg, str(tmp_path / "w"), devices=jax.devices()[: int(np.prod(mesh))])
        return exp, loop.compile_steps(exp)[0]

    def losses(exp, fn, state):
        ds = pipeline.train_dataset(exp.train_windows, exp.cfg.train.batch_size, exp.cfg.data.seed)
        out = []
        for i in range(MESH_STEPS):
            state, m = fn(state, loop.to_global(exp, ds[i]))
            out.append(float(m["loss"]))
        return out

    ref_exp, ref_fn = build((1, 1, 1, 1))
    init = jax.device_get(ref_exp.trainer.init_state())
    want = losses(ref_exp, ref_fn, jax.device_put(init, ref_exp.state_shardings))
    assert want[-1] < want[0]
    for mesh in MESHES:
        exp, fn = build(mesh)
        got = losses(exp, fn, jax.device_put(init, exp.state_shardings))
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"mesh {mesh}")
