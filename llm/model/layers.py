"""Norms and feed-forward blocks, with logical axis names on every parameter."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.model import dots
from llm.model.config import ModelConfig
from llm.model.registries import MLP, NORM
from llm.sharding import constrain


def dtypes(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


def init(std: float, names: tuple[str | None, ...]):
    """Normal(std) initializer whose parameter carries logical axis `names`."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def zeros(names):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def out_proj_std(cfg: ModelConfig) -> float:
    """GPT-2: residual output projections get std / sqrt(2 L) so the residual stream stays O(1)."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)


@NORM.register("layernorm")
def layernorm(cfg: ModelConfig, name: str) -> nn.Module:
    dtype, pdtype = dtypes(cfg)
    return nn.LayerNorm(
        epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=dtype, param_dtype=pdtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=zeros(("norm",)),
    )  # fmt: skip


@NORM.register("rmsnorm")
def rmsnorm(cfg: ModelConfig, name: str) -> nn.Module:
    dtype, pdtype = dtypes(cfg)
    return nn.RMSNorm(
        epsilon=cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
    )  # fmt: skip


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    return NORM.get(cfg.norm, "model.norm")(cfg, name)


def dense(cfg: ModelConfig, features: int, names, std: float, name: str) -> nn.Dense:
    dtype, pdtype = dtypes(cfg)
    return nn.Dense(
        features, use_bias=cfg.use_bias, dtype=dtype, param_dtype=pdtype, name=name,
        kernel_init=init(std, names), bias_init=zeros(names[-1:]), dot_general=dots.dot_general_for(cfg.matmul_dtype),
    )  # fmt: skip


@MLP.register("gelu")
class GeluMLP(nn.Module):
    """GPT-2 MLP: D -> F, tanh-GELU, F -> D."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, ctx=None):
        cfg = self.cfg
        h_BTF = dense(cfg, cfg.ffn_dim, ("embed", "mlp"), cfg.init_std, "fc_in")(x_BTD)
        h_BTF = constrain(jax.nn.gelu(h_BTF, approximate=True), ("batch", "length", "act_mlp"))
        return dense(cfg, cfg.d_model, ("mlp", "embed"), out_proj_std(cfg), "fc_out")(h_BTF)


@MLP.register("swiglu")
class SwiGLU(nn.Module):
    """Llama MLP: silu(x W_gate) * (x W_up), then W_down."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, ctx=None):
        cfg = self.cfg
        gate_BTF = dense(cfg, cfg.ffn_dim, ("embed", "mlp"), cfg.init_std, "gate")(x_BTD)
        up_BTF = dense(cfg, cfg.ffn_dim, ("embed", "mlp"), cfg.init_std, "up")(x_BTD)
        h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "act_mlp"))
        return dense(cfg, cfg.d_model, ("mlp", "embed"), out_proj_std(cfg), "down")(h_BTF)
