"""optax AdamW built from parameter groups, with warmup + cosine decay and global-norm clipping.

Groups are data: `param_group(path)` names the group of each parameter and `group_settings` gives
each group its weight decay and learning-rate multiplier, so a new group (e.g. an Infini gate
with its own learning rate) is one entry, not a new optimizer.
"""

from __future__ import annotations

import jax
import optax

from llm.config import OptimConfig

EMBEDDINGS = ("embed", "pos_embed")


def _keys(path) -> list[str]:
    """Dict keys of a pytree path (skipping box attributes such as `.value`)."""
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def param_group(path: list[str]) -> str:
    """'embedding', 'norm_or_bias' or 'matrix', from a parameter's path in the params tree."""
    if any(k in EMBEDDINGS for k in path):
        return "embedding"
    if path and (path[-1] in ("bias", "scale")):
        return "norm_or_bias"
    return "matrix"


def group_settings(cfg: OptimConfig) -> dict[str, dict[str, float]]:
    return {
        "matrix": {"weight_decay": cfg.weight_decay, "lr_mult": 1.0},
        "embedding": {"weight_decay": cfg.weight_decay if cfg.decay_embeddings else 0.0, "lr_mult": 1.0},
        "norm_or_bias": {
            "weight_decay": cfg.weight_decay if cfg.decay_norms_and_biases else 0.0,
            "lr_mult": 1.0,
        },
    }


def param_labels(params):
    """Pytree of group names, same structure as `params` (boxed or not)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: param_group(_keys(p)), params)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio,
    )  # fmt: skip


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    groups = {
        name: optax.adamw(
            lambda step, m=s["lr_mult"]: schedule(step) * m,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=s["weight_decay"],
        )  # fmt: skip
        for name, s in group_settings(cfg).items()
    }
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.multi_transform(groups, param_labels))
    return optax.chain(*parts), schedule
