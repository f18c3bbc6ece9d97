"""TrainState and its sharded construction (parameters are born sharded)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm import sharding
from llm.model.quant import QTensor


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer updates applied
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]: dropout stream, folded with step
    skipped: jax.Array  # int32 scalar: updates not applied (non-finite loss/grads or loss spike)
    # Loss-spike monitor, {} when train.spike_window = 0: "losses" f32[window] ring buffer of the
    # last applied losses, "count" int32 (losses seen), "spikes" int32 (updates skipped as spikes).
    monitor: Any = struct.field(default_factory=dict)


def init_fn(
    model: nn.Module, tx: optax.GradientTransformation, seq_len: int, spike_window: int = 0
) -> Callable:
    """rng -> TrainState with boxed (logically annotated) params; jit/eval_shape it."""

    def init(rng):
        p_rng, d_rng = jax.random.split(rng)
        dummy = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init(p_rng, dummy)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
            rng=d_rng, skipped=jnp.zeros((), jnp.int32), monitor=init_monitor(spike_window),
        )  # fmt: skip

    return init


def init_monitor(spike_window: int) -> dict[str, jax.Array]:
    if not spike_window:
        return {}
    zero = jnp.zeros((), jnp.int32)
    return {"losses": jnp.zeros((spike_window,), jnp.float32), "count": zero, "spikes": zero}


def state_shardings(model, tx, seq_len: int, mesh, rules, spike_window: int = 0) -> tuple[Any, Any]:
    """(abstract unboxed state, its NamedShardings) from the logical names on the boxed init."""
    init = init_fn(model, tx, seq_len, spike_window)
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    abstract = nn.meta.unbox(boxed)
    params_sh = param_shardings(model, seq_len, mesh, rules, boxed.params)
    opt_sh = opt_state_shardings(abstract.opt_state, abstract.params, params_sh, mesh)
    replicated = NamedSharding(mesh, P())
    shardings = abstract.replace(
        step=replicated,
        params=params_sh,
        opt_state=opt_sh,
        rng=replicated,
        skipped=replicated,
        monitor=jax.tree.map(lambda _: replicated, abstract.monitor),
    )
    return abstract, shardings


def boxed_abstract_params(model, seq_len: int):
    """The parameters as ShapeDtypeStructs boxed with their logical axis names (nothing allocated)."""
    dummy = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), dummy)["params"]


def param_shardings(model, seq_len: int, mesh, rules, boxed_params=None):
    """NamedShardings of the model's parameters, from their logical axis names (no optimizer)."""
    if boxed_params is None:
        boxed_params = boxed_abstract_params(model, seq_len)
    abstract = nn.meta.unbox(boxed_params)
    return sharding.tree_shardings(nn.get_partition_spec(boxed_params), abstract, mesh, rules)


def abstract_params(model, seq_len: int, mesh, rules):
    """ShapeDtypeStructs of the parameters carrying their target shardings (what to restore into)."""
    boxed = boxed_abstract_params(model, seq_len)
    return sharded_target(nn.meta.unbox(boxed), param_shardings(model, seq_len, mesh, rules, boxed))


def opt_state_shardings(abstract_opt, abstract_params_tree, params_sh, mesh):
    """Optimizer-state shardings: moments mirror the params tree (a leaf whose dict-key path ends
    in a parameter's path, with its shape, takes that parameter's sharding); counts and scalars
    are replicated."""
    by_path = {_dict_path(p): s for p, s in jax.tree_util.tree_leaves_with_path(params_sh)}
    shapes = {_dict_path(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(abstract_params_tree)}
    replicated = NamedSharding(mesh, P())

    def param_path(path) -> tuple[str, ...] | None:
        # Wrappers put dict keys in front of the params tree (a masked or multi_transform state's
        # inner_states['matrix'].mu[...]): match the longest suffix that names a parameter, or
        # every Adam moment would silently stay replicated under FSDP.
        keys = _dict_path(path)
        return next((keys[i:] for i in range(len(keys)) if keys[i:] in by_path), None)

    def leaf_sharding(path, leaf):
        key = param_path(path)
        return by_path[key] if key is not None and leaf.shape == shapes[key] else replicated

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt)


def sharded_target(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings: what a checkpoint restores into (on any mesh)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def _dict_path(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def create_state(
    model, tx, seq_len: int, mesh, rules, seed: int, spike_window: int = 0, store=None, shardings=None
) -> TrainState:
    """Initialise directly into the target shardings: no full copy on any one device. `store`
    maps the initialised params to the form the state holds (a QLoRA base quantized), with
    `shardings` the state's shardings in that form."""
    init = init_fn(model, tx, seq_len, spike_window)
    if shardings is None:
        _, shardings = state_shardings(model, tx, seq_len, mesh, rules, spike_window)

    def make(rng):
        state = nn.meta.unbox(init(rng))
        return state.replace(params=store(state.params)) if store else state

    with sharding.activate(mesh, rules):
        return jax.jit(make, out_shardings=shardings)(jax.random.PRNGKey(seed))


def count_params(params) -> int:
    """Parameters (an int8 QTensor counts its values, not its scales)."""
    is_q = lambda x: isinstance(x, QTensor)  # noqa: E731
    return sum(int(x.q.size if is_q(x) else x.size) for x in jax.tree.leaves(params, is_leaf=is_q))
