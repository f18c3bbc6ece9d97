"""Two channels out of the model besides its logits: weighted auxiliary losses and metrics.

- `add_loss(module, name, value, weight)`: a scalar the train step adds to the loss (an MoE
  balance loss, a router z-loss), already multiplied by its weight from the layer's sub-config.
  The step sums every sown loss of a name over all layers: `total_losses` gives the same sum for
  scanned and unrolled stacks (scanned layers sow one value per repeat: a vector, summed whole).
- `add_metric(module, name, value)`: a scalar or a small vector logged but never added to the loss
  (router load per expert, drop rate, a gate's value, the max attention logit).
  `layer_metrics` turns the collection into flat scalars: `<name>/layer_<i>` per layer
  (`.../<k>` per element of a vector) and `<name>` averaged over the layers that sow it.

- `set_param(module, name, value)`: state kept as a parameter but updated outside the optimizer
  (DeepSeek-V3's balancing bias): the step writes the value after the update.

All are flax `sow` collections, so a module needs no new plumbing and introspection sees them.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.model import layout

LOSSES = "losses"
METRICS = "metrics"
PARAM_UPDATES = "param_updates"
# State a layer carries from one chunk of a sequence to the next under model-level recurrence
# (Infini-attention's (M, z); llm/train/recurrent.py). Not a channel out: threaded back in.
MEMORY = "memory"


def add_loss(module: nn.Module, name: str, value, weight: float = 1.0) -> None:
    """Sow `weight * value` (a scalar, f32) into the loss channel under `name`."""
    value = jnp.asarray(value, jnp.float32)
    if value.ndim:
        raise ValueError(f"an auxiliary loss must be a scalar per layer; {name!r} has shape {value.shape}")
    module.sow(LOSSES, name, weight * value)


def add_metric(module: nn.Module, name: str, value) -> None:
    """Sow a statistic (scalar or 1-D, f32) into the metrics channel under `name`."""
    value = jnp.asarray(value, jnp.float32)
    if value.ndim > 1:
        raise ValueError(f"a metric must be a scalar or a vector per layer; {name!r} has shape {value.shape}")
    module.sow(METRICS, name, value)


def set_param(module: nn.Module, name: str, value) -> None:
    """Give the module's parameter `name` this value after the optimizer step (state updated
    outside the optimizer, e.g. an MoE balancing bias). Freeze it for the optimizer (a built-in
    group rule does for `router_bias`) so the gradient step leaves it alone."""
    module.sow(PARAM_UPDATES, name, value)


def apply_param_updates(params, updates_tree):
    """params with every parameter that `set_param` named replaced by its sown value (same
    module path; scanned layers sow the stacked value). The sown tuples hold one value each."""
    new = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(updates_tree):
        keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        new[keys] = leaf
    if not new:
        return params

    def replace(path, p):
        keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        return new[keys].astype(p.dtype).reshape(p.shape) if keys in new else p

    return jax.tree_util.tree_map_with_path(replace, params)


def _leaves_by_name(tree) -> list[tuple[str, jax.Array]]:
    """(sown name, value) for every leaf; sow stores a tuple, so the name is the last dict key."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        out.append((keys[-1], leaf))
    return out


def total_losses(losses_tree: Mapping) -> dict[str, jax.Array]:
    """{name: sum over every layer (and repeat) that sowed it}, f32 scalars."""
    totals: dict[str, jax.Array] = {}
    for name, leaf in _leaves_by_name(losses_tree):
        totals[name] = totals.get(name, 0.0) + jnp.sum(leaf.astype(jnp.float32))
    return totals


# Metrics reduced by max (over a layer's several sows and over layers), not mean: extremes.
MAX_METRICS = frozenset({"attn_logit_max", "logit_max"})


def layer_metrics(metrics_tree: Mapping, cfg) -> dict[str, jax.Array]:
    """Flat scalar metrics: `<name>/layer_<i>[/<k>]` per layer and `<name>` over layers (the
    mean; the max for MAX_METRICS). A module that sows a name twice (differential attention's
    two maps) logs the max of `MAX_METRICS` and the last value of others."""
    layers, rest = layout.split_layers(metrics_tree, cfg)
    out: dict[str, jax.Array] = {}
    per_name: dict[str, list[jax.Array]] = {}
    for where, tree in [(f"layer_{i}", sub) for i, sub in layers.items()] + [("", rest)]:
        for name, value in _leaves_by_name(tree):
            key = f"{name}/{where}" if where else name
            if value.ndim == 0:
                out[key] = jnp.maximum(out[key], value) if name in MAX_METRICS and key in out else value
            else:
                out.update({f"{key}/{k}": value[k] for k in range(value.shape[0])})
            if where:
                per_name.setdefault(name, []).append(value)
    for name, values in per_name.items():
        if name not in out:
            reduce = jnp.max if name in MAX_METRICS else jnp.mean
            out[name] = reduce(jnp.stack([reduce(v) for v in values]))
    return out
