"""Multi-head latent attention (`model.attention.kind=mla`; DeepSeek-V2, arXiv:2405.04434).

Keys and values come from one low-rank latent per token: c = RMSNorm(x W_dkv) (kv_lora_rank
wide), k_nope, v = c W_ukv per head; a separate `qk_rope_head_dim`-wide key, shared by all heads,
carries the rotary position. Queries: x W_q, or through their own latent when `q_lora_rank` is
set. Score = q_nope . k_nope + q_rope . k_rope, scaled by 1/sqrt(qk_nope + qk_rope).

Decoding caches only c and the rotated shared key: (kv_lora_rank + qk_rope_head_dim) values per
token and layer, against 2 * K * head_dim for MHA/GQA. `model.attention.mla.absorb` decodes
without expanding the cache: W_uk is folded into the queries (q_lat = q_nope W_uk^T) and W_uv into
the output, so every head attends over the shared latent directly (an MQA-shaped core over
kv_lora_rank + rope channels) — the same logits, less work per step for long caches.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.model import dots
from llm.model.attention import CausalSelfAttention, attend, head_norm, score_opts
from llm.model.context import LayerContext
from llm.model.layers import dtypes, init, zeros
from llm.model.registries import ATTENTION
from llm.sharding import constrain


@ATTENTION.register("mla")
class MultiHeadLatentAttention(CausalSelfAttention):
    """DeepSeek-V2/V3 attention: queries and keys/values through low-rank latents."""

    @staticmethod
    def matmul_params(cfg) -> int:
        d, m, n = cfg.d_model, cfg.attention.mla, cfg.attention.n_heads
        dq = m.qk_nope_head_dim + m.qk_rope_head_dim
        q = (d * m.q_lora_rank + m.q_lora_rank * n * dq) if m.q_lora_rank else d * n * dq
        kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * n * (
            m.qk_nope_head_dim + m.v_head_dim
        )
        return q + kv + n * m.v_head_dim * d

    @staticmethod
    def score_macs(cfg, seq_len: int) -> int:
        m = cfg.attention.mla
        return seq_len * cfg.attention.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)

    def _dense(self, x, features, names, name, std=None):
        cfg = self.cfg
        dtype, pdtype = dtypes(cfg)
        return nn.DenseGeneral(
            features, use_bias=False, dtype=dtype, param_dtype=pdtype, name=name,
            kernel_init=init(std or cfg.init_std, names), dot_general=dots.dot_general_for(cfg.matmul_dtype),
        )(x)  # fmt: skip

    @nn.compact
    def __call__(self, x_BTD, ctx: LayerContext):
        cfg, a = self.cfg, self.attn_cfg
        m = a.mla
        n, dn, dr, dv, r = a.n_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
        dtype, pdtype = dtypes(cfg)
        pos = self.positional()
        if m.q_lora_rank:
            cq_BTR = head_norm(cfg, "q_a_norm")(self._dense(x_BTD, m.q_lora_rank, ("embed", "q_lora"), "q_a"))
            q_BTNQ = self._dense(cq_BTR, (n, dn + dr), ("q_lora", "heads", "head_dim"), "q_b")
        else:
            q_BTNQ = self._dense(x_BTD, (n, dn + dr), ("embed", "heads", "head_dim"), "query")
        q_nope, q_rope = q_BTNQ[..., :dn], pos.rotate(q_BTNQ[..., dn:], ctx.positions_BT)
        kv_a = self._dense(x_BTD, r + dr, ("embed", "kv_lora"), "kv_a")
        c_BTR = head_norm(cfg, "kv_a_norm")(kv_a[..., :r])
        k_rope_BT1R = pos.rotate(kv_a[..., None, r:], ctx.positions_BT)  # one rotated key shared by all heads
        w_kvb_RNE = self.param(
            "kv_b", init(cfg.init_std, ("kv_lora", "heads", "head_dim")), (r, n, dn + dv), pdtype
        )
        w_kvb_RNE = w_kvb_RNE.astype(dtype)
        w_uk_RND, w_uv_RNV = w_kvb_RNE[..., :dn], w_kvb_RNE[..., dn:]

        mask_B1TS, key_pos_BS = ctx.mask_B1TS, ctx.key_positions_BS
        if ctx.decoding:  # cache the latent and the shared rotated key only
            c_BSR, k_rope_BS1R = _update_latent_cache(self, c_BTR, k_rope_BT1R, ctx.decode_index)
        else:
            c_BSR, k_rope_BS1R = c_BTR, k_rope_BT1R
        bias_BNTS = pos.bias(ctx.positions_BT, key_pos_BS, n)
        scale = (dn + dr) ** -0.5
        opts = score_opts(self, cfg, n, scale=scale)
        if ctx.decoding and m.absorb:
            # Fold W_uk into the queries and W_uv into the output: heads attend over the latent.
            q_lat_BTNR = jnp.einsum("btnd,rnd->btnr", q_nope, w_uk_RND)
            q_BTNQ = jnp.concatenate([q_lat_BTNR, q_rope.astype(q_lat_BTNR.dtype)], axis=-1)
            k_BS1Q = jnp.concatenate([c_BSR[:, :, None, :], k_rope_BS1R.astype(c_BSR.dtype)], axis=-1)
            out_lat_BTNR = attend(self, q_BTNQ, k_BS1Q, c_BSR[:, :, None, :], mask_B1TS, bias_BNTS, ctx.deterministic,
                                  opts)  # fmt: skip
            out_BTNV = jnp.einsum("btnr,rnv->btnv", out_lat_BTNR, w_uv_RNV)
        else:
            kv_BSNE = jnp.einsum("bsr,rne->bsne", c_BSR, w_kvb_RNE)
            k_nope, v_BSNV = kv_BSNE[..., :dn], kv_BSNE[..., dn:]
            k_BSNQ = jnp.concatenate(
                [k_nope, jnp.broadcast_to(k_rope_BS1R, (*k_nope.shape[:3], dr)).astype(k_nope.dtype)], -1
            )
            q_BTNQ = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)
            q_BTNQ = constrain(q_BTNQ, ("batch", "length", "act_heads", None))
            out_BTNV = attend(self, q_BTNQ, k_BSNQ, v_BSNV, mask_B1TS, bias_BNTS, ctx.deterministic, opts)
        return nn.DenseGeneral(
            cfg.d_model, axis=(-2, -1), use_bias=cfg.use_bias, dtype=dtype, param_dtype=pdtype, name="out",
            kernel_init=init(cfg.init_std / (2 * cfg.n_layers) ** 0.5, ("heads", "head_dim", "embed")),
            bias_init=zeros(("embed",)), dot_general=dots.dot_general_for(cfg.matmul_dtype),
        )(out_BTNV)  # fmt: skip


def _update_latent_cache(module, c_BTR, k_rope_BT1R, index):
    cl = module.variable("cache", "cached_latent", jnp.zeros, c_BTR.shape, c_BTR.dtype)
    ck = module.variable("cache", "cached_key_rope", jnp.zeros, k_rope_BT1R.shape, k_rope_BT1R.dtype)
    cl.value = jax.lax.dynamic_update_slice(cl.value, c_BTR.astype(cl.value.dtype), (0, index, 0))
    ck.value = jax.lax.dynamic_update_slice(ck.value, k_rope_BT1R.astype(ck.value.dtype), (0, index, 0, 0))
    return cl.value, ck.value
