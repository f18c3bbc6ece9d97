"""LoRA (Hu et al. 2021): low-rank adapters on the linear layers of a frozen model (`model.lora.*`).

A targeted linear layer y = x W (+ b) becomes y = x W (+ b) + (alpha / rank) * dropout(x) A B,
with A [in..., rank] and B [rank, out...] its own parameters `lora_a` / `lora_b` next to the kernel
(B starts at zero, so an adapted model starts equal to its base). The low-rank path runs factored
(x A, then B): no weight-sized delta is formed, and the frozen kernel gets no gradient.

How it attaches without touching any layer: the transformer calls its layer stack inside
`nn.intercept_methods(interceptor(...))`; every `nn.Dense` / `nn.DenseGeneral` call whose module
path matches `model.lora.targets` gets the adapter path added (and its two parameters created at
init). It works the same for unrolled and scanned stacks (the adapters stack with the layers),
under remat, and on any mesh: A and B take the logical axes of the kernel's input and output.

Targets are aliases or regexes searched in the module path (`layer_3/attn/query`,
`layers/mlp/up` when scanned): `attention` (q, k, v, o), `attn_qv` (the paper's choice), `mlp`,
`all_linear` (every projection in attention and MLP, MoE experts included), `experts` (the routed
experts alone). The output head and embeddings are not adapted.

MoE experts (llm/model/moe.py) are [E, in, out] parameters, not Dense modules: the MoE layer asks
`expert_adapters` for per-expert adapters of the weights the targets name (path
`layer_1/mlp/w_in`; A [E, in, rank], B [E, rank, out] under `layer_1/mlp/w_in_lora/`) and both
expert implementations run them factored, per expert, on the tokens routed there. `lora.dropout`
is not applied on the expert adapters.

Training: with `model.lora.rank > 0` every parameter but the adapters is frozen (a built-in
optimizer-group rule; `optim.groups` can unfreeze more, e.g. norms). With `train.init_from` the
base comes from that run and checkpoints hold the adapters alone (llm/checkpoint.py). `merge`
folds the adapters into the kernels (export, fast inference): `python -m llm.convert --merge_lora`.

QLoRA-style (`model.lora.base_quant=int8`, with `train.init_from`): the frozen base's layer
kernels are held as int8 `QTensor`s with per-output-channel scales (llm/model/quant.py), about a
quarter of their fp32 bytes, and no gradient or optimizer state exists for them. Each layer
widens its own kernels when it runs (`nn.map_variables` around the block, inside remat), so the
fp32 copy is transient, one layer at a time. Embeddings, the output head and norms stay in their
dtype (frozen all the same). The adapters learn against the quantized base; `merge` folds them
into its dequantized kernels, so a merged model equals the adapted one.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm.model import layout, quant

ADAPTERS = ("lora_a", "lora_b")
ALIASES = {
    "attention": r"(^|/)attn/(query|key|value|out)$",
    "attn_qv": r"(^|/)attn/(query|value)$",
    "mlp": r"(^|/)mlp/(fc_in|fc_out|gate|up|down|w_in|w_gate|w_out)$",
    "experts": r"(^|/)mlp/(w_in|w_gate|w_out)$",  # the routed experts' matrices (MoE)
    "all_linear": r"(^|/)(attn|mlp)/[^/]+$",
}
# optim.groups rules a LoRA run adds after the user's: adapters (and a classifier head) train, the rest is frozen.
OPTIMIZER_GROUPS = (r"(^|/)lora_(a|b)$: frozen=false", r"^cls_head/: frozen=false", r".*: frozen")


BASE_QUANT = ("none", "int8")


def target_patterns(targets) -> list[re.Pattern]:
    return [re.compile(ALIASES.get(t, t)) for t in targets]


def is_adapter_path(path: str) -> bool:
    """Whether a parameter path ('layer_0/attn/query/lora_a') is an adapter."""
    return path.rsplit("/", 1)[-1] in ADAPTERS


def _contracted(module, x) -> tuple[int, ...]:
    """The axes of x the module contracts (normalised to negative indices)."""
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        return tuple(sorted(a if a < 0 else a - x.ndim for a in axis))
    return (-1,)


def interceptor(lora, deterministic: bool):
    """The method interceptor that adds the adapter path to targeted Dense/DenseGeneral calls."""
    patterns = target_patterns(lora.targets)
    scale = lora.alpha / lora.rank

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense | nn.DenseGeneral):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        if not any(p.search(path) for p in patterns):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0]
        axes = _contracted(module, x)
        in_shape = tuple(x.shape[a] for a in axes)
        out_shape = y.shape[x.ndim - len(axes) :]
        names_in, names_out = _kernel_names(module, len(axes))
        a = module.param(
            "lora_a", nn.with_logical_partitioning(_a_init(in_shape), names_in + (None,)), (*in_shape, lora.rank),
            module.param_dtype,
        )  # fmt: skip
        b = module.param(
            "lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None,) + names_out), (lora.rank, *out_shape),
            module.param_dtype,
        )  # fmt: skip
        h = x
        if lora.dropout > 0 and not deterministic:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
            h = jnp.where(keep, x / (1.0 - lora.dropout), 0.0).astype(x.dtype)
        dtype = y.dtype
        xa = jnp.tensordot(h, a.astype(dtype), axes=(axes, tuple(range(len(axes)))))  # [..., rank]
        return y + (scale * jnp.tensordot(xa, b.astype(dtype), axes=1)).astype(dtype)

    return intercept


def _a_init(in_shape):
    """A ~ N(0, 1/fan_in) (B = 0 keeps the start exact; A's scale sets the adapter's early lr)."""
    fan_in = 1
    for s in in_shape:
        fan_in *= s
    return nn.initializers.normal(stddev=fan_in**-0.5)


def _kernel_names(module, n_in: int) -> tuple[tuple, tuple]:
    """Logical axis names of the kernel's input and output axes (None where unannotated)."""
    kernel = module.scope.get_variable("params", "kernel") if module.scope is not None else None
    names = getattr(kernel, "names", None)
    if not names:
        ndim = getattr(kernel, "ndim", n_in + 1)
        return (None,) * n_in, (None,) * (ndim - n_in)
    return tuple(names[:n_in]), tuple(names[n_in:])


