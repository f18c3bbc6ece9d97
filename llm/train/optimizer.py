"""The optimizer: a registry of update rules (AdamW, Muon, Lion, Adafactor) and of learning-rate
schedules (cosine, WSD, linear, constant), global-norm clipping, and parameter groups as data.

Groups are rules over parameter paths (`layer_0/attn/query/kernel`), not optimizer branches:
`optim.groups` holds rules such as

    "infini/gate: lr_mult=100 decay=false"     # a gate with its own learning rate, no decay
    "^(embed|layer_[0-3])/: frozen"            # freeze the embeddings and the first four layers

Each rule is `<regex searched in the path>: <setting>...` with the settings `lr_mult=<float>`,
`decay=<true|false>` (decoupled weight decay at optim.weight_decay) and `frozen` (no update and
no Adam moments). For every parameter and every setting, the first rule that matches the path
and names the setting decides; the user's rules come first, then the built-in ones, which
reproduce the classic grouping: no decay on embeddings (unless optim.decay_embeddings), norms
and biases (unless optim.decay_norms_and_biases), decay on the other matrices.

One Adam state covers every trainable parameter, so changing a multiplier or a decay setting
does not change the optimizer-state tree (checkpoints stay compatible); only freezing does.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from optax.contrib._muon import scale_by_shape  # (public in optax.contrib.muon's chain; not exported)

from llm.config import OptimConfig
from llm.registry import ConfigError, Registry
from llm.sharding import path_str

SETTINGS = ("lr_mult", "decay", "frozen")


@dataclasses.dataclass(frozen=True)
class GroupRule:
    """A pattern over parameter paths and the settings it decides (None = leaves it to later rules)."""

    pattern: str
    lr_mult: float | None = None
    decay: bool | None = None
    frozen: bool | None = None

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


def parse_rule(text: str) -> GroupRule:
    """'<regex>: lr_mult=10 decay=false frozen' -> GroupRule; errors name the rule and the syntax."""
    pattern, sep, rest = text.rpartition(":")
    pattern = pattern.strip()
    if not sep or not pattern:
        raise ConfigError(
            f"optim.groups rule {text!r}: write '<regex>: lr_mult=<x> decay=<true|false> frozen'"
        )
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"optim.groups rule {text!r}: bad regex {pattern!r} ({e})") from e
    kw: dict = {}
    for item in rest.replace(",", " ").split():
        key, eq, value = item.partition("=")
        if key not in SETTINGS:
            raise ConfigError(
                f"optim.groups rule {text!r}: unknown setting {key!r}; valid: {', '.join(SETTINGS)}"
            )
        if key == "lr_mult":
            try:
                kw[key] = float(value)
            except ValueError:
                raise ConfigError(
                    f"optim.groups rule {text!r}: lr_mult needs a number, got {value!r}"
                ) from None
        else:
            v = value.lower() if eq else "true"
            if v not in ("true", "false"):
                raise ConfigError(f"optim.groups rule {text!r}: {key} is true or false, got {value!r}")
            kw[key] = v == "true"
    if not kw:
        raise ConfigError(f"optim.groups rule {text!r} sets nothing; add lr_mult=, decay= or frozen")
    return GroupRule(pattern, **kw)


def rules(cfg: OptimConfig, extra: tuple[str, ...] = ()) -> list[GroupRule]:
    """The user's rules (optim.groups), then `extra` (a LoRA run's: llm/model/lora.py), then the
    built-in ones (the classic decay grouping)."""
    return [parse_rule(r) for r in (*cfg.groups, *extra)] + [
        # Set outside the optimizer by its layer (an MoE balancing bias: llm/model/moe.py).
        GroupRule(r"(^|/)router_bias$", frozen=True),
        # Infini-attention's gate beta: never decayed toward 0 (= an even mix); its own lr through
        # optim.groups, e.g. "('infini_gate: lr_mult=10',)" (configs/infini_passkey.py).
        GroupRule(r"(^|/)infini_gate$", decay=False),
        GroupRule(r"(^|/)(embed|pos_embed)(/|$)", decay=cfg.decay_embeddings),
        GroupRule(r"/(bias|scale)$", decay=cfg.decay_norms_and_biases),
        GroupRule(r"", lr_mult=1.0, decay=True, frozen=False),
    ]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the optimizer does to one parameter (a pytree leaf: not registered as a node)."""

    lr_mult: float
    decay: bool
    frozen: bool


def settings_for(path: str, rule_list: list[GroupRule]) -> Settings:
    """The settings of the parameter at `path`: per setting, the first rule that names it."""
    return Settings(**{
        name: next(getattr(r, name) for r in rule_list if getattr(r, name) is not None and r.matches(path))
        for name in SETTINGS
    })  # fmt: skip


