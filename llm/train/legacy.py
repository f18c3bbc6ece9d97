"""Reading checkpoints of the earlier optimizer layout (commit e9a0ace and before).

Until then the optimizer was `optax.multi_transform` over three fixed groups (matrix, embedding,
norm_or_bias), one AdamW state per group, each holding moments for its members only. Today one
Adam state covers every trainable parameter (llm/train/optimizer.py). `OptimizerUpgrade` gives
the checkpointer the abstract state of the earlier layout to restore into, and converts what it
read: each parameter's moments come from the group that held them, the step counts are shared.
The arithmetic of the two layouts is the same, so a resumed run continues as it would have.
"""

from __future__ import annotations

import jax
import optax

from llm.config import OptimConfig
from llm.sharding import path_str
from llm.train import state as state_lib

GROUPS = ("matrix", "embedding", "norm_or_bias")  # the order multi_transform stored them in (sorted)


def _group(path: str) -> str:
    keys = path.split("/")
    if any(k in ("embed", "pos_embed") for k in keys):
        return "embedding"
    if keys and keys[-1] in ("bias", "scale"):
        return "norm_or_bias"
    return "matrix"


def legacy_optimizer(cfg: OptimConfig, schedule) -> optax.GradientTransformation:
    """The optimizer of commit e9a0ace: clip, then one AdamW per group (only for its state tree)."""
    decay = {
        "matrix": cfg.weight_decay,
        "embedding": cfg.weight_decay if cfg.decay_embeddings else 0.0,
        "norm_or_bias": cfg.weight_decay if cfg.decay_norms_and_biases else 0.0,
    }
    groups = {
        g: optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=decay[g]) for g in GROUPS
    }
    labels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: _group(path_str(p)), params)  # noqa: E731
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return optax.chain(*parts, optax.multi_transform(groups, labels))


class OptimizerUpgrade:
    """Restore target and conversion for a train state whose optimizer has the earlier layout."""

    def __init__(self, cfg: OptimConfig, schedule, mesh):
        self.tx = legacy_optimizer(cfg, schedule)
        self.mesh = mesh
        self.clip = cfg.clip_norm > 0

    def target(self, abstract_state):
        """The abstract train state with the earlier optimizer state (moments sharded like params)."""
        opt = jax.eval_shape(self.tx.init, abstract_state.params)
        param_sh = jax.tree.map(lambda a: a.sharding, abstract_state.params)
        opt_sh = state_lib.opt_state_shardings(opt, abstract_state.params, param_sh, self.mesh)
        return abstract_state.replace(opt_state=state_lib.sharded_target(opt, opt_sh))

    def convert(self, legacy_state, abstract_state):
        """The restored earlier-layout state as a state of today's optimizer."""
        inner = legacy_state.opt_state[-1].inner_states
        adam = [inner[g].inner_state[0] for g in GROUPS]  # ScaleByAdamState per group
        masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731

        def merge(*xs):
            return next(x for x in xs if not masked(x))

        mu = jax.tree.map(merge, *[a.mu for a in adam], is_leaf=masked)
        nu = jax.tree.map(merge, *[a.nu for a in adam], is_leaf=masked)
        opt = optax.tree_utils.tree_set(abstract_state.opt_state, mu=mu, nu=nu)
        count = adam[0].count

        def fill(path, x):
            # The remaining leaves are step counts (Adam's and the schedule's), each its own buffer:
            # the train step donates its state, and one buffer donated twice is an error.
            if not isinstance(x, jax.ShapeDtypeStruct):
                return x
            if x.shape != () or "count" not in jax.tree_util.keystr(path):
                raise ValueError(
                    f"optimizer state field {jax.tree_util.keystr(path)} has no counterpart in the earlier layout"
                )
            return jax.device_put(count.astype(x.dtype) + 0, x.sharding)

        return legacy_state.replace(opt_state=jax.tree_util.tree_map_with_path(fill, opt))
