"""Which module each layer is, and where its variables live: the one place that knows the layout.

A model is a sequence of layers, each a (attention kind, FFN kind) pair (`LayerSpec`):
`model.attention.pattern` cycles attention kinds over depth, `model.ffn` picks the FFN kind per
layer. Unrolled (`scan_layers=False`), layer i is the module `layer_<i>`. Scanned, the layer
sequence is cut into a short unrolled prefix and a periodic rest: one super-block of `period`
layers is `nn.scan`ned `repeats` times as the module `layers`, every variable gaining a leading
repeat axis. With period 1 the super-block is the block itself (`layers/attn/...`, the layout of
every uniform model); with period P > 1 it holds P blocks (`layers/block_<j>/attn/...`).

Layer index of a scanned variable: prefix + repeat * period + j. Everything that reads per-layer
values (parameter conversion, introspection, the metrics channel, quantization) goes through the
functions here instead of parsing module names itself.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

SCANNED = "layers"  # module name of the scanned stack
_LAYER = re.compile(r"^layer_(\d+)$")
_BLOCK = re.compile(r"^block_(\d+)$")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The kinds of one layer: its attention and its FFN (registry names), and whether its
    attention drops the positional rotation/bias (`model.attention.nope_every`)."""

    attention: str
    ffn: str
    nope: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
    """The layers of a model and how they are laid out as modules."""

    specs: tuple[LayerSpec, ...]  # one per layer
    scanned: bool
    prefix: int = 0  # leading layers kept unrolled (`layer_<i>`) in front of the scanned stack
    period: int = 1  # layers per scanned super-block
    repeats: int = 0  # scanned super-blocks

    @property
    def unit(self) -> tuple[LayerSpec, ...]:
        """The layer kinds of one scanned super-block."""
        return self.specs[self.prefix : self.prefix + self.period]

    def layer_index(self, repeat: int, j: int = 0) -> int:
        return self.prefix + repeat * self.period + j


def layer_specs(cfg) -> tuple[LayerSpec, ...]:
    """(attention kind, FFN kind) of every layer, from the model config."""
    pattern = cfg.attention.pattern or (cfg.attention.kind,)
    ffn = cfg.ffn.kinds(cfg.n_layers)
    k = cfg.attention.nope_every
    # Every k-th layer (1-based: layers k, 2k, ...) without positions, as Llama-4's interleaved RoPE.
    return tuple(
        LayerSpec(pattern[i % len(pattern)], ffn[i], nope=k > 0 and (i + 1) % k == 0)
        for i in range(cfg.n_layers)
    )


def plan(cfg) -> Plan:
    """The module layout of `cfg` (a ModelConfig): unrolled, or prefix + scanned super-blocks.

    Scanned: the unrolled prefix and the period such that the remaining layers repeat that period
    a whole number of times, with the fewest distinct layers to compile (prefix + period; ties:
    the shorter prefix). E.g. 26 layers of Gemma-3's five local then one global: prefix 2 (local,
    local), then a period of 6 repeated 4 times.
    """
    specs = layer_specs(cfg)
    n = len(specs)
    if not cfg.scan_layers:
        return Plan(specs, scanned=False)
    best = None
    for prefix in range(n):
        rest = specs[prefix:]
        for period in range(1, len(rest) + 1):
            if len(rest) % period == 0 and rest == rest[:period] * (len(rest) // period):
                if best is None or prefix + period < best[0] + best[1]:
                    best = (prefix, period)
                break  # longer periods of this prefix only compile more
    prefix, period = best
    return Plan(specs, True, prefix, period, (n - prefix) // period)


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "idx", k)))


def split_layers(tree: Mapping, cfg) -> tuple[dict[int, Any], dict[str, Any]]:
    """A variable collection (params, intermediates, metrics, ...) -> ({layer index: that layer's
    subtree, unstacked}, {other top-level entries}). Works for both layouts."""
    layers: dict[int, Any] = {}
    rest: dict[str, Any] = {}
    p = plan(cfg) if getattr(cfg, "scan_layers", False) else None
    for name, sub in tree.items():
        m = _LAYER.match(name)
        if m:
            layers[int(m.group(1))] = sub
        elif name == SCANNED and p is not None and p.scanned:
            for j, block in _blocks(sub, p).items():
                for r in range(p.repeats):
                    layers[p.layer_index(r, j)] = jax.tree.map(lambda x, r=r: x[r], block)
        else:
            rest[name] = sub
    return dict(sorted(layers.items())), rest


def _blocks(stack: Mapping, p: Plan) -> dict[int, Any]:
    """The scanned module's subtree per position j in the super-block."""
    if p.period == 1:
        return {0: stack}
    out = {}
    for name, sub in stack.items():
        m = _BLOCK.match(name)
        if not m:
            raise ValueError(f"unexpected entry {name!r} in the scanned super-block (want block_<j>)")
        out[int(m.group(1))] = sub
    return out


def to_unrolled(params: Mapping, cfg) -> dict[str, Any]:
    """Parameters (plain arrays, not flax's logically-partitioned boxes) of `cfg`'s layout
    (scanned or not) in the unrolled layout (`layer_<i>`)."""
    layers, rest = split_layers(params, cfg)
    return {**rest, **{f"layer_{i}": sub for i, sub in layers.items()}}


def to_layout(unrolled: Mapping, cfg) -> dict[str, Any]:
    """Unrolled parameters (`layer_<i>`) in `cfg`'s layout (stacked into `layers` when scanned)."""
    p = plan(cfg)
    layers, rest = split_layers(unrolled, dataclasses.replace(cfg, scan_layers=False))
    if set(layers) != set(range(len(p.specs))):
        raise ValueError(f"expected layers 0..{len(p.specs) - 1}, got {sorted(layers)}")
    if not p.scanned:
        return {**rest, **{f"layer_{i}": layers[i] for i in sorted(layers)}}
    out = {**rest, **{f"layer_{i}": layers[i] for i in range(p.prefix)}}

    def stack(j):
        return jax.tree.map(
            lambda *xs: jnp.stack(xs), *[layers[p.layer_index(r, j)] for r in range(p.repeats)]
        )

    out[SCANNED] = stack(0) if p.period == 1 else {f"block_{j}": stack(j) for j in range(p.period)}
    return out


def is_stacked(path) -> bool:
    """Whether a variable at this pytree path has the scanned stack's leading repeat axis."""
    return bool(path) and _key(path[0]) == SCANNED
