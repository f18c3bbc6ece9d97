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

Layouts: B batch, K kv heads, G query heads per kv head, Q = G*T query rows of one kv head (GQA
shares k and v across them without copies), S key positions, H head_dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Masked scores, here and in the einsum path: finite, so an all-masked row is uniform, not NaN.
NEG_INF = -1e30


def causal_core(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, matmul_dtype=None):
    """softmax(q k^T / sqrt(H) masked) v for N query and K key/value heads; [B, T, N, H] out.

    Matmul inputs are in `matmul_dtype` when given (autocast) or the inputs' dtype; scores,
    softmax and accumulation are f32; the result has q's dtype.
    """
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    g = n // kv
    out_dtype = q_BTNH.dtype
    mm = jnp.dtype(matmul_dtype) if matmul_dtype is not None and out_dtype == jnp.float32 else out_dtype
    q_BKQH = q_BTNH.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h).astype(mm)
    kt_BKHS = k_BSKH.transpose(0, 2, 3, 1).astype(mm)
    v_BKSH = v_BSKH.transpose(0, 2, 1, 3).astype(mm)
    o_BKQH = _core(h**-0.5, q_BKQH, kt_BKHS, v_BKSH, mask_B1TS)
    return o_BKQH.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(out_dtype)


def _mm(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _probs(scale, q_BKQH, kt_BKHS, mask_B1TS):
    """f32 softmax probabilities [B, K, Q, S]."""
    b, kv, qr, _ = q_BKQH.shape
    t, s = mask_B1TS.shape[2], kt_BKHS.shape[3]
    scores_BKGTS = _mm("bkqh,bkhs->bkqs", q_BKQH, kt_BKHS).reshape(b, kv, qr // t, t, s) * scale
    scores_BKGTS = jnp.where(mask_B1TS[:, :, None], scores_BKGTS, NEG_INF)
    return jax.nn.softmax(scores_BKGTS, axis=-1).reshape(b, kv, qr, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(scale, q_BKQH, kt_BKHS, v_BKSH, mask_B1TS):
    return _core_fwd(scale, q_BKQH, kt_BKHS, v_BKSH, mask_B1TS)[0]


def _core_fwd(scale, q_BKQH, kt_BKHS, v_BKSH, mask_B1TS):
    p_BKQS = _probs(scale, q_BKQH, kt_BKHS, mask_B1TS)
    o_BKQH = _mm("bkqs,bksh->bkqh", p_BKQS.astype(v_BKSH.dtype), v_BKSH)
    return o_BKQH, (q_BKQH, kt_BKHS, v_BKSH, mask_B1TS, p_BKQS, o_BKQH)


_barrier = jax.lax.optimization_barrier


def _t(x):
    """x with its last two dims swapped, materialised: behind the barrier XLA cannot fold the
    transpose back into the matmul, which would make it non-canonical (and slow) again."""
    return _barrier(jnp.swapaxes(x, -1, -2))


def _core_bwd(scale, res, do_BKQH):
    q_BKQH, kt_BKHS, v_BKSH, mask_B1TS, p_BKQS, o_BKQH = res
    mm = q_BKQH.dtype
    do_BKQH = do_BKQH.astype(jnp.float32)
    dob_BKQH = do_BKQH.astype(mm)  # matmul input; the f32 copy feeds the rowsum
    # Barriers on matmul results: XLA:CPU would otherwise fuse this matmul into the elementwise dS
    # pass, or fold the transpose of dv^T into its matmul, and run either as an f32 loop.
    dp_BKQS = _barrier(_mm("bkqh,bkhs->bkqs", dob_BKQH, _t(v_BKSH)))
    delta_BKQ1 = jnp.sum(do_BKQH * o_BKQH, axis=-1, keepdims=True)
    ds_BKQS = p_BKQS * (dp_BKQS - delta_BKQ1) * scale
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
    return dq_BKQH.astype(mm), dkt_BKHS.astype(mm), dv_BKSH.astype(mm), None


_core.defvjp(_core_fwd, _core_bwd)