class _ExpertAdapter(nn.Module):
    """The two adapter matrices of one expert weight: A [E, in, rank], B [E, rank, out] (B = 0)."""

    shape: tuple[int, int, int]  # the weight's [E, in, out]
    names: tuple  # its logical axis names
    rank: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self):
        e, n_in, n_out = self.shape
        a = self.param("lora_a", nn.with_logical_partitioning(_a_init((n_in,)), (self.names[0], self.names[1], None)),
                       (e, n_in, self.rank), self.dtype)  # fmt: skip
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (self.names[0], None, self.names[2])),
                       (e, self.rank, n_out), self.dtype)  # fmt: skip
        return a, b


def expert_adapters(module, weights: dict, lora_cfg, dtype) -> dict:
    """{name: (A [E, in, r], B [E, r, out] * alpha/rank)} for the expert weights of `module` (the
    MoE layer) that `lora_cfg.targets` names; `weights` maps name -> (shape, logical names). Empty
    when LoRA is off."""
    if not lora_cfg.rank:
        return {}
    patterns = target_patterns(lora_cfg.targets)
    prefix = "/".join(module.path)
    out = {}
    for name, (shape, names) in weights.items():
        if any(p.search(f"{prefix}/{name}") for p in patterns):
            a, b = _ExpertAdapter(shape, names, lora_cfg.rank, dtype, parent=module, name=f"{name}_lora")()
            out[name] = (a, b * (lora_cfg.alpha / lora_cfg.rank))
    return out


def merge(params, lora, dtype=jnp.float32) -> dict:
    """Params with every adapter folded into its kernel (W + alpha/rank * A B) and removed; a
    QLoRA base's int8 kernels come out widened to `dtype` (the model's param_dtype)."""
    scale = lora.alpha / lora.rank

    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        out = {k: walk(v) for k, v in tree.items() if k not in ADAPTERS and not _expert_adapter(k, v)}
        for k, v in tree.items():  # an MoE expert weight's adapters: `<weight>_lora/lora_a|b`
            if _expert_adapter(k, v):
                w = out[k[: -len("_lora")]]
                w = w.dequantize(dtype) if isinstance(w, quant.QTensor) else w
                delta = jnp.matmul(
                    v["lora_a"].astype(jnp.float32), v["lora_b"].astype(jnp.float32)
                )  # [.., E, in, out]
                out[k[: -len("_lora")]] = (w + scale * delta).astype(w.dtype)
        if "lora_a" in tree:
            a, b, w = tree["lora_a"], tree["lora_b"], tree["kernel"]
            if isinstance(w, quant.QTensor):  # a QLoRA base: the adapters were fit to its int8 values
                w = w.dequantize(dtype)
            stacked = a.ndim + b.ndim - 2 > w.ndim  # scanned: a leading layer axis on all three
            if stacked:
                delta = jax.vmap(lambda a_, b_: jnp.tensordot(a_, b_, axes=1))(a, b)
            else:
                delta = jnp.tensordot(a, b, axes=1)
            out["kernel"] = (w + scale * delta.astype(jnp.float32)).astype(w.dtype)
        return out

    return quant.dequantize(walk(params), dtype)


