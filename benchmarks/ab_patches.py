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


def dense_narrow_grad_plain():
    """Every dense layer's weight gradient as x^T g (before 2026-12-01), also where it narrows 4x
    (GPT-2's fc_out), where XLA transposes the wide GELU output inside the fusion that makes it."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from llm.model import dots  # noqa: PLC0415

    def bwd(k, precision, res, g):
        x, w = res
        x2, w2 = dots._flat(x, w, k)
        g2 = g.reshape(*g.shape[: x.ndim - k], -1).astype(x.dtype)
        f32 = jnp.float32
        dx = jnp.einsum("...n,kn->...k", g2, w2, precision=precision, preferred_element_type=f32)
        lead = "abcdefgh"[: x2.ndim - 1]
        dw = jnp.einsum(f"{lead}k,{lead}n->kn", x2, g2, precision=precision, preferred_element_type=f32)
        return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype).reshape(w.shape)

    dots._dense = jax.custom_vjp(dots._dense.fun, nondiff_argnums=(2, 3))
    dots._dense.defvjp(dots._dense_fwd, bwd)


def rope_autodiff_backward():
    """RoPE's backward by autodiff of the concatenate (before 2026-12-01): XLA pads each half's
    gradient with zeros and adds them, instead of the rotation by minus the angle."""
    from llm.model import positional  # noqa: PLC0415

    positional._rotate = positional._rotate_pairs


def _module_at(commit: str, module: str) -> None:
    """Replace `module`'s functions by those of its source at `commit` (this repository's history)."""
    import importlib  # noqa: PLC0415
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = module.replace(".", "/") + ".py"
    src = subprocess.run(
        ["git", "show", f"{commit}:{path}"], cwd=root, check=True, capture_output=True, text=True
    )
    mod = importlib.import_module(module)
    exec(compile(src.stdout, f"{path}@{commit}", "exec"), mod.__dict__)  # noqa: S102


def attention_scale_on_scores():
    """The fused attention core scaling the [Q, S] scores and dS (before 2026-12-01) instead of q."""
    _module_at("91cf37e", "llm.model.attention_core")


def normaliser_unsynced():
    """The train step before 2026-12-06: the loss normaliser's all-reduce free to run at any point,
    so XLA:CPU's dataflow executor could issue it on one device before the other's forward pass."""
    from llm.train import loop, step  # noqa: PLC0415

    _module_at("03ccf33", "llm.train.step")
    loop.train_step = step.train_step
