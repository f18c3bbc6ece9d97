"""Matmuls of the dense layers in the forms XLA:CPU runs fastest, forward and backward.

XLA:CPU hands a dot to its fast library (YNNPACK) only when the dot is "canonical": one flattened
contracting block, last on the left operand and first on the right. bf16 dots get the bf16
dot-product instructions only with bf16 inputs and an f32 result; otherwise XLA converts both
operands to f32 and runs at (or below) the f32 rate. Measured on a 2-core AVX-512-BF16 CPU
(benchmarks/README.md), one core, per matmul: f32 ~240 GFLOP/s canonical vs ~180 with two
contracting dims; bf16 ~480 canonical with f32 result vs ~200 with a bf16 result.

`dot_general` (same signature as lax.dot_general, passed to flax layers as `dot_general=`) and
`attend` (the tied output head) therefore flatten the contracting dims, accumulate in f32 and,
through a custom VJP, give the two gradient matmuls the same fast forms. Numerics equal XLA's own
bf16 dots (f32 accumulation, one rounding of the result); f32 math is unchanged. Off CPU they
are plain lax.dot_general / jnp.dot, so TPU and GPU programs do not change.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

_barrier = lax.optimization_barrier


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _autocast(matmul_dtype, *xs):
    """(xs cast to matmul_dtype, f32) for f32 operands under autocast; (xs, None) otherwise."""
    if (
        matmul_dtype is None
        or any(x.dtype != jnp.float32 for x in xs)
        or jnp.dtype(matmul_dtype) == jnp.float32
    ):
        return xs, None
    return tuple(x.astype(matmul_dtype) for x in xs), jnp.dtype(jnp.float32)


@functools.cache
def dot_general_for(matmul_dtype: str | None):
    """The `dot_general=` for flax layers of a model with this ModelConfig.matmul_dtype."""
    return dot_general if matmul_dtype is None else functools.partial(dot_general, matmul_dtype=matmul_dtype)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *, matmul_dtype=None,
                **kwargs):  # fmt: skip
    """lax.dot_general; on CPU, dense-layer contractions (no batch dims) use `_dense` instead.

    With `matmul_dtype` (autocast), f32 operands are cast to it and the result comes back in f32.
    """
    if preferred_element_type in (None, jnp.float32):
        (lhs, rhs), back = _autocast(matmul_dtype, lhs, rhs)
        if back is not None:
            return dot_general(lhs, rhs, dimension_numbers, precision, **kwargs).astype(back)
    (lc, rc), (lb, rb) = dimension_numbers
    k = len(lc)
    dense = (
        not lb and not rb and k > 0 and tuple(lc) == tuple(range(lhs.ndim - k, lhs.ndim))
        and tuple(rc) == tuple(range(k)) and lhs.dtype == rhs.dtype and lhs.dtype in (jnp.float32, jnp.bfloat16)
        and preferred_element_type in (None, lhs.dtype) and not kwargs and _on_cpu()
    )  # fmt: skip
    if not dense:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)  # fmt: skip
    return _dense(lhs, rhs, k, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x, w, k: int, precision):
    """x [..., K1..Kk] @ w [K1..Kk, ...] as one [M, K] @ [K, N] matmul with an f32 accumulator."""
    return _dense_fwd(x, w, k, precision)[0]


def _flat(x, w, k):
    kk = math.prod(w.shape[:k])
    return x.reshape(*x.shape[: x.ndim - k], kk), w.reshape(kk, -1)


def _dense_fwd(x, w, k, precision):
    x2, w2 = _flat(x, w, k)
    y = jnp.einsum("...k,kn->...n", x2, w2, precision=precision, preferred_element_type=jnp.float32)
    return y.astype(x.dtype).reshape(*x.shape[: x.ndim - k], *w.shape[k:]), (x, w)


def _tn_transposed(a_MA, b_MB, precision=None):
    """(a^T @ b)^T, [B, A] in f32, as one canonical dot: a^T and the [A, B] product materialised
    behind barriers. Without them XLA folds both transposes into the dot's dimension numbers, and at
    some shapes the dot it keeps contracts a leading dim, which YNNPACK does not take (XLA's slow
    fallback kernel runs it; tests/test_dots.py checks that no such dot is left)."""
    at_AM = _barrier(a_MA.T)
    return _barrier(jnp.dot(at_AM, b_MB, precision=precision, preferred_element_type=jnp.float32)).T


def _dense_bwd(k, precision, res, g):
    x, w = res
    x2, w2 = _flat(x, w, k)
    g2 = g.reshape(*g.shape[: x.ndim - k], -1).astype(x.dtype)
    f32 = jnp.float32
    # dx = g @ w^T keeps w [K, N] as the right operand (contracting its last dim is a supported form);
    # dw = x^T @ g contracts over all leading (batch, time) dims, which XLA canonicalises itself.
    dx = jnp.einsum("...n,kn->...k", g2, w2, precision=precision, preferred_element_type=f32)
    kk, n = w2.shape
    if kk >= 4 * n and x.dtype == jnp.float32:
        # A layer that narrows 4x (GPT-2's fc_out): dw = (g^T @ x)^T transposes the narrow gradient
        # [M, N] instead of the wide input [M, K], which XLA would transpose inside the fusion that
        # makes it (GELU's tanh recomputed in a strided loop). step_ab, 2 devices: gpt12m +8.0%,
        # gpt100m +8%. Not in bf16 (autocast), where the plain form was faster (gpt100m 1.07-1.12x,
        # gpt12m 1.03x: the transposed input is the bf16 cast, half the bytes), nor for SwiGLU's
        # 2.75x down projection (0.97x: its product is cheap to recompute).
        dw = _tn_transposed(g2.reshape(-1, n), x2.reshape(-1, kk), precision)
    else:
        lead = "abcdefgh"[: x2.ndim - 1]
        dw = jnp.einsum(f"{lead}k,{lead}n->kn", x2, g2, precision=precision, preferred_element_type=f32)
    return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype).reshape(w.shape)


_dense.defvjp(_dense_fwd, _dense_bwd)


def attend(x_BTD, table_VD, matmul_dtype=None):
    """Logits of the tied output head, x @ table^T (in f32 on CPU the table's gradient is computed
    as (x^T @ g)^T: that transposes the small [B*T, D] input instead of the [B*T, V] gradient)."""
    (x_BTD, table_VD), back = _autocast(matmul_dtype, x_BTD, table_VD)
    if back is not None:
        return attend(x_BTD, table_VD).astype(back)
    if not (_on_cpu() and x_BTD.dtype == table_VD.dtype and x_BTD.dtype in (jnp.float32, jnp.bfloat16)):
        return jnp.dot(x_BTD, table_VD.T)
    return _attend(x_BTD, table_VD)


@jax.custom_vjp
def _attend(x, table):
    return _attend_fwd(x, table)[0]


def _attend_fwd(x, table):
    y = jnp.einsum("...d,vd->...v", x, table, preferred_element_type=jnp.float32)
    return y.astype(x.dtype), (x, table)


def _attend_bwd(res, g):
    x, table = res
    g = g.astype(x.dtype)
    f32 = jnp.float32
    dx = jnp.einsum("...v,vd->...d", g, table, preferred_element_type=f32)
    lead = "abcdefgh"[: x.ndim - 1]
    if x.dtype == jnp.bfloat16:
        # (x^T g)^T would transpose the small input, but XLA:CPU then emits a bf16 dot its
        # fallback kernel cannot run ("Unsupported element type for DotThunk"): contract g first.
        d_table = jnp.einsum(f"{lead}v,{lead}d->vd", g, x, preferred_element_type=f32)
    else:
        # At one CPU device (the whole batch) the unbarriered form ran on XLA's slow fallback kernel:
        # 38 of 613 ms per step of the default model on one core.
        d_table = _tn_transposed(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))
    return dx.astype(x.dtype), d_table.astype(table.dtype)


_attend.defvjp(_attend_fwd, _attend_bwd)


def einsum(spec: str, a, b, out_dtype=None, matmul_dtype=None):
    """Two-operand einsum (attention's batched matmuls) with an f32 accumulator, cast to out_dtype.

    On CPU with bf16 operands a custom VJP keeps the two gradient einsums in the same fast form
    (bf16 inputs, f32 result): autodiff would feed them the f32 cotangent, and XLA:CPU then
    upcasts the bf16 operand and runs the matmul at the f32 rate. Elsewhere it is jnp.einsum.
    Every index of `a` must appear in `b` or the output (and likewise for `b`), as in attention.
    With `matmul_dtype` (autocast), f32 operands are cast to it; out_dtype still defaults to theirs.
    """
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    (a, b), _ = _autocast(matmul_dtype, a, b)
    if not (_on_cpu() and a.dtype == b.dtype == jnp.bfloat16):
        pref = jnp.float32 if out_dtype == jnp.float32 else None
        return jnp.einsum(spec, a, b, preferred_element_type=pref).astype(out_dtype)
    return _einsum(spec, out_dtype, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _einsum(spec, out_dtype, a, b):
    return _einsum_fwd(spec, out_dtype, a, b)[0]


def _einsum_fwd(spec, out_dtype, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype), (a, b)


def _einsum_bwd(spec, out_dtype, res, g):
    a, b = res
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    g = g.astype(a.dtype)
    da = jnp.einsum(f"{out},{sb}->{sa}", g, b, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{sa},{out}->{sb}", a, g, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)
