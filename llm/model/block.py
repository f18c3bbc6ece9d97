"""One transformer layer (`Block`), the scanned super-block of a layer pattern, and the FFN kinds.

A block is an attention sub-layer and an FFN sub-layer, each a residual branch (pre- or
post-norm). Which attention and which FFN is the layer's `LayerSpec` (llm/model/layout.py),
resolved through the registries: a new kind is a module plus one `register` line, never a
branch here. Parameter names are fixed by slot (`attn`, `mlp`), whatever the kind. Both are
called `(x_BTD, ctx)`; an FFN kind also tells llm/flops.py its `active_matmul_params(cfg)`.
"""

from __future__ import annotations

import flax.linen as nn

from llm.model.config import ModelConfig
from llm.model.context import LayerContext
from llm.model.layers import make_norm
from llm.model.layout import LayerSpec
from llm.model.registries import ATTENTION, FFN, MLP
from llm.sharding import constrain


@FFN.register("dense")
def dense_ffn(cfg: ModelConfig, name: str) -> nn.Module:
    """The dense feed-forward block: the `model.mlp` kind (gelu | swiglu)."""
    return MLP.get(cfg.mlp, "model.mlp")(cfg, name=name)


def _dense_matmul_params(cfg: ModelConfig) -> int:
    return (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model * cfg.ffn_dim


# Matmul weights one token passes through (llm/flops.py asks each FFN kind).
dense_ffn.active_matmul_params = _dense_matmul_params


class Block(nn.Module):
    """One layer: `spec.attention` then `spec.ffn`, each a residual branch (pre- or post-norm)."""

    cfg: ModelConfig
    spec: LayerSpec

    @nn.compact
    def __call__(self, x_BTD, ctx: LayerContext):
        cfg = self.cfg
        attn_cls = ATTENTION.get(self.spec.attention, "model.attention.kind")
        # Only NoPE layers pass the flag, so a kind without positions of its own needs no field.
        attn = attn_cls(cfg, nope=True, name="attn") if self.spec.nope else attn_cls(cfg, name="attn")
        ffn = FFN.get(self.spec.ffn, "model.ffn.kind")(cfg, name="mlp")
        norm1, norm2 = make_norm(cfg, "norm_attn"), make_norm(cfg, "norm_mlp")
        drop = nn.Dropout(cfg.dropout)
        det = ctx.deterministic

        if cfg.norm_position == "pre":
            x_BTD = x_BTD + drop(attn(norm1(x_BTD), ctx), det)
            x_BTD = x_BTD + drop(ffn(norm2(x_BTD), ctx), det)
        else:  # post-norm (original Transformer / GPT-1)
            x_BTD = norm1(x_BTD + drop(attn(x_BTD, ctx), det))
            x_BTD = norm2(x_BTD + drop(ffn(x_BTD, ctx), det))
        return constrain(x_BTD, ("batch", "length", "act_embed"))


class SuperBlock(nn.Module):
    """The repeating unit of a layer pattern under `scan_layers`: blocks `block_<j>` in order."""

    cfg: ModelConfig
    specs: tuple[LayerSpec, ...]
    block_cls: type = Block

    @nn.compact
    def __call__(self, x_BTD, ctx: LayerContext):
        for j, spec in enumerate(self.specs):
            x_BTD = self.block_cls(self.cfg, spec, name=f"block_{j}")(x_BTD, ctx.replace(layer=ctx.layer + j))
        return x_BTD
