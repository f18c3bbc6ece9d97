"""The optimizer: AdamW with warmup + cosine decay, global-norm clipping, and parameter groups as data.

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

import jax
import jax.numpy as jnp
import optax

from llm.config import OptimConfig
from llm.registry import ConfigError
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


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio,
    )  # fmt: skip


def make_optimizer(
    cfg: OptimConfig, total_steps: int, extra: tuple[str, ...] = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, learning-rate schedule) for these settings and run length.

    The chain: zero the gradients of frozen parameters -> clip by global norm -> (for the
    trainable parameters) Adam moments -> decoupled weight decay where `decay` -> x -lr(step) ->
    x lr_mult. Its state tree is the same whatever the rules say (frozen parameters hold an empty
    `MaskedNode` instead of moments), and with no rules the arithmetic is plain AdamW's.
    """
    schedule = make_schedule(cfg, total_steps)
    adam = optax.chain(
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=_mask(cfg, "decay", True, extra)),
        optax.scale_by_learning_rate(schedule),
        scale_by_lr_mult(cfg, extra),
    )
    parts = [optax.masked(optax.set_to_zero(), _mask(cfg, "frozen", True, extra))]
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.masked(adam, _mask(cfg, "frozen", False, extra)))
    return optax.chain(*parts), schedule