def param_settings(params, cfg: OptimConfig, extra: tuple[str, ...] = ()):
    """Pytree of `Settings`, same structure as `params` (boxed or not)."""
    rule_list = rules(cfg, extra)
    return jax.tree_util.tree_map_with_path(lambda p, _: settings_for(path_str(p), rule_list), params)


def _mask(cfg: OptimConfig, setting: str, value=True, extra: tuple[str, ...] = ()):
    return lambda params: jax.tree.map(
        lambda s: getattr(s, setting) == value, param_settings(params, cfg, extra)
    )


def trainable_mask(cfg: OptimConfig, extra: tuple[str, ...] = ()):
    """params -> pytree of bools, True where the parameter is not frozen."""
    return _mask(cfg, "frozen", False, extra)


def scale_by_lr_mult(cfg: OptimConfig, extra: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """Multiply each update by its parameter's lr_mult (stateless)."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_lr_mult needs the params to know each parameter's path")
        mults = jax.tree.map(lambda s: s.lr_mult, param_settings(params, cfg, extra))
        return jax.tree.map(
            lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype), updates, mults
        ), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ---- learning-rate schedules (optim.schedule) -------------------------------------------------

SCHEDULES: Registry = Registry("learning-rate schedule")
WSD_SHAPES = ("linear", "cosine", "sqrt")


def _warmup(cfg: OptimConfig, total_steps: int) -> int:
    return min(cfg.warmup_steps, max(total_steps - 1, 0))


def _with_warmup(cfg: OptimConfig, total_steps: int, after: Callable) -> optax.Schedule:
    """Linear warmup 0 -> lr over the warmup steps, then `after(step)`."""
    warm = _warmup(cfg, total_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        return jnp.where(step < warm, cfg.lr * step / max(warm, 1), after(step))

    return schedule


@SCHEDULES.register("cosine")
def cosine_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Warmup, then cosine decay to lr * min_lr_ratio at total_steps."""
    warm = _warmup(cfg, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warm,
        decay_steps=max(total_steps, warm + 1), end_value=cfg.lr * cfg.min_lr_ratio,
    )  # fmt: skip


@SCHEDULES.register("constant")
def constant_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    return _with_warmup(cfg, total_steps, lambda step: jnp.full_like(step, cfg.lr))


@SCHEDULES.register("linear")
def linear_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Warmup, then a straight line to lr * min_lr_ratio at total_steps."""
    warm, end = _warmup(cfg, total_steps), cfg.lr * cfg.min_lr_ratio
    span = max(total_steps - warm, 1)
    return _with_warmup(
        cfg, total_steps, lambda step: cfg.lr + (end - cfg.lr) * jnp.clip((step - warm) / span, 0, 1)
    )


@SCHEDULES.register("wsd")
def wsd_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Warmup, stable at lr, then over the last optim.wsd.decay_fraction of the steps down to
    lr * min_lr_ratio, shaped linear, cosine or 1 - sqrt."""
    end = cfg.lr * cfg.min_lr_ratio
    n_decay = max(1, round(total_steps * cfg.wsd.decay_fraction))
    start = total_steps - n_decay
    shape = {
        "linear": lambda f: f,
        "cosine": lambda f: 0.5 * (1 - jnp.cos(jnp.pi * f)),
        "sqrt": jnp.sqrt,
    }[cfg.wsd.decay_shape]
    return _with_warmup(cfg, total_steps,
                        lambda step: cfg.lr - (cfg.lr - end) * shape(jnp.clip((step - start) / n_decay, 0, 1)))  # fmt: skip


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    return SCHEDULES.get(cfg.schedule, "optim.schedule")(cfg, total_steps)


# ---- update directions (optim.name) -----------------------------------------------------------
#
# Each optimizer is the transformation that turns (clipped) gradients into an update direction;
# weight decay, the learning rate, lr_mult and freezing are applied around it the same way for all.

OPTIMIZERS: Registry = Registry("optimizer")


@OPTIMIZERS.register("adamw")
def adamw_direction(cfg: OptimConfig, param_axes=None) -> optax.GradientTransformation:
    return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)


@OPTIMIZERS.register("lion")
def lion_direction(cfg: OptimConfig, param_axes=None) -> optax.GradientTransformation:
    return optax.scale_by_lion(b1=cfg.lion.b1, b2=cfg.lion.b2)


@OPTIMIZERS.register("adafactor")
def adafactor_direction(cfg: OptimConfig, param_axes=None) -> optax.GradientTransformation:
    a = cfg.adafactor
    parts = [optax.scale_by_factored_rms(factored=True, decay_rate=a.decay_rate,
                                         min_dim_size_to_factor=a.min_dim_size_to_factor, epsilon=a.eps)]  # fmt: skip
    if a.clipping_threshold > 0:
        parts.append(optax.clip_by_block_rms(a.clipping_threshold))
    if a.multiply_by_parameter_scale:
        parts.append(optax.scale_by_param_block_rms())
    if a.momentum > 0:
        parts.append(optax.ema(a.momentum, debias=False))
    return optax.chain(*parts)


