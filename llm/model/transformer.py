"""The decoder-only transformer: embeddings, the layer stack (unrolled or scanned), the head.

The stack's layout (which module each layer is, what `nn.scan` repeats) is llm/model/layout.py's
`plan`; the layers themselves are llm/model/block.py; what each layer is told about the tokens is
a `LayerContext` (llm/model/context.py) built here once per call.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.model import channels, dots, layout, lora
from llm.model.attention import _positional
from llm.model.block import Block, SuperBlock
from llm.model.channels import LOSSES, MEMORY, METRICS, PARAM_UPDATES
from llm.model.config import ModelConfig
from llm.model.context import decode_context, training_context
from llm.model.layers import dtypes, init, make_norm
from llm.model.registries import REMAT
from llm.sharding import constrain

# Remat policies: what the backward pass may keep instead of recomputing. "none" = no remat.
REMAT.register("none")(None)
REMAT.register("full")(lambda: None)  # save nothing: recompute the whole block
REMAT.register("dots")(lambda: jax.checkpoint_policies.checkpoint_dots)
REMAT.register("dots_no_batch")(lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
REMAT.register("attention_out")(lambda: jax.checkpoint_policies.save_only_these_names("attention_out"))

# Collections whose variables get the scanned stack's leading repeat axis.
SCANNED_COLLECTIONS = ("params", "intermediates", LOSSES, METRICS, PARAM_UPDATES, "cache", MEMORY)


class Transformer(nn.Module):
    """tokens B T -> logits B T V. `positions` restart at 0 in each packed document.

    With `decode=True` the call appends its T tokens to the 'cache' collection (pass it mutable)
    and attends over everything cached so far; segment id 0 then marks padding tokens.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, deterministic=True,
                 decode: bool = False):  # fmt: skip
        cfg = self.cfg
        dtype, pdtype = dtypes(cfg)
        b, t = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((b, t), jnp.int32)
        pos = _positional(cfg)

        embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype, name="embed",
            embedding_init=init(cfg.init_std, ("vocab", "embed")),
        )  # fmt: skip
        x_BTD = embed(tokens_BT)
        if pos.learned_table:
            x_BTD = x_BTD + nn.Embed(
                cfg.max_seq_len, cfg.d_model, dtype=dtype, param_dtype=pdtype, name="pos_embed",
                embedding_init=init(cfg.init_std / 2, ("positions", "embed")),
            )(positions_BT)  # fmt: skip
        table_BTD = pos.embed(positions_BT, cfg.d_model)
        if table_BTD is not None:
            x_BTD = x_BTD + table_BTD.astype(dtype)
        # A zero "perturbation" here lets jax.grad read d(output)/d(input embedding) per position
        # (causality tests, saliency); it is a no-op unless the 'perturbations' collection is passed.
        x_BTD = self.perturb("embedded", x_BTD)
        x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic)
        x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))

        if decode:
            ctx = decode_context(self, positions_BT, segment_ids_BT, deterministic)
        else:
            ctx = training_context(positions_BT, segment_ids_BT, deterministic)
        if cfg.lora.rank:  # adapters on the targeted linear layers (llm/model/lora.py)
            # A QLoRA base (int8 layer kernels) is widened inside each layer; at init there is none.
            widen = cfg.lora.base_quant != "none" and not self.is_initializing()
            with nn.intercept_methods(lora.interceptor(cfg.lora, deterministic)):
                x_BTD = layer_stack(cfg, x_BTD, ctx, dequantize=widen)
        else:
            x_BTD = layer_stack(cfg, x_BTD, ctx)

        if cfg.norm_position == "pre":
            x_BTD = make_norm(cfg, "norm_final")(x_BTD)
        if cfg.head == "classifier":  # class logits [B, C] from one vector per sequence
            return classifier_head(cfg, x_BTD, segment_ids_BT)
        if cfg.tie_embeddings:
            # embed.attend's computation, with CPU-friendly gradients (llm/model/dots.py).
            logits_BTV = dots.attend(x_BTD.astype(dtype), embed.embedding.astype(dtype), cfg.matmul_dtype)
        else:
            logits_BTV = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype, name="lm_head",
                kernel_init=init(cfg.init_std, ("embed", "vocab")), dot_general=dots.dot_general_for(cfg.matmul_dtype),
            )(x_BTD)  # fmt: skip
        if cfg.monitor_logits:  # before capping: the statistic the cap exists to bound
            channels.add_metric(self, "logit_max", jnp.max(logits_BTV.astype(jnp.float32)))
        if cfg.final_logit_softcap is not None:  # Gemma-2: C * tanh(logits / C), in f32
            c = cfg.final_logit_softcap
            logits_BTV = (c * jnp.tanh(logits_BTV.astype(jnp.float32) / c)).astype(logits_BTV.dtype)
        return constrain(logits_BTV, ("batch", "length", "act_vocab"))