def _expert_adapter(key: str, value) -> bool:
    return key.endswith("_lora") and isinstance(value, dict) and "lora_a" in value


# Parameters a fine-tuning run owns besides the base it starts from: adapters, a new task head.
OWN_HEADS = ("cls_head",)


def _own(path: tuple[str, ...]) -> bool:
    return path[-1] in ADAPTERS or path[0] in OWN_HEADS


def split(params) -> tuple[dict, dict]:
    """(own, base): the params tree cut in two, each keeping only its leaves. `own` = the adapters
    and a task head (what a LoRA run trains and checkpoints); `base` = what comes from init_from."""

    def walk(tree, want_own: bool, prefix=()):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                sub = walk(v, want_own, (*prefix, k))
                if sub:
                    out[k] = sub
            elif _own((*prefix, k)) == want_own:
                out[k] = v
        return out

    return walk(params, True), walk(params, False)


def combine(base: dict, adapters: dict) -> dict:
    """The inverse of `split`."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = combine(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


# --- QLoRA: the frozen base's layer kernels stored as int8 -------------------------------------


def _is_q(x) -> bool:
    return isinstance(x, quant.QTensor)


def _base_kernel_axes(path, leaf) -> tuple[int, ...] | None:
    """The contracted axes of a layer-stack kernel of the base (what `quantize_base` stores as
    int8), or None for everything else: adapters, task heads, embeddings, norms, the output head."""
    names = tuple(str(getattr(k, "key", k)) for k in path)
    in_stack = names and (names[0] == layout.SCANNED or names[0].startswith("layer_"))
    if not in_stack or names[-1] not in ("kernel", *quant.EXPERT_WEIGHTS) or _own(names):
        return None
    return quant.contracted_axes(names, leaf)


def quantize_base(params, lora_cfg) -> dict:
    """`params` with the base's layer kernels as int8 QTensors when `lora_cfg.base_quant` asks
    for it (a no-op otherwise, and for kernels already quantized)."""
    if lora_cfg.base_quant == "none":
        return params

    def one(path, leaf):
        axes = None if _is_q(leaf) else _base_kernel_axes(path, leaf)
        return leaf if axes is None else quant.quantize_tensor(leaf, axes)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_q)


def quantized_target(target, lora_cfg):
    """The restore/state target (ShapeDtypeStructs with shardings) of `quantize_base`'s output:
    q keeps the kernel's sharding, the scales the kernel's minus its contracted axes."""
    if lora_cfg.base_quant == "none":
        return target

    def one(path, leaf):
        axes = _base_kernel_axes(path, leaf)
        if axes is None:
            return leaf
        sh = leaf.sharding
        scale_shape = tuple(1 if i in axes else n for i, n in enumerate(leaf.shape))
        scale_sh = None
        if isinstance(sh, NamedSharding):
            spec = tuple(sh.spec) + (None,) * (leaf.ndim - len(sh.spec))
            scale_sh = NamedSharding(sh.mesh, P(*(None if n == 1 else s for n, s in zip(scale_shape, spec))))
        return quant.QTensor(
            q=jax.ShapeDtypeStruct(leaf.shape, jnp.int8, sharding=sh),
            scale=jax.ShapeDtypeStruct(scale_shape, jnp.float32, sharding=scale_sh),
        )

    return jax.tree_util.tree_map_with_path(one, target)


def store_base(base, target, lora_cfg):
    """A restored float base in the form `target` (from `quantized_target`) holds it, placed with
    its shardings (a no-op without base_quant)."""
    if lora_cfg.base_quant == "none":
        return base
    shardings = jax.tree.map(lambda x: x.sharding, target)
    return jax.jit(lambda p: quantize_base(p, lora_cfg), out_shardings=shardings)(base)


def unquantized_target(target, dtype):
    """The inverse of `quantized_target`: what the base is restored into before `quantize_base`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.q.shape, jnp.dtype(dtype), sharding=x.q.sharding) if _is_q(x) else x,
        target,
        is_leaf=_is_q,
    )


def dequantizing(block_cls, dtype):
    """`block_cls` reading its int8 kernels widened (QLoRA's base): the params the block's modules
    see are dequantized on the way in; nothing is written back (the base is frozen)."""
    return nn.map_variables(block_cls, "params", lambda tree: quant.dequantize(tree, dtype))
