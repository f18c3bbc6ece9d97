"""llm/model/dots.py: the CPU fast-form matmuls equal plain jnp math, values and gradients.

The reference is computed in float64-free numpy-precision f32 from the same (bf16-rounded) inputs,
so the bf16 tolerance only covers the one rounding of each result to bf16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from llm.model import dots

F32_TOL = dict(rtol=2e-5, atol=2e-5)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)  # one bf16 rounding (8 mantissa bits) of O(1) values


def _rand(key, shape, dtype):
    return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32).astype(dtype)


def _check(fn, ref, args, dtype):
    """fn(*args) == ref(*args) and their gradients of sum(out * w) agree."""
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    out, ref_out = fn(*args), ref(*[a.astype(jnp.float32) for a in args])
    assert out.shape == ref_out.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out), **tol)
    w = _rand(99, out.shape, jnp.float32)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w), argnums=tuple(range(len(args))))(
        *args
    )
    ref_grads = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=tuple(range(len(args))))(
        *[a.astype(jnp.float32) for a in args]
    )
    for g, r, a in zip(grads, ref_grads, args):
        assert g.dtype == a.dtype and g.shape == a.shape
        scale = float(jnp.max(jnp.abs(r))) or 1.0  # gradients sum many terms: compare relative to their size
        np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(r) / scale, **tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "x_shape, w_shape",
    [((2, 5, 4, 8), (4, 8, 3, 6)),  # two contracting dims
     ((2, 5, 32), (32, 8))],  # narrows 4x: the weight gradient is taken as (g^T x)^T
)  # fmt: skip
def test_dense_dot_general_matches_lax(dtype, x_shape, w_shape):
    x, w = _rand(0, x_shape, dtype), _rand(1, w_shape, dtype)
    k = len(x_shape) - 2 if len(w_shape) == 4 else 1
    dn = (tuple(range(len(x_shape) - k, len(x_shape))), tuple(range(k))), ((), ())
    _check(lambda a, b: dots.dot_general(a, b, dn), lambda a, b: lax.dot_general(a, b, dn), (x, w), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tied_head_attend_matches_dot(dtype):
    x, table = _rand(2, (3, 7, 16), dtype), _rand(3, (40, 16), dtype)
    _check(dots.attend, lambda a, b: jnp.dot(a, b.T), (x, table), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "spec, sa, sb",
    [
        ("btkgh,bskh->bkgts", (2, 6, 2, 3, 8), (2, 6, 2, 8)),
        ("bkgts,bskh->btkgh", (2, 2, 3, 6, 6), (2, 6, 2, 8)),
    ],
)
def test_attention_einsum_matches_jnp(dtype, spec, sa, sb):
    a, b = _rand(4, sa, dtype), _rand(5, sb, dtype)
    _check(lambda x, y: dots.einsum(spec, x, y, out_dtype=jnp.float32), lambda x, y: jnp.einsum(spec, x, y), (a, b),
           dtype)  # fmt: skip
    assert dots.einsum(spec, a, b).dtype == dtype  # out_dtype defaults to the operands' dtype


def _bf16_round(x):
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def test_autocast_casts_matmul_inputs_and_returns_f32():
    """matmul_dtype=bfloat16 on f32 operands == f32 math on bf16-rounded inputs, result in f32."""
    x, w = _rand(6, (3, 5, 16), jnp.float32), _rand(7, (16, 12), jnp.float32)
    dn = (((2,), (0,)), ((), ()))
    out = dots.dot_general(x, w, dn, matmul_dtype="bfloat16")
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, lax.dot_general(_bf16_round(x), _bf16_round(w), dn), **BF16_TOL)
    assert not np.allclose(out, lax.dot_general(x, w, dn), rtol=1e-6, atol=1e-6)  # really went through bf16
    g = jax.grad(lambda a: jnp.sum(dots.dot_general(a, w, dn, matmul_dtype="bfloat16")))(x)
    assert g.dtype == jnp.float32
    table = _rand(8, (40, 16), jnp.float32)
    logits = dots.attend(x, table, "bfloat16")
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, jnp.dot(_bf16_round(x), _bf16_round(table).T), **BF16_TOL)
    q, k = _rand(9, (2, 6, 2, 3, 8), jnp.float32), _rand(10, (2, 6, 2, 8), jnp.float32)
    s = dots.einsum("btkgh,bskh->bkgts", q, k, matmul_dtype="bfloat16")
    assert s.dtype == jnp.float32
    np.testing.assert_allclose(s, jnp.einsum("btkgh,bskh->bkgts", _bf16_round(q), _bf16_round(k)), **BF16_TOL)


def _unfused_dots(compiled_text: str) -> list[str]:
    """Dots XLA:CPU left outside a YNNPACK fusion: those run on its slow fallback kernel."""
    comp, found = None, []
    for line in compiled_text.splitlines():
        if line and not line.startswith(" "):
            comp = line.split(" ")[1 if line.startswith("ENTRY") else 0]
        if " dot(" in line and comp and "fused_computation" not in comp:
            found.append(line.strip()[:160])
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's matmul library")
def test_tied_head_table_gradient_stays_on_the_fast_matmul_path():
    """At the default model's one-device shape XLA folded the table gradient's transposes into a dot
    contracting the logits gradient's leading dim, which YNNPACK does not run (38 ms of a 613 ms
    step on one core); the barriers in `_attend_bwd` keep both matmuls canonical."""
    x, table = _rand(11, (16, 256, 256), jnp.float32), _rand(12, (2048, 256), jnp.float32)
    loss = lambda x, t: jnp.sum(jax.nn.log_softmax(dots.attend(x, t)))  # noqa: E731
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, table).compile().as_text()
    assert "ynn" in text  # the fast path exists in this jaxlib
    assert _unfused_dots(text) == []


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's matmul library")
def test_gelu_mlp_gradients_stay_on_the_fast_matmul_path():
    """GPT-2's MLP (4x wide, GELU): the fc_out weight gradient taken as (g^T x)^T compiles to
    canonical dots only, and its gradients equal plain lax math."""
    x, w1, w2 = (
        _rand(13, (8, 256, 96), jnp.float32),
        _rand(14, (96, 384), jnp.float32),
        _rand(15, (384, 96), jnp.float32),
    )
    dn = (((2,), (0,)), ((), ()))

    def mlp(dot):
        return lambda x, a, b: dot(jax.nn.gelu(dot(x, a, dn), approximate=True), b, dn)

    _check(mlp(dots.dot_general), mlp(lax.dot_general), (x, w1, w2), jnp.float32)
    for dot in (dots.dot_general, dots.dot_general_for("bfloat16")):  # f32, and bf16 autocast
        loss = lambda *a, dot=dot: jnp.sum(mlp(dot)(*a) ** 2)  # noqa: E731
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, w1, w2).compile().as_text()
        assert _unfused_dots(text) == []