def pool(x_BTD, segment_ids_BT, how: str):
    """One vector per row: the last real token's (`last`; the only one that has seen the whole
    text under causal attention) or the mean over real tokens (`mean`). Padding has segment 0."""
    real_BT = segment_ids_BT != 0
    if how == "mean":
        w_BT1 = real_BT[..., None].astype(jnp.float32)
        return (jnp.sum(x_BTD.astype(jnp.float32) * w_BT1, 1) / jnp.maximum(jnp.sum(w_BT1, 1), 1.0)).astype(
            x_BTD.dtype
        )
    t = x_BTD.shape[1]
    last_B = jnp.max(jnp.where(real_BT, jnp.arange(t)[None], 0), axis=1)
    return jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)[:, 0]


def classifier_head(cfg: ModelConfig, x_BTD, segment_ids_BT):
    """`model.head=classifier`: a linear layer on the pooled hidden state -> [B, n_classes] (f32)."""
    dtype, pdtype = dtypes(cfg)
    pooled_BD = pool(x_BTD, segment_ids_BT, cfg.pool)
    head = nn.Dense(cfg.n_classes, dtype=dtype, param_dtype=pdtype, name="cls_head",
                    kernel_init=init(cfg.init_std, ("embed", None)))  # fmt: skip
    return head(pooled_BD).astype(jnp.float32)


def layer_stack(cfg: ModelConfig, x_BTD, ctx, dequantize: bool = False):
    """The layers, as llm/model/layout.py's plan lays them out (called inside Transformer's
    compact __call__, which becomes the parent of the modules created here). `dequantize`: the
    layers' kernels may be int8 QTensors (a QLoRA base), widened per layer inside its remat."""
    plan = layout.plan(cfg)
    block_cls = lora.dequantizing(Block, dtypes(cfg)[1]) if dequantize else Block
    policy = REMAT.get(cfg.remat, "model.remat")
    if policy is not None:
        block_cls = nn.remat(block_cls, policy=policy(), prevent_cse=not cfg.scan_layers)
    n_unrolled = plan.prefix if plan.scanned else len(plan.specs)
    for i in range(n_unrolled):
        x_BTD = block_cls(cfg, plan.specs[i], name=f"layer_{i}")(x_BTD, ctx.replace(layer=i))
    if plan.scanned:
        scanned = nn.scan(
            lambda blk, x, c, layer: (blk(x, c.replace(layer=layer)), None),
            variable_axes={c: 0 for c in SCANNED_COLLECTIONS},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, 0),
            length=plan.repeats,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        if plan.period == 1:
            unit = block_cls(cfg, plan.unit[0], name=layout.SCANNED)
        else:
            unit = SuperBlock(cfg, plan.unit, block_cls, name=layout.SCANNED)
        first_layer_R = plan.prefix + plan.period * jnp.arange(plan.repeats, dtype=jnp.int32)
        x_BTD, _ = scanned(unit, x_BTD, ctx, first_layer_R)
    return x_BTD
