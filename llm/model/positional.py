"""Positional encodings: learned, sinusoidal, RoPE, ALiBi, none.

Each kind is a stateless strategy with three hooks, so layers never branch on the kind's name:
- `embed(positions_BT, d_model)`: an additive input embedding (or None);
- `rotate(x_BTNH, positions_BT)`: a rotation of queries/keys (identity unless RoPE);
- `bias(q_pos_BT, k_pos_BS, n_heads)`: an additive attention-logit bias (or None).
The learned table is the one kind with parameters; the transformer owns it (`learned_table`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from llm.model.registries import POSITIONAL


class Positional:
    """No positional information (`none`); the base of the other kinds."""

    learned_table = False

    def __init__(self, cfg):
        self.cfg = cfg

    def embed(self, positions_BT, d_model: int):
        return None

    def rotate(self, x_BTNH, positions_BT):
        return x_BTNH

    def bias(self, q_pos_BT, k_pos_BS, n_heads: int):
        return None


POSITIONAL.register("none")(Positional)


@POSITIONAL.register("learned")
class Learned(Positional):
    """GPT-2 style learned absolute positions (the table lives in the transformer)."""

    learned_table = True


def sinusoidal_table(positions_BT, d_model: int):
    """Vaswani et al.: sin on even channels, cos on odd channels, wavelengths up to 10000*2pi."""
    half = d_model // 2
    inv_freq = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.stack([jnp.sin(angles_BTh), jnp.cos(angles_BTh)], axis=-1)  # interleave sin/cos
    emb = emb.reshape(*positions_BT.shape, 2 * half)
    if d_model % 2:
        emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
    return emb


@POSITIONAL.register("sinusoidal")
class Sinusoidal(Positional):
    def embed(self, positions_BT, d_model: int):
        return sinusoidal_table(positions_BT, d_model)


def llama3_inv_freq(inv_freq, s):
    """Llama 3.1's frequency rescaling (`model.rope_scaling`, kind llama3): wavelengths longer than
    original_max_len / low_freq_factor are stretched by `factor`, those shorter than
    original_max_len / high_freq_factor kept, and the band between interpolated linearly in
    original_max_len / wavelength. numpy in, numpy out (float32, as Hugging Face computes it)."""
    inv_freq = np.asarray(inv_freq, np.float32)
    wavelen = np.float32(2 * math.pi) / inv_freq
    ratio = np.float32(s.original_max_len) / wavelen  # how many wavelengths fit the original context
    smooth = np.clip(
        (ratio - s.low_freq_factor) / np.float32(s.high_freq_factor - s.low_freq_factor), 0.0, 1.0
    )
    return ((1.0 - smooth) * inv_freq / np.float32(s.factor) + smooth * inv_freq).astype(np.float32)


def rope_inv_freq(h: int, theta: float, scaling=None) -> np.ndarray:
    """The H/2 rotation frequencies theta^(-2i/H) (float32, a trace-time constant)."""
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, h, 2, dtype=np.float32) / np.float32(h)))).astype(
        np.float32
    )
    if scaling is not None and scaling.kind == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    return inv_freq


# CPU path of `rope_sin_cos`: positions split as p = hi * 4096 + lo, both below 4096, so sin and cos
# of p * f come from two constant [4096, H/2] tables by the angle-addition formulas. Exact (float64
# tables, error ~5e-7) for |p| < 2^24, beyond which float32 positions are not integers anyway.
_TABLE_BITS = 12


@functools.lru_cache(maxsize=64)
def _sin_cos_tables(inv_freq: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """(sin lo, cos lo, sin hi, cos hi), each [4096, H/2] float32, for lo * f and hi * 4096 * f."""
    f = np.asarray(inv_freq, np.float64)
    steps = np.arange(1 << _TABLE_BITS, dtype=np.float64)[:, None]
    lo, hi = steps * f, steps * float(1 << _TABLE_BITS) * f
    return tuple(fn(a).astype(np.float32) for a in (lo, hi) for fn in (np.sin, np.cos))


def rope_sin_cos(positions_BT, inv_freq_h: np.ndarray):
    """sin and cos of positions x frequencies, [B, T, H/2] float32 each.

    On CPU from constant tables (`_sin_cos_tables`): XLA:CPU fuses sin/cos into every consumer
    and evaluates them once per element of the rotated [B, T, N, H] tensor, with a scalar (not
    vectorised) sine, so the direct form cost ~0.7 ms per rotation of a [8, 256, 4, 64] tensor
    against ~0.11 ms for the tables, and it drifts by up to 0.4 at positions of millions (float32
    angles). Elsewhere (TPU, GPU: fast vector sine) the direct float32 form, as Hugging Face's.
    """
    if jax.default_backend() != "cpu":
        angles_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_h)
        return jnp.sin(angles_BTh), jnp.cos(angles_BTh)
    sin_lo, cos_lo, sin_hi, cos_hi = (jnp.asarray(t) for t in _sin_cos_tables(tuple(inv_freq_h.tolist())))
    p_BT = jnp.abs(positions_BT.astype(jnp.int32))
    mask = (1 << _TABLE_BITS) - 1
    lo_BT, hi_BT = p_BT & mask, jnp.minimum(p_BT >> _TABLE_BITS, mask)
    s_lo, c_lo = jnp.take(sin_lo, lo_BT, axis=0, mode="clip"), jnp.take(cos_lo, lo_BT, axis=0, mode="clip")
    s_hi, c_hi = jnp.take(sin_hi, hi_BT, axis=0, mode="clip"), jnp.take(cos_hi, hi_BT, axis=0, mode="clip")
    sign_BT1 = jnp.where(positions_BT < 0, -1.0, 1.0).astype(jnp.float32)[..., None]  # sin is odd, cos even
    return sign_BT1 * (s_hi * c_lo + c_hi * s_lo), c_hi * c_lo - s_hi * s_lo


def apply_rope(x_BTNH, positions_BT, theta: float, scaling=None):
    """Rotate channel pairs (i, i + H/2) by angle pos * theta^(-2i/H) (the Llama/NeoX layout, also
    Hugging Face's; Meta's original checkpoints pair (2i, 2i + 1), which HF's conversion permutes).
    `scaling`: a `RopeScalingConfig` (llm/model/config.py) or None."""
    h = x_BTNH.shape[-1]
    sin_BTh, cos_BTh = rope_sin_cos(jnp.asarray(positions_BT), rope_inv_freq(h, theta, scaling))
    out = _rotate(x_BTNH.astype(jnp.float32), sin_BTh[:, :, None, :], cos_BTh[:, :, None, :])
    return out.astype(x_BTNH.dtype)


def _rotate_pairs(x, sin, cos):
    h = x.shape[-1]
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# The gradient of a rotation is the rotation by minus the angle: one pass of the same form. Autodiff
# of the concatenate and slices instead pads each half with zeros and adds them, which XLA:CPU emits
# as a branching loop: 0.95 ms against 0.24 ms for a [16, 256, 4, 64] rotation on one core, bit-equal.
@jax.custom_vjp
def _rotate(x, sin, cos):
    return _rotate_pairs(x, sin, cos)


def _rotate_fwd(x, sin, cos):
    return _rotate_pairs(x, sin, cos), (sin, cos)


def _rotate_bwd(res, g):
    sin, cos = res
    return _rotate_pairs(g, -sin, cos), jnp.zeros_like(sin), jnp.zeros_like(cos)


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


@POSITIONAL.register("rope")
class Rope(Positional):
    def rotate(self, x_BTNH, positions_BT):
        return apply_rope(x_BTNH, positions_BT, self.cfg.rope_theta, self.cfg.rope_scaling)


def alibi_slopes(n_heads: int) -> np.ndarray:
    """Press et al.: geometric slopes 2^(-8i/n); for non-powers of two, interleave the next power."""

    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return np.asarray(pow2(n_heads), np.float32)
    p = 2 ** math.floor(math.log2(n_heads))
    return np.asarray(pow2(p) + pow2(2 * p)[0::2][: n_heads - p], np.float32)


@POSITIONAL.register("alibi")
class Alibi(Positional):
    def bias(self, q_pos_BT, k_pos_BS, n_heads: int):
        slopes_N = jnp.asarray(alibi_slopes(n_heads))
        dist_BTS = (k_pos_BS[:, None, :] - q_pos_BT[:, :, None]).astype(jnp.float32)  # <= 0 causal
        return slopes_N[None, :, None, None] * dist_BTS[:, None, :, :]  # B N T S
