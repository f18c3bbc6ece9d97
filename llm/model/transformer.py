"""The decoder-only transformer: embeddings, a stack of blocks (optionally scanned/rematted), head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.model import dots
from llm.model.attention import _positional
from llm.model.config import ModelConfig
from llm.model.layers import dtypes, init, make_norm
from llm.model.registries import ATTENTION, MLP, REMAT
from llm.sharding import constrain

# Remat policies: what the backward pass may keep instead of recomputing. "none" = no remat.
REMAT.register("none")(None)
REMAT.register("full")(lambda: None)  # save nothing: recompute the whole block
REMAT.register("dots")(lambda: jax.checkpoint_policies.checkpoint_dots)
REMAT.register("dots_no_batch")(lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
REMAT.register("attention_out")(lambda: jax.checkpoint_policies.save_only_these_names("attention_out"))


class Block(nn.Module):
    """One transformer layer: attention and MLP, each a residual branch (pre- or post-norm)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, mask_B1TS, bias_BNTS, decode_index, deterministic: bool):
        cfg = self.cfg
        attn = ATTENTION.get(cfg.attention.kind, "model.attention.kind")(cfg, name="attn")
        mlp = MLP.get(cfg.mlp, "model.mlp")(cfg, name="mlp")
        norm1, norm2 = make_norm(cfg, "norm_attn"), make_norm(cfg, "norm_mlp")
        drop = nn.Dropout(cfg.dropout)

        def attn_branch(h):
            out = attn(h, positions_BT, mask_B1TS, bias_BNTS, deterministic, decode_index=decode_index)
            return drop(out, deterministic)

        if cfg.norm_position == "pre":
            x_BTD = x_BTD + attn_branch(norm1(x_BTD))
            x_BTD = x_BTD + drop(mlp(norm2(x_BTD)), deterministic)
        else:  # post-norm (original Transformer / GPT-1)
            x_BTD = norm1(x_BTD + attn_branch(x_BTD))
            x_BTD = norm2(x_BTD + drop(mlp(x_BTD), deterministic))
        return constrain(x_BTD, ("batch", "length", "act_embed"))


def attention_mask(segment_ids_BT):
    """Causal mask that also keeps tokens of different packed documents apart: B 1 T S (bool)."""
    t = segment_ids_BT.shape[1]
    causal_TS = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    same_doc_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return (causal_TS[None] & same_doc_BTS)[:, None]


def decode_context(module: nn.Module, positions_BT, segment_ids_BT):
    """Mask, key positions and write slot for T new tokens joining the decode cache.

    The model-level cache holds, per row and slot, the token's position and whether the slot holds
    a real token (padding and empty slots do not), so rows of different lengths share one cache.
    Returns mask B 1 T S (a query sees valid slots up to its own), key positions B S, the slot.
    """
    b, t = positions_BT.shape
    index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    key_pos = module.variable("cache", "key_pos", jnp.zeros, (b, t), jnp.int32)
    key_valid = module.variable("cache", "key_valid", jnp.zeros, (b, t), jnp.bool_)
    start = index.value
    key_pos.value = jax.lax.dynamic_update_slice(key_pos.value, positions_BT.astype(jnp.int32), (0, start))
    key_valid.value = jax.lax.dynamic_update_slice(key_valid.value, segment_ids_BT != 0, (0, start))
    index.value = start + t
    slot_S = jnp.arange(key_pos.value.shape[1])
    query_slot_T = start + jnp.arange(t)
    causal_TS = slot_S[None, :] <= query_slot_T[:, None]
    mask_B1TS = (key_valid.value[:, None, :] & causal_TS[None])[:, None]
    return mask_B1TS, key_pos.value, start


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
            mask_B1TS, key_pos_BS, decode_index = decode_context(self, positions_BT, segment_ids_BT)
        else:
            mask_B1TS, key_pos_BS, decode_index = attention_mask(segment_ids_BT), positions_BT, None
        bias_BNTS = pos.bias(positions_BT, key_pos_BS, cfg.attention.n_heads)

        block_cls = Block
        policy = REMAT.get(cfg.remat, "model.remat")
        if policy is not None:
            # deterministic is the last positional argument and must stay a Python bool.
            block_cls = nn.remat(Block, policy=policy(), prevent_cse=not cfg.scan_layers,
                                 static_argnums=(-1,))  # fmt: skip
        if cfg.scan_layers:
            scanned = nn.scan(
                lambda blk, x, *args: (blk(x, *args, deterministic), None),
                variable_axes={"params": 0, "intermediates": 0, "losses": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BTD, _ = scanned(
                block_cls(cfg, name="layers"), x_BTD, positions_BT, mask_B1TS, bias_BNTS, decode_index
            )
        else:
            for i in range(cfg.n_layers):
                x_BTD = block_cls(cfg, name=f"layer_{i}")(
                    x_BTD, positions_BT, mask_B1TS, bias_BNTS, decode_index, deterministic
                )

        if cfg.norm_position == "pre":
            x_BTD = make_norm(cfg, "norm_final")(x_BTD)
        if cfg.tie_embeddings:
            # embed.attend's computation, with CPU-friendly gradients (llm/model/dots.py).
            logits_BTV = dots.attend(x_BTD.astype(dtype), embed.embedding.astype(dtype), cfg.matmul_dtype)
        else:
            logits_BTV = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype, name="lm_head",
                kernel_init=init(cfg.init_std, ("embed", "vocab")), dot_general=dots.dot_general_for(cfg.matmul_dtype),
            )(x_BTD)  # fmt: skip
        return constrain(logits_BTV, ("batch", "length", "act_vocab"))
