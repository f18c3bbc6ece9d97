"""Patches for `benchmarks/step_ab.py` variants (`patch:ab_patches:<function>`): each swaps one
optimisation of the library back to its plain form, so its gain can be measured in one process."""

from __future__ import annotations


def rope_direct_sine():
    """RoPE's sin/cos computed directly in float32 (the form used off CPU) instead of the tables."""
    import jax.numpy as jnp  # noqa: PLC0415

    from llm.model import positional  # noqa: PLC0415

    def direct(positions_BT, inv_freq_h):
        angles_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_h)
        return jnp.sin(angles_BTh), jnp.cos(angles_BTh)

    positional.rope_sin_cos = direct


def tied_head_folded_transposes():
    """The tied head's table gradient as (x^T g)^T without barriers (before 2026-12-01): XLA folds
    the transposes into the dot, which at one CPU device leaves it off YNNPACK."""
    import jax.numpy as jnp  # noqa: PLC0415

    from llm.model import dots  # noqa: PLC0415

    def bwd(res, g):
        x, table = res
        g = g.astype(x.dtype)
        dx = jnp.einsum("...v,vd->...d", g, table, preferred_element_type=jnp.float32)
        lead = "abcdefgh"[: x.ndim - 1]
        d_table = jnp.einsum(f"{lead}d,{lead}v->dv", x, g, preferred_element_type=jnp.float32).T
        return dx.astype(x.dtype), d_table.astype(table.dtype)

    dots._attend.defvjp(dots._attend_fwd, bwd)
