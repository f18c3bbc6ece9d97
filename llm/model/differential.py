"""Differential attention (`model.attention.kind=differential`; Ye et al. 2024, arXiv:2410.05258).

Each head's query and key are split into two halves of head_dim/2, each a rotary sub-head of its
own; two softmax maps are computed and subtracted:

    A = softmax(q1 k1^T / sqrt(h/2)) - lambda * softmax(q2 k2^T / sqrt(h/2)),   out = A v

with lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init (the paper's reparameterisation:
four learned vectors of head_dim/2 per layer, shared by the heads), lambda_init =
0.8 - 0.6 exp(-0.3 (l - 1)) for layer l (1-based), then a per-head RMSNorm of `out` and the
(1 - lambda_init) scale. Since A v = softmax1 v - lambda softmax2 v, it is two calls of the
ordinary attention core (fused where the math allows) on the same values.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from llm.model.attention import CausalSelfAttention, attend, head_norm, lambda_init, score_opts
from llm.model.context import LayerContext
from llm.model.registries import ATTENTION


@ATTENTION.register("differential")
class DifferentialAttention(CausalSelfAttention):
    """Two softmax maps per head, subtracted with a learned lambda (noise-cancelling attention)."""

    @staticmethod
    def score_macs(cfg, seq_len: int) -> int:  # two maps of head_dim/2 scores, two weighted sums of head_dim
        return seq_len * cfg.attention.n_heads * 3 * cfg.head_dim

    @nn.compact
    def __call__(self, x_BTD, ctx: LayerContext):
        cfg, a = self.cfg, self.attn_cfg
        n, kv, h = a.n_heads, a.kv_heads, cfg.head_dim
        half = h // 2
        pos = self.positional()
        q_BTNH, k_BTKH, v_BTKH = self.project_qkv(x_BTD)

        def halves(x, heads):  # [B, T, X, H] -> two rotary sub-heads [B, T, X, H/2]
            b, t = x.shape[:2]
            x = pos.rotate(x.reshape(b, t, heads * 2, half), ctx.positions_BT).reshape(b, t, heads, 2, half)
            return x[:, :, :, 0], x[:, :, :, 1]

        q1, q2 = halves(q_BTNH, n)
        k1, k2 = halves(k_BTKH, kv)
        if ctx.decoding:  # both key halves and the values share the ordinary K/V cache
            k_BSKH, v_BSKH, mask_B1TS, key_pos_BS = self.keys(jnp.concatenate([k1, k2], -1), v_BTKH, ctx)
            k1, k2 = k_BSKH[..., :half], k_BSKH[..., half:]
        else:
            v_BSKH, mask_B1TS, key_pos_BS = v_BTKH, ctx.mask_B1TS, ctx.key_positions_BS
        bias_BNTS = pos.bias(ctx.positions_BT, key_pos_BS, n)
        opts = score_opts(self, cfg, n, scale=half**-0.5)
        o1 = attend(self, q1, k1, v_BSKH, mask_B1TS, bias_BNTS, ctx.deterministic, opts)
        o2 = attend(self, q2, k2, v_BSKH, mask_B1TS, bias_BNTS, ctx.deterministic, opts)
        init = nn.initializers.normal(0.1)
        lq1, lk1, lq2, lk2 = (self.param(name, init, (half,), jnp.float32) for name in ("lambda_q1", "lambda_k1",
                                                                                           "lambda_q2", "lambda_k2"))  # fmt: skip
        lam_init = lambda_init(ctx.layer)
        lam = jnp.exp(jnp.sum(lq1 * lk1)) - jnp.exp(jnp.sum(lq2 * lk2)) + lam_init
        self.sow("intermediates", "diff_lambda", lam)
        out_BTNH = o1 - lam.astype(o1.dtype) * o2
        out_BTNH = head_norm(cfg, "subln")(out_BTNH) * (1.0 - lam_init).astype(out_BTNH.dtype)
        return self.out_proj(out_BTNH)
