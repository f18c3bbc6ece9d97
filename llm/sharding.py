"""Device meshes, the logical-axis rules table, and logical -> physical sharding helpers.

The model names only logical axes ("embed", "heads", "batch", ...). One rules table maps each
logical name to zero or more mesh axes; it is overridable from config (`mesh.rules.<name>`).
A mesh axis that does not divide a dimension is dropped for that array (it is replicated along
that axis instead), so e.g. MQA's single KV head simply stays unsharded under tensor parallelism.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm.registry import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes, as "a,b" strings so every entry can be a command-line flag.
DEFAULT_RULES: dict[str, str] = {
    "batch": "data,fsdp",
    "length": "",
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": "",
    "mlp": "tensor",
    "norm": "",
    "positions": "",
    "layers": "",
    "act_embed": "",
    "act_mlp": "tensor",
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_vocab": "tensor",
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (-1 = all remaining devices) and the dcn_* split across slices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))

    def __post_init__(self):
        unknown = set(self.rules) - set(DEFAULT_RULES)
        if unknown:
            raise ConfigError(f"unknown logical axes in mesh.rules: {sorted(unknown)}; "
                              f"known: {sorted(DEFAULT_RULES)}")  # fmt: skip
        for name, axes in self.rules.items():
            for ax in parse_axes(axes):
                if ax not in MESH_AXES:
                    raise ConfigError(
                        f"mesh.rules.{name}={axes!r} names unknown mesh axis {ax!r}; "
                        f"mesh axes are {', '.join(MESH_AXES)}"
                    )

    def resolved_shape(self, n_devices: int) -> tuple[int, ...]:
        """Per-axis sizes for `n_devices` devices (ICI x DCN), resolving one -1."""
        dcn = (self.dcn_data, self.dcn_fsdp, self.dcn_tensor)
        ici = [self.data, self.fsdp, self.tensor]
        n_dcn = math.prod(dcn)
        if n_devices % n_dcn:
            raise ConfigError(f"mesh.dcn_* product {n_dcn} does not divide {n_devices} devices")
        per_slice = n_devices // n_dcn
        if ici.count(-1) > 1:
            raise ConfigError("at most one of mesh.data/fsdp/tensor may be -1")
        known = math.prod(s for s in ici if s != -1)
        if -1 in ici:
            if per_slice % known:
                raise ConfigError(
                    f"mesh sizes {dict(zip(MESH_AXES, ici))} do not divide the {per_slice} "
                    f"devices per slice; make the fixed axes divide the device count"
                )
            ici[ici.index(-1)] = per_slice // known
        if math.prod(ici) != per_slice:
            raise ConfigError(
                f"mesh data*fsdp*tensor = {math.prod(ici)} but there are {per_slice} devices "
                f"(per slice); set the sizes so their product is {per_slice}, or use -1 for one"
            )
        return tuple(ici), dcn


def parse_axes(axes: str | None) -> tuple[str, ...]:
    return tuple(a.strip() for a in (axes or "").split(",") if a.strip())


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor); a hybrid ICI x DCN mesh for multi-slice runs."""
    devices = list(devices if devices is not None else jax.devices())
    ici, dcn = cfg.resolved_shape(len(devices))
    if math.prod(dcn) > 1:
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    else:
        try:
            arr = mesh_utils.create_device_mesh(ici, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.asarray(devices).reshape(ici)  # e.g. CPU / unusual topologies
    return Mesh(arr, MESH_AXES)


def rules_tuple(rules: Mapping[str, str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((k, parse_axes(v)) for k, v in rules.items())


def logical_to_spec(names, shape, mesh: Mesh, rules: Mapping[str, str]) -> P:
    """PartitionSpec for an array of `shape` with logical axis `names`, dropping axes that don't divide."""
    if names is None:
        return P()
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, tuple(names) + (None,) * (len(shape) - len(names))):
        axes = [a for a in parse_axes(rules.get(name, "")) if name is not None]
        keep = []
        for ax in axes:
            size = mesh.shape[ax]
            if ax in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in keep) * size) == 0:
                keep.append(ax)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def tree_shardings(logical_specs, abstract_tree, mesh: Mesh, rules: Mapping[str, str]):
    """NamedShardings for a pytree, from its logical PartitionSpecs (flax get_partition_spec)."""
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, logical_to_spec(tuple(spec), leaf.shape, mesh, rules)),
        logical_specs,
        abstract_tree,
        is_leaf=lambda x: isinstance(x, P),
    )


# ---- activation constraints -------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("llm_sharding", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Mapping[str, str]):
    """Within this context, `constrain` pins activations to the mesh (used while tracing)."""
    token = _ACTIVE.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x, names: tuple[str | None, ...]):
    """with_sharding_constraint by logical names; a no-op outside `activate` (e.g. notebooks)."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules))
    )


def batch_sharding(mesh: Mesh, rules: Mapping[str, str], ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input array: batch over the data-parallel axes."""
    axes = tuple(a for a in parse_axes(rules["batch"]) if mesh.shape[a] > 1)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh, rules: Mapping[str, str]) -> int:
    return math.prod(mesh.shape[a] for a in parse_axes(rules["batch"]))