# Logical axes that stack independent matrices (scanned layers, experts): Muon orthogonalises
# each slice on its own. A parameter with a vocab or positions axis (embeddings, the output head)
# or fewer than two other axes (norms, biases) is Adam's, as are MoE routers.
MUON_BATCH_AXES = ("layers", "expert")
MUON_ADAM_AXES = ("vocab", "positions")
MUON_ADAM_PATHS = r"(^|/)(router|router_bias|infini_gate)(/|$)"


def muon_dimension_numbers(path: str, names: tuple) -> MuonDimensionNumbers | None:
    """How Muon sees one parameter, from its logical axis names: None (Adam's), or which axes are
    the matrix's input (reduction) and output, every other axis a batch of independent matrices.

    A kernel is [*inputs, *outputs] (flax DenseGeneral): the attention output projection
    (heads, head_dim, embed) maps its leading axes to `embed`; every other kernel maps its first
    non-batch axis (`embed` for q/k/v and MLP inputs, `mlp` for the MLP output) to the rest."""
    names = tuple(names)
    if re.search(MUON_ADAM_PATHS, path) or any(n in MUON_ADAM_AXES for n in names):
        return None
    mat = [i for i, n in enumerate(names) if n not in MUON_BATCH_AXES]
    if len(mat) < 2:
        return None
    if names[mat[-1]] == "embed" and names[mat[0]] != "embed":
        return MuonDimensionNumbers(reduction_axis=tuple(mat[:-1]), output_axis=(mat[-1],))
    return MuonDimensionNumbers(reduction_axis=(mat[0],), output_axis=tuple(mat[1:]))


def muon_dims_tree(param_axes):
    """{param path: MuonDimensionNumbers | None} as a tree like the params (from PartitionSpecs)."""
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    return jax.tree_util.tree_map_with_path(
        lambda p, spec: muon_dimension_numbers(path_str(p), tuple(spec)), param_axes, is_leaf=is_spec
    )


@OPTIMIZERS.register("muon")
def muon_direction(cfg: OptimConfig, param_axes=None) -> optax.GradientTransformation:
    """Muon on the hidden matrices (stacked ones per slice, by their logical axes), Adam elsewhere."""
    if param_axes is None:
        raise ValueError("optim.name=muon needs the parameters' logical axes (make_optimizer(param_axes=...)): "
                         "without them stacked kernels would silently fall back to Adam")  # fmt: skip
    m = cfg.muon
    dims = muon_dims_tree(param_axes)
    is_dims = lambda x: x is None or isinstance(x, MuonDimensionNumbers)  # noqa: E731
    labels = jax.tree.map(lambda d: "adam" if d is None else "muon", dims, is_leaf=is_dims)
    # Inside the partition the Muon half sees the Adam leaves as MaskedNode: mirror that.
    muon_dims = jax.tree.map(lambda d: optax.MaskedNode() if d is None else d, dims, is_leaf=is_dims)
    muon = optax.chain(
        scale_by_muon(
            ns_steps=m.ns_steps,
            beta=m.momentum,
            nesterov=m.nesterov,
            weight_dimension_numbers=lambda _: muon_dims,
        ),  # fmt: skip
        scale_by_shape(weight_dimension_numbers=lambda _: muon_dims, consistent_rms=m.consistent_rms or None),
        optax.scale(m.lr_ratio),
    )
    adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    return optax.partition({"muon": muon, "adam": adam}, lambda _: labels)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, extra: tuple[str, ...] = (), param_axes=None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, learning-rate schedule) for these settings and run length.

    The chain: zero the gradients of frozen parameters -> clip by global norm -> (for the
    trainable parameters) the optimizer's direction (optim.name: Adam moments, Muon, Lion,
    Adafactor) -> decoupled weight decay where `decay` -> x -lr(step) -> x lr_mult. Its state tree
    is the same whatever the rules say (frozen parameters hold an empty `MaskedNode` instead of
    moments), and with no rules and adamw the arithmetic is plain AdamW's. `param_axes` (the
    params' logical PartitionSpecs) tells Muon each parameter's matrix axes.
    """
    schedule = make_schedule(cfg, total_steps)
    update = optax.chain(
        OPTIMIZERS.get(cfg.name, "optim.name")(cfg, param_axes),
        optax.add_decayed_weights(cfg.weight_decay, mask=_mask(cfg, "decay", True, extra)),
        optax.scale_by_learning_rate(schedule),
        scale_by_lr_mult(cfg, extra),
    )
    parts = [optax.masked(optax.set_to_zero(), _mask(cfg, "frozen", True, extra))]
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.masked(update, _mask(cfg, "frozen", False, extra)))
    return optax.chain(*parts), schedule
