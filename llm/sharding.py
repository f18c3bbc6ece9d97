"""Device meshes, the logical-axis rules table, and logical -> physical sharding helpers.

The model names only logical axes ("embed", "heads", "batch", ...). One rules table maps each
logical name to zero or more mesh axes; it is overridable from config (`mesh.rules.<name>`).
The mesh axes themselves are data (`MESH_AXES`): every function here iterates over them, so a
new parallelism axis is one entry there, a field (and its dcn_ twin) in MeshConfig, and rules.

A parameter dimension that a rule maps onto a mesh axis which does not divide it is an error
naming the parameter and the fix (silently replicating it would multiply its memory per device);
a dimension of size 1 (MQA's single KV head) has nothing to split and stays whole. Activations
and batches are lenient: an axis that does not divide is dropped for that array (e.g. a batch of
one while sampling).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm.registry import ConfigError

# Mesh axes, outermost first (the innermost gets the fastest interconnect): data parallelism,
# fully-sharded data parallelism (parameters and optimizer state split), expert parallelism (MoE
# experts split; tokens also split over it, so dense layers see it as data parallelism) and tensor
# parallelism (heads and FFN columns split).
MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axes, as "a,b" strings so every entry can be a command-line flag.
DEFAULT_RULES: dict[str, str] = {
    "batch": "data,fsdp,expert",
    "expert": "expert",
    "act_expert": "expert",
    "act_moe_group": "data,fsdp",  # token groups after MoE dispatch: off the expert axis
    "length": "",
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": "",
    "q_lora": "",  # MLA's query and key/value latents (small; replicated)
    "kv_lora": "",
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
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
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
        dcn = tuple(getattr(self, "dcn_" + ax) for ax in MESH_AXES)
        ici = [getattr(self, ax) for ax in MESH_AXES]
        n_dcn = math.prod(dcn)
        if n_devices % n_dcn:
            raise ConfigError(f"mesh.dcn_* product {n_dcn} does not divide {n_devices} devices")
        per_slice = n_devices // n_dcn
        if ici.count(-1) > 1:
            raise ConfigError(f"at most one of mesh.{'/'.join(MESH_AXES)} may be -1")
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
                f"mesh {'*'.join(MESH_AXES)} = {math.prod(ici)} but there are {per_slice} devices "
                f"(per slice); set the sizes so their product is {per_slice}, or use -1 for one"
            )
        return tuple(ici), dcn


def parse_axes(axes: str | None) -> tuple[str, ...]:
    return tuple(a.strip() for a in (axes or "").split(",") if a.strip())


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A Mesh with axes MESH_AXES; a hybrid ICI x DCN mesh for multi-slice runs."""
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


def logical_to_spec(names, shape, mesh: Mesh, rules: Mapping[str, str], strict_for: str | None = None) -> P:
    """PartitionSpec for an array of `shape` with logical axis `names`.

    A mesh axis that does not divide its dimension is dropped for this array, unless `strict_for`
    names a parameter: then it is a ConfigError naming the parameter and the fix.
    """
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
            elif strict_for is not None and dim > 1:
                raise ConfigError(
                    f"parameter {strict_for} {tuple(shape)}: its {name!r} dimension ({dim}) is not divisible "
                    f"by mesh axis {ax!r} (size {size}) that mesh.rules.{name}={rules.get(name)!r} maps it to; "
                    f"choose mesh sizes that divide {dim}, change the model shape, or replicate it with "
                    f"--config.mesh.rules.{name}={','.join(a for a in axes if a != ax)!r}"
                )
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def tree_shardings(logical_specs, abstract_tree, mesh: Mesh, rules: Mapping[str, str], strict: bool = True):
    """NamedShardings for a parameter pytree, from its logical PartitionSpecs (flax
    get_partition_spec). `strict`: a rule whose mesh axis does not divide a dimension is an error."""
    return jax.tree_util.tree_map_with_path(
        lambda path, spec, leaf: NamedSharding(
            mesh, logical_to_spec(tuple(spec), leaf.shape, mesh, rules, path_str(path) if strict else None)
        ),
        logical_specs,
        abstract_tree,
        is_leaf=lambda x: isinstance(x, P),
    )


def path_str(path) -> str:
    """'layer_0/attn/query/kernel': a pytree path as a '/'-joined string of its keys (dict keys,
    sequence indices and attribute names; box attributes such as `.value` are skipped)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":
            parts.append(k.name)
    return "/".join(parts)


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


def batch_sharding(
    mesh: Mesh, rules: Mapping[str, str], names: tuple[str | None, ...] | int = 2
) -> NamedSharding:
    """Sharding of an input array with logical axis `names` (an int n: ("batch", None, ...) of n
    dims). Divisibility is the caller's check (llm.train.loop.build: batch vs data parallelism)."""
    if isinstance(names, int):
        names = ("batch",) + (None,) * (names - 1)
    spec = []
    for name in names:
        axes = tuple(a for a in parse_axes(rules.get(name, "") if name else "") if mesh.shape[a] > 1)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, P(*spec))


def jit(fn, mesh: Mesh, rules: Mapping[str, str], **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` whose tracing binds activation constraints (`constrain`) to this
    mesh and rules: the one way the project jits a sharded computation."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with activate(mesh, rules):
            return fn(*args, **kwargs)

    return jax.jit(traced, **jit_kwargs)


def data_parallel_size(mesh: Mesh, rules: Mapping[str, str]) -> int:
    return math.prod(mesh.shape[a] for a in parse_axes(rules["batch"]))
