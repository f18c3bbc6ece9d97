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
