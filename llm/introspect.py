"""Look inside a model: attention maps, activations and anything else sown into 'intermediates'.

One mechanism covers every kind: a module calls `self.sow("intermediates", name, value)` (the
einsum attention sows `attn_probs` and `attn_logits`; an MoE layer would sow its router
probabilities, Infini-attention its memory gate) and `capture` runs the model once with that
collection mutable, plus flax's `capture_intermediates` for module outputs (each block's residual
stream). Values come back keyed by path, `layer_<i>/<module path>/<name>`, with scanned layers
(model.scan_layers) split into the same per-layer keys, so new kinds need no change here.

Works on sharded parameters: pass the `mesh` (and rules) they live on; the selection or the
reduction runs on the devices and only its result is gathered to the host (all processes).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm import sharding
from llm.model import layout
from llm.model.attention import NEG_INF
from llm.model.transformer import Block, Transformer

# Sown names whose axis 1 is the query-head axis (B N T S): `heads=` selects along it.
HEAD_AXIS = {"attn_probs": 1, "attn_logits": 1}
OUT = "out"  # the key suffix of a captured module output (flax stores it under "__call__")
_LAYER_RE = re.compile(r"^layer_(\d+)(/|$)")


@dataclasses.dataclass
class Captured:
    """Host (numpy) copies of the captured values, keyed `layer_<i>/<path>/<name>`."""

    logits_BTV: np.ndarray
    values: dict[str, np.ndarray]

    def names(self) -> list[str]:
        """The distinct leaf names captured (e.g. attn_probs, attn_logits, out)."""
        return sorted({k.rsplit("/", 1)[-1] for k in self.values})

    def find(self, name: str) -> dict[str, np.ndarray]:
        """Every captured value whose leaf name or path suffix is `name` ('attn_probs', 'query/out')."""
        return {k: v for k, v in self.values.items() if k == name or k.endswith("/" + name)}

    def per_layer(self, name: str) -> dict[int, np.ndarray]:
        """`find(name)` for values inside layers, keyed by layer index."""
        out = {}
        for k, v in self.find(name).items():
            m = _LAYER_RE.match(k)
            if m:
                out[int(m.group(1))] = v
        return dict(sorted(out.items()))

    def attention(self, layer: int) -> np.ndarray:
        """Attention probabilities of one layer, B N T S (rows sum to 1 over keys S)."""
        probs = self.per_layer("attn_probs")
        if layer not in probs:
            raise KeyError(f"no attention probabilities captured for layer {layer}; captured layers: "
                           f"{sorted(probs)} (capture with layers= including it)")  # fmt: skip
        return probs[layer]

    def residual(self, layer: int) -> np.ndarray:
        """The residual stream after block `layer`, B T D."""
        return self.values[f"layer_{layer}/{OUT}"]


def einsum_model(model: Transformer) -> Transformer:
    """The same model with the einsum attention impl, the one that sows attention maps.

    The fused `jax` impl computes the same function with the same parameters but never
    materialises the probabilities, so it has nothing to sow.
    """
    a = model.cfg.attention
    if getattr(a, "impl", "einsum") == "einsum":
        return model
    return Transformer(model.cfg.replace(attention=dataclasses.replace(a, impl="einsum")))


def _flatten(tree, cfg) -> dict[str, jax.Array]:
    """The intermediates tree -> {layer_<i>/<path>/<name>: array}; sow's tuples are unpacked and
    scanned layers split into per-layer keys (llm/model/layout.py knows the layout)."""
    layers, rest = layout.split_layers(tree, cfg)
    flat: dict[str, jax.Array] = {}
    for prefix, sub in [(f"layer_{i}/", s) for i, s in layers.items()] + [("", rest)]:
        for path, leaf in jax.tree_util.tree_leaves_with_path(sub):
            if leaf is None:
                continue
            keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
            # sow appends to a tuple: the last path element is its index (0 unless sown repeatedly).
            idx = keys.pop() if keys and keys[-1].isdigit() else "0"
            keys = [OUT if k == "__call__" else k for k in keys]
            flat[prefix + "/".join(keys) + ("" if idx == "0" else f"#{idx}")] = leaf
    return flat


def _layer_of(key: str) -> int | None:
    m = _LAYER_RE.match(key)
    return int(m.group(1)) if m else None


def _select(flat: Mapping[str, jax.Array], names, layers, heads) -> dict[str, jax.Array]:
    out = {}
    for k, v in flat.items():
        leaf = k.rsplit("/", 1)[-1].split("#")[0]
        if names is not None and not any(k == n or k.endswith("/" + n) or leaf == n for n in names):
            continue
        layer = _layer_of(k)
        if layers is not None and layer is not None and layer not in layers:
            continue
        if heads is not None and leaf in HEAD_AXIS:
            v = jnp.take(v, jnp.asarray(heads), axis=HEAD_AXIS[leaf])
        out[k] = v
    return out


def to_host(x) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _run(model: Transformer, params, tokens_BT, positions_BT, segment_ids_BT, module_outputs, block_outputs,
         post: Callable[[jax.Array, dict], Any], mesh, rules):  # fmt: skip
    """Apply the model with 'intermediates' mutable, then `post(logits, flat)` inside one jit."""
    model = einsum_model(model)
    cfg = model.cfg
    wanted = set(module_outputs)

    def keep(mdl, method_name: str) -> bool:
        if method_name != "__call__":
            return False
        return (block_outputs and isinstance(mdl, Block)) or mdl.name in wanted

    def fn(params, tokens_BT, positions_BT, segment_ids_BT):
        logits_BTV, state = model.apply(
            {"params": params}, tokens_BT, positions_BT, segment_ids_BT, deterministic=True,
            mutable=["intermediates"], capture_intermediates=keep,
        )  # fmt: skip
        flat = _flatten(state.get("intermediates", {}), cfg)
        return post(logits_BTV, flat)

    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    b, t = tokens_BT.shape
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((b, t), jnp.int32)
    args = (tokens_BT, jnp.asarray(positions_BT, jnp.int32), jnp.asarray(segment_ids_BT, jnp.int32))
    if mesh is None:
        out = jax.jit(fn)(params, *args)
    else:
        rules = rules if rules is not None else sharding.DEFAULT_RULES
        dp = sharding.data_parallel_size(mesh, rules)
        if b % dp == 0:  # else the inputs stay replicated: still correct, just not data-parallel
            args = tuple(jax.device_put(a, sharding.batch_sharding(mesh, rules)) for a in args)

        def traced(*a):
            with sharding.activate(mesh, rules):
                return fn(*a)

        out = jax.jit(traced)(params, *args)
    return jax.tree.map(to_host, out)


def capture(
    model: Transformer, params, tokens_BT, positions_BT=None, segment_ids_BT=None, *,
    names: Iterable[str] | None = None, layers: Iterable[int] | None = None,
    heads: Iterable[int] | None = None, module_outputs: Iterable[str] = (),
    block_outputs: bool = True, mesh=None, rules=None,
) -> Captured:  # fmt: skip
    """Run the model on `tokens_BT` and return its logits and the selected sown/captured values.

    names: keep only these leaf names or path suffixes (default: everything sown, e.g.
        'attn_probs', 'attn_logits', an MoE router's or an Infini gate's name, and 'out').
    layers / heads: keep only these layers, and these query heads of per-head values (HEAD_AXIS).
    module_outputs: also capture the outputs of submodules with these names (e.g. 'query', 'key':
        projections before any positional rotation).
    block_outputs: capture each block's output (the residual stream), key `layer_<i>/out`.
    mesh, rules: the mesh the (sharded) params live on; the model then runs sharded.
    """
    names = None if names is None else tuple(names)
    layers = None if layers is None else set(layers)
    heads = None if heads is None else tuple(heads)
    logits, values = _run(
        model, params, tokens_BT, positions_BT, segment_ids_BT, tuple(module_outputs), block_outputs,
        lambda logits, flat: (logits, _select(flat, names, layers, heads)), mesh, rules,
    )  # fmt: skip
    return Captured(logits_BTV=logits, values=dict(sorted(values.items(), key=lambda kv: _sort_key(kv[0]))))


def _sort_key(k: str):
    layer = _layer_of(k)
    return (layer if layer is not None else -1, k)


def _attention_stats(probs_BNTS, logits_BNTS) -> dict[str, jax.Array]:
    """Per-head statistics over the valid (unmasked) entries: entropy, peak prob, logit moments."""
    valid = logits_BNTS > NEG_INF / 2
    n_valid = jnp.maximum(jnp.sum(valid, axis=(0, 2, 3)), 1)
    logit0 = jnp.where(valid, logits_BNTS, 0.0)
    mean_N = jnp.sum(logit0, axis=(0, 2, 3)) / n_valid
    var_N = (
        jnp.sum(jnp.where(valid, (logits_BNTS - mean_N[None, :, None, None]) ** 2, 0.0), axis=(0, 2, 3))
        / n_valid
    )
    plogp = jnp.where(probs_BNTS > 0, probs_BNTS * jnp.log(jnp.where(probs_BNTS > 0, probs_BNTS, 1.0)), 0.0)
    entropy_BNT = -jnp.sum(plogp, axis=-1)
    return {
        "logit_mean": mean_N,
        "logit_std": jnp.sqrt(var_N),
        "logit_max": jnp.max(jnp.where(valid, logits_BNTS, -jnp.inf), axis=(0, 2, 3)),
        "entropy": jnp.mean(entropy_BNT, axis=(0, 2)),  # nats; log(#keys) is uniform attention
        "max_prob": jnp.mean(jnp.max(probs_BNTS, axis=-1), axis=(0, 2)),
    }


def _tensor_stats(x) -> dict[str, jax.Array]:
    x = x.astype(jnp.float32)
    return {"mean": jnp.mean(x), "std": jnp.std(x), "rms": jnp.sqrt(jnp.mean(x * x)),
            "max_abs": jnp.max(jnp.abs(x))}  # fmt: skip


def stats(model: Transformer, params, tokens_BT, positions_BT=None, segment_ids_BT=None, *, mesh=None,
          rules=None) -> dict[str, dict[str, np.ndarray]]:  # fmt: skip
    """Summary statistics of everything sown, reduced on the devices (only numbers come back).

    Keys: `layer_<i>/attn` -> per-head arrays (entropy, max_prob, logit_mean/std/max); every other
    captured value (residual streams `layer_<i>/out`, an MoE router's probabilities, ...) ->
    scalars mean, std, rms, max_abs.
    """

    def post(logits_BTV, flat):
        out: dict[str, dict[str, jax.Array]] = {}
        for k, v in flat.items():
            if k.endswith("attn_probs"):
                logits = flat.get(k[: -len("attn_probs")] + "attn_logits")
                if logits is not None:
                    out[k[: -len("/attn_probs")]] = _attention_stats(v, logits)
            elif not k.endswith("attn_logits"):
                out[k] = _tensor_stats(v)
        return out

    res = _run(model, params, tokens_BT, positions_BT, segment_ids_BT, (), True, post, mesh, rules)
    return dict(sorted(res.items(), key=lambda kv: _sort_key(kv[0])))


def attention_entropy(probs_BNTS: np.ndarray) -> np.ndarray:
    """Mean attention entropy per head (nats) of B N T S probabilities."""
    p = np.asarray(probs_BNTS, np.float64)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -plogp.sum(-1).mean(axis=(0, 2))


__all__ = ["Captured", "attention_entropy", "capture", "einsum_model", "stats", "to_host"]
