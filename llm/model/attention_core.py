"""Attention's core (scores, mask, softmax, weighted values) as one op with a hand-written backward.

`model.attention.impl=fused`. Same math as the `einsum` reference; what differs is the program
XLA gets, laid out for XLA:CPU's fast matmul path (llm/model/dots.py): every batched matmul is
canonical (batch dims first, contracting dim last on the left and first on the right) with an f32
result, in the backward too. Only the small [B, T, H]-sized q, k, v and dO are transposed; the
[T, S] score-sized tensors never are. Autodiff of the reference instead transposes the
probabilities and the score gradient (4x larger at head_dim 64, seq 256) for the key and value
gradients, and in bf16 hands two of the six matmuls an f32 operand (so they run at the f32 rate).

The backward uses the flash-attention identity rowsum(P * dP) = rowsum(dO * O), so the softmax
gradient is one elementwise pass over [T, S]: dS = P * (dP - rowsum(dO * O)).

Options (each with its backward here, so the kinds that use them keep the fast path):
- `softcap` C (Gemma-2): scores -> C * tanh(scores / C) before the mask; dS picks up 1 - tanh^2.
- `sink_N` (gpt-oss, StreamingLLM): one learned logit per head joins every row's softmax
  denominator without a value (it absorbs probability mass); its gradient is -sum(p_sink * delta).
- `scale`: the score scale when it is not 1/sqrt(q's head dim) (MLA's absorbed decode).
- `want_max`: also return the largest valid (capped) score per batch row and kv head, for the
  instability monitor.
- `query_block` (`model.attention.query_block`): for a causal mask in a full-sequence pass (no
  query sees a later key; the caller vouches), query rows go in blocks of this many, each against
  the keys up to its block's end only: of n blocks' score work (n + 1) / 2n is done (3/4 at n = 2),
  the masked rest is skipped. Each block is the same core with its own backward; results are equal.
q and k share a head dim; v's may differ (MLA).

Layouts: B batch, K kv heads, G query heads per kv head, Q = G*T query rows of one kv head (GQA
shares k and v across them without copies), S key positions, H head_dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Masked scores, here and in the einsum path: finite, so an all-masked row is uniform, not NaN.
NEG_INF = -1e30


def causal_core(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, matmul_dtype=None, *, scale=None, softcap=None, sink_N=None,
                want_max: bool = False, query_block: int = 0):  # fmt: skip
    """softmax(q k^T * scale, masked) v for N query and K key/value heads; [B, T, N, Hv] out
    (and, with want_max, the max valid score [B, K]).

    Matmul inputs are in `matmul_dtype` when given (autocast) or the inputs' dtype; scores,
    softmax and accumulation are f32; the result has q's dtype. `query_block` > 0 asserts the mask
    is causal in index order (see the module docstring) and skips its masked upper blocks.
    """
    b, t, n, h = q_BTNH.shape
    if 0 < query_block < t and t == k_BSKH.shape[1] and t % query_block == 0:
        kw = dict(
            scale=h**-0.5 if scale is None else scale, softcap=softcap, sink_N=sink_N, want_max=want_max
        )
        blocks = [
            causal_core(q_BTNH[:, i : i + query_block], k_BSKH[:, : i + query_block], v_BSKH[:, : i + query_block],
                        mask_B1TS[:, :, i : i + query_block, : i + query_block], matmul_dtype, **kw)
            for i in range(0, t, query_block)
        ]  # fmt: skip
        if not want_max:
            return jnp.concatenate(blocks, axis=1)
        return jnp.concatenate([o for o, _ in blocks], axis=1), jnp.max(
            jnp.stack([m for _, m in blocks]), axis=0
        )
    kv, hv = k_BSKH.shape[2], v_BSKH.shape[-1]
    g = n // kv
    out_dtype = q_BTNH.dtype
    mm = jnp.dtype(matmul_dtype) if matmul_dtype is not None and out_dtype == jnp.float32 else out_dtype
    # The score scale goes into q ([B, K, Q, H], fused into its layout copy; autodiff scales dq the
    # same way) rather than onto the 4x larger [Q, S] scores and their gradient, where XLA:CPU read
    # a materialised broadcast of the scalar in the backward's dS pass.
    scale = h**-0.5 if scale is None else float(scale)
    q_BKQH = (
        q_BTNH.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h) * scale
    ).astype(mm)
    kt_BKHS = k_BSKH.transpose(0, 2, 3, 1).astype(mm)
    v_BKSH = v_BSKH.transpose(0, 2, 1, 3).astype(mm)
    # One sink logit per query row (rows are kv-head-major, then the G heads, then T).
    sink_KQ = None if sink_N is None else jnp.repeat(sink_N.astype(jnp.float32).reshape(kv, g), t, axis=1)
    opts = (None if softcap is None else float(softcap), want_max)
    o_BKQH, smax_BK = _core(opts, q_BKQH, kt_BKHS, v_BKSH, mask_B1TS, sink_KQ)
    out = o_BKQH.reshape(b, kv, g, t, hv).transpose(0, 3, 1, 2, 4).reshape(b, t, n, hv).astype(out_dtype)
    return (out, smax_BK) if want_max else out


def _mm(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _scores(opts, q_BKQH, kt_BKHS, mask_B1TS):
    """f32 scores [B, K, Q, S] (capped, masked) and tanh(s / C) (None without a cap)."""
    softcap, _ = opts
    b, kv, qr, _ = q_BKQH.shape
    t, s = mask_B1TS.shape[2], kt_BKHS.shape[3]
    s_BKQS = _mm("bkqh,bkhs->bkqs", q_BKQH, kt_BKHS)
    tanh_BKQS = None
    if softcap is not None:
        tanh_BKQS = jnp.tanh(s_BKQS / softcap)
        s_BKQS = softcap * tanh_BKQS
    s_BKGTS = jnp.where(mask_B1TS[:, :, None], s_BKQS.reshape(b, kv, qr // t, t, s), NEG_INF)
    return s_BKGTS.reshape(b, kv, qr, s), tanh_BKQS


def _softmax(s_BKQS, sink_KQ):
    """(probabilities [B, K, Q, S], the sink's probability [B, K, Q, 1] or None)."""
    if sink_KQ is None:
        return jax.nn.softmax(s_BKQS, axis=-1), None
    sink_11KQ1 = sink_KQ[None, :, :, None]
    m = jnp.maximum(jnp.max(s_BKQS, axis=-1, keepdims=True), sink_11KQ1)
    e_BKQS, e_sink = jnp.exp(s_BKQS - m), jnp.exp(sink_11KQ1 - m)
    z = jnp.sum(e_BKQS, axis=-1, keepdims=True) + e_sink
    return e_BKQS / z, e_sink / z


def _score_max(s_BKQS):
    """Largest valid score per batch row and kv head (masked entries are NEG_INF)."""
    return jnp.max(s_BKQS, axis=(2, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(opts, q_BKQH, kt_BKHS, v_BKSH, mask_B1TS, sink_KQ):
    return _core_fwd(opts, q_BKQH, kt_BKHS, v_BKSH, mask_B1TS, sink_KQ)[0]


def _core_fwd(opts, q_BKQH, kt_BKHS, v_BKSH, mask_B1TS, sink_KQ):
    s_BKQS, tanh_BKQS = _scores(opts, q_BKQH, kt_BKHS, mask_B1TS)
    p_BKQS, psink_BKQ1 = _softmax(s_BKQS, sink_KQ)
    o_BKQH = _mm("bkqs,bksh->bkqh", p_BKQS.astype(v_BKSH.dtype), v_BKSH)
    smax_BK = _score_max(s_BKQS) if opts[1] else None
    res = (q_BKQH, kt_BKHS, v_BKSH, mask_B1TS, p_BKQS, o_BKQH, tanh_BKQS, psink_BKQ1, sink_KQ)
    return (o_BKQH, smax_BK), res


_barrier = jax.lax.optimization_barrier


def _t(x):
    """x with its last two dims swapped, materialised: behind the barrier XLA cannot fold the
    transpose back into the matmul, which would make it non-canonical (and slow) again."""
    return _barrier(jnp.swapaxes(x, -1, -2))


def _core_bwd(opts, res, cotangents):
    do_BKQH = cotangents[0]  # the score max (monitoring only) has no gradient
    q_BKQH, kt_BKHS, v_BKSH, mask_B1TS, p_BKQS, o_BKQH, tanh_BKQS, psink_BKQ1, sink_KQ = res
    mm = q_BKQH.dtype
    do_BKQH = do_BKQH.astype(jnp.float32)
    dob_BKQH = do_BKQH.astype(mm)  # matmul input; the f32 copy feeds the rowsum
    # Barriers on matmul results: XLA:CPU would otherwise fuse this matmul into the elementwise dS
    # pass, or fold the transpose of dv^T into its matmul, and run either as an f32 loop.
    dp_BKQS = _barrier(_mm("bkqh,bkhs->bkqs", dob_BKQH, _t(v_BKSH)))
    delta_BKQ1 = jnp.sum(do_BKQH * o_BKQH, axis=-1, keepdims=True)
    ds_BKQS = p_BKQS * (dp_BKQS - delta_BKQ1)
    if tanh_BKQS is not None:  # d(C tanh(s/C))/ds = 1 - tanh^2
        ds_BKQS = ds_BKQS * (1.0 - tanh_BKQS * tanh_BKQS)
    # Masked scores get no gradient (p is 0 there, except in rows with nothing visible: uniform).
    b, kv, qr, s = ds_BKQS.shape
    t = mask_B1TS.shape[2]
    ds_BKQS = jnp.where(mask_B1TS[:, :, None], ds_BKQS.reshape(b, kv, qr // t, t, s), 0.0)
    ds_BKQS = ds_BKQS.reshape(b, kv, qr, s).astype(mm)
    dq_BKQH = _mm("bkqs,bksh->bkqh", ds_BKQS, _t(kt_BKHS))
    # Key and value gradients as [H, S] results: transposes q and dO ([Q, H]), not ds and p ([Q, S]).
    dkt_BKHS = _mm("bkhq,bkqs->bkhs", _t(q_BKQH), ds_BKQS)
    dvt_BKHS = _mm("bkhq,bkqs->bkhs", _t(dob_BKQH), p_BKQS.astype(mm))
    dv_BKSH = jnp.swapaxes(_barrier(dvt_BKHS), -1, -2)
    # The sink has no value (dP_sink = 0): d sink = sum over rows of p_sink * (0 - delta).
    dsink_KQ = None if sink_KQ is None else jnp.sum(-psink_BKQ1 * delta_BKQ1, axis=(0, 3))
    return dq_BKQH.astype(mm), dkt_BKHS.astype(mm), dv_BKSH.astype(mm), None, dsink_KQ


_core.defvjp(_core_fwd, _core_bwd)
