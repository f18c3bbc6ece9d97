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
`all_linear` (every projection in attention and MLP). MoE expert weights are not linear modules
and are not adapted; the output head and embeddings neither.

Training: with `model.lora.rank > 0` every parameter but the adapters is frozen (a built-in
optimizer-group rule; `optim.groups` can unfreeze more, e.g. norms). With `train.init_from` the
base comes from that run and checkpoints hold the adapters alone (llm/checkpoint.py). `merge`
folds the adapters into the kernels (export, fast inference): `python -m llm.convert --merge_lora`.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

ADAPTERS = ("lora_a", "lora_b")
ALIASES = {
    "attention": r"(^|/)attn/(query|key|value|out)$",
    "attn_qv": r"(^|/)attn/(query|value)$",
    "mlp": r"(^|/)mlp/(fc_in|fc_out|gate|up|down)$",
    "all_linear": r"(^|/)(attn|mlp)/[^/]+$",
}
# optim.groups rules a LoRA run adds after the user's: adapters (and a classifier head) train, the rest is frozen.
OPTIMIZER_GROUPS = (r"(^|/)lora_(a|b)$: frozen=false", r"^cls_head/: frozen=false", r".*: frozen")


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


def merge(params, lora) -> dict:
    """Params with every adapter folded into its kernel (W + alpha/rank * A B) and removed."""
    scale = lora.alpha / lora.rank

    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        out = {k: walk(v) for k, v in tree.items() if k not in ADAPTERS}
        if "lora_a" in tree:
            a, b, w = tree["lora_a"], tree["lora_b"], tree["kernel"]
            stacked = a.ndim + b.ndim - 2 > w.ndim  # scanned: a leading layer axis on all three
            if stacked:
                delta = jax.vmap(lambda a_, b_: jnp.tensordot(a_, b_, axes=1))(a, b)
            else:
                delta = jnp.tensordot(a, b, axes=1)
            out["kernel"] = (w + scale * delta.astype(jnp.float32)).astype(w.dtype)
        return out

    return walk(params)


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
