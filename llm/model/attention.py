"""Self-attention kinds (registry ATTENTION) and score implementations (registry ATTENTION_IMPL).

Kinds, each `__call__(x_BTD, ctx: LayerContext)` (llm/model/context.py), selected per layer by
`model.attention.kind` / `model.attention.pattern`:
- `causal`: MHA/GQA/MQA over every earlier token of the document; decode caches K/V of its K heads.
- `local`: the same within a sliding window of `model.attention.local.window` positions; decode
  keeps a ring buffer of `window` slots, so its cache is bounded for any length (Mistral, Gemma).
- `nope`: causal without positional rotation/bias (NoPE layers; also `model.attention.nope_every`).
- `mla` (llm/model/mla.py) and `differential` (llm/model/differential.py).
Options every kind honours: `qk_norm` (RMSNorm of each head's q and k before RoPE), `logit_softcap`
(tanh capping of scores), `sinks` (a learned per-head logit in the softmax denominator).

Score implementations compute softmax(q k^T scale + bias, masked) v: `einsum` (the autodiff
reference; sows maps for llm.introspect), `fused` (llm/model/attention_core.py, hand-written
backward, the default) and `jax` (jax.nn.dot_product_attention).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llm.model import attention_core, channels, dots
from llm.model.attention_core import NEG_INF
from llm.model.config import ModelConfig
from llm.model.context import LayerContext
from llm.model.layers import dtypes, init, out_proj_std, zeros
from llm.model.positional import Positional
from llm.model.registries import ATTENTION, ATTENTION_IMPL
from llm.sharding import constrain


class ScoreOpts(NamedTuple):
    """What a score implementation applies besides the mask and the bias."""

    scale: float | None = None  # None = 1/sqrt(q's head dim)
    softcap: float | None = None  # C * tanh(s / C) (Gemma-2)
    sink_N: jax.Array | None = None  # per-head sink logit (gpt-oss)
    monitor: bool = False  # sow the largest attention logit (model.monitor_logits)
    query_block: int = 0  # the mask is causal in index order: skip its masked blocks (attention_core)


def _scale(opts: ScoreOpts, h: int) -> float:
    return h**-0.5 if opts.scale is None else opts.scale


@ATTENTION_IMPL.register("einsum")
def einsum_attention(
    module, q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS, deterministic, opts: ScoreOpts | None = None
):
    """Reference implementation (autodiff backward): fp32 scores and softmax, GQA by grouping query heads."""
    opts = opts or ScoreOpts()
    b, t, n, h = q_BTNH.shape
    kv, hv = k_BSKH.shape[2], v_BSKH.shape[-1]
    q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
    scores_BKGTS = dots.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, jnp.float32, module.cfg.matmul_dtype)
    scores_BKGTS = scores_BKGTS * _scale(opts, h)
    if bias_BNTS is not None:
        scores_BKGTS = scores_BKGTS + bias_BNTS.reshape(b, kv, n // kv, t, -1)
    if opts.softcap is not None:
        scores_BKGTS = opts.softcap * jnp.tanh(scores_BKGTS / opts.softcap)
    scores_BKGTS = jnp.where(mask_B1TS[:, :, None], scores_BKGTS, NEG_INF)
    # Sown for llm.introspect (logit statistics); masked entries stay NEG_INF so readers can tell.
    module.sow("intermediates", "attn_logits", scores_BKGTS.reshape(b, n, t, -1))
    if opts.monitor:
        channels.add_metric(module, "attn_logit_max", jnp.max(scores_BKGTS))
    # Softmax in fp32: bf16 loses the small probabilities of long rows.
    if opts.sink_N is None:
        probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
    else:  # the sink joins the denominator with no value: its probability mass is dropped
        sink = jnp.broadcast_to(
            opts.sink_N.astype(jnp.float32).reshape(1, kv, n // kv, 1, 1), (b, kv, n // kv, t, 1)
        )
        probs_BKGTS = jax.nn.softmax(jnp.concatenate([scores_BKGTS, sink], axis=-1), axis=-1)[..., :-1]
    module.sow("intermediates", "attn_probs", probs_BKGTS.reshape(b, n, t, -1))
    rate = module.attn_cfg.dropout
    if rate > 0 and not deterministic:
        probs_BKGTS = nn.Dropout(rate, name="attn_dropout")(probs_BKGTS, deterministic=False)
    out_BTKGH = dots.einsum("bkgts,bskh->btkgh", probs_BKGTS.astype(v_BSKH.dtype), v_BSKH,
                            matmul_dtype=module.cfg.matmul_dtype)  # fmt: skip
    return out_BTKGH.reshape(b, t, n, hv)


@ATTENTION_IMPL.register("jax")
def jax_attention(
    module, q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS, deterministic, opts: ScoreOpts | None = None
):
    """jax.nn.dot_product_attention: XLA's fused path on CPU/TPU, cuDNN flash on GPU via XLA."""
    opts = opts or ScoreOpts()
    if (
        opts.softcap is not None
        or opts.sink_N is not None
        or opts.monitor
        or q_BTNH.shape[-1] != v_BSKH.shape[-1]
    ):
        # No soft-capping, sinks, score max or a v head dim of its own there: the reference path.
        return einsum_attention(module, q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS, deterministic, opts)
    if module.attn_cfg.dropout > 0 and not deterministic:
        raise ValueError("model.attention.impl=jax has no attention dropout; use impl=einsum")
    dtype, mm = q_BTNH.dtype, module.cfg.matmul_dtype
    if mm is not None and dtype == jnp.float32:  # autocast: bf16 inputs, result back in f32
        q_BTNH, k_BSKH, v_BSKH = (x.astype(mm) for x in (q_BTNH, k_BSKH, v_BSKH))
    out = jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH,
        bias=None if bias_BNTS is None else bias_BNTS.astype(q_BTNH.dtype),
        mask=mask_B1TS, scale=opts.scale,
    )  # fmt: skip
    return out.astype(dtype)


@ATTENTION_IMPL.register("fused")
def fused_attention(
    module, q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS, deterministic, opts: ScoreOpts | None = None
):
    """The einsum math as one op with a hand-written backward in XLA:CPU's fast matmul forms
    (llm/model/attention_core.py), windows, soft-capping and sinks included. Falls back to
    `einsum` where it has no equivalent: ALiBi's additive bias, attention dropout in training,
    and introspection (sown logits/probs)."""
    opts = opts or ScoreOpts()
    dropout = module.attn_cfg.dropout > 0 and not deterministic
    if bias_BNTS is not None or dropout or module.is_mutable_collection("intermediates"):
        return einsum_attention(module, q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS, deterministic, opts)
    out = attention_core.causal_core(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, module.cfg.matmul_dtype, scale=opts.scale,
                                     softcap=opts.softcap, sink_N=opts.sink_N, want_max=opts.monitor,
                                     query_block=opts.query_block)  # fmt: skip
    if opts.monitor:
        out, smax_BK = out
        channels.add_metric(module, "attn_logit_max", jnp.max(smax_BK))
    return out


def attend(module, q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS, deterministic, opts: ScoreOpts):
    """The configured score implementation, its output named for the `attention_out` remat policy."""
    impl = ATTENTION_IMPL.get(module.attn_cfg.impl, "model.attention.impl")
    out = impl(module, q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS, deterministic, opts)
    return checkpoint_name(out, "attention_out")


def head_norm(cfg: ModelConfig, name: str, dim: int | None = None) -> nn.Module:
    """RMSNorm over one head's channels (QK-norm, differential attention's per-head norm)."""
    dtype, pdtype = dtypes(cfg)
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("head_dim",)))  # fmt: skip


def score_opts(module, cfg: ModelConfig, n_heads: int, scale: float | None = None) -> ScoreOpts:
    """The options of `model.attention` for this module (creates the sink parameter if on)."""
    a = cfg.attention
    sink = module.param("sinks", zeros(("heads",)), (n_heads,), jnp.float32) if a.sinks else None
    return ScoreOpts(scale=scale, softcap=a.logit_softcap, sink_N=sink, monitor=cfg.monitor_logits)


@ATTENTION.register("causal")
class CausalSelfAttention(nn.Module):
    """Projections to N query and K key/value heads, positional rotation, scores, output proj."""

    cfg: ModelConfig
    nope: bool = False  # no positional rotation or bias in this layer (NoPE)

    @property
    def attn_cfg(self):
        return self.cfg.attention

    # What llm/flops.py asks each kind (per token and layer): matmul weights, and multiply-adds of
    # the scores and the weighted values against `seq_len` keys (the full square, as PaLM counts).
    @staticmethod
    def matmul_params(cfg: ModelConfig) -> int:
        d, h, n, k = cfg.d_model, cfg.head_dim, cfg.attention.n_heads, cfg.attention.kv_heads
        return d * n * h + 2 * d * k * h + n * h * d  # q, k, v, out

    @staticmethod
    def score_macs(cfg: ModelConfig, seq_len: int) -> int:
        return seq_len * cfg.attention.n_heads * 2 * cfg.head_dim

    def project(self, x_BTD, heads: int, head_axis: str, name: str, dim: int | None = None):
        cfg = self.cfg
        dtype, pdtype = dtypes(cfg)
        return nn.DenseGeneral(
            (heads, dim or cfg.head_dim), use_bias=cfg.use_bias, dtype=dtype, param_dtype=pdtype, name=name,
            kernel_init=init(cfg.init_std, ("embed", head_axis, "head_dim")),
            bias_init=zeros((head_axis, "head_dim")), dot_general=dots.dot_general_for(cfg.matmul_dtype),
        )(x_BTD)  # fmt: skip

    def out_proj(self, out_BTNH):
        cfg = self.cfg
        dtype, pdtype = dtypes(cfg)
        return nn.DenseGeneral(
            cfg.d_model, axis=(-2, -1), use_bias=cfg.use_bias, dtype=dtype, param_dtype=pdtype,
            kernel_init=init(out_proj_std(cfg), ("heads", "head_dim", "embed")),
            bias_init=zeros(("embed",)), name="out", dot_general=dots.dot_general_for(cfg.matmul_dtype),
        )(out_BTNH)  # fmt: skip

    def positional(self) -> Positional:
        return _positional(self.cfg.replace(positional="none") if self.nope else self.cfg)

    def project_qkv(self, x_BTD):
        """Queries B T N H, keys and values B T K H: projected and QK-normed, not yet rotated."""
        a = self.attn_cfg
        q_BTNH = self.project(x_BTD, a.n_heads, "heads", "query")
        k_BTKH = self.project(x_BTD, a.kv_heads, "kv_heads", "key")
        v_BTKH = self.project(x_BTD, a.kv_heads, "kv_heads", "value")
        if a.qk_norm:  # before RoPE, as OLMo-2 / Gemma-3: bounds the logits whatever the positions
            q_BTNH, k_BTKH = head_norm(self.cfg, "q_norm")(q_BTNH), head_norm(self.cfg, "k_norm")(k_BTKH)
        return q_BTNH, k_BTKH, v_BTKH

    def qkv(self, x_BTD, positions_BT):
        """Rotated (unless NoPE), QK-normed queries B T N H and keys / values B T K H."""
        pos = self.positional()
        q_BTNH, k_BTKH, v_BTKH = self.project_qkv(x_BTD)
        q_BTNH, k_BTKH = pos.rotate(q_BTNH, positions_BT), pos.rotate(k_BTKH, positions_BT)
        q_BTNH = constrain(q_BTNH, ("batch", "length", "act_heads", None))
        k_BTKH = constrain(k_BTKH, ("batch", "length", "act_kv_heads", None))
        v_BTKH = constrain(v_BTKH, ("batch", "length", "act_kv_heads", None))
        return q_BTNH, k_BTKH, v_BTKH

    def keys(self, k_BTKH, v_BTKH, ctx: LayerContext):
        """(keys B S K H, values, mask B 1 T S, key positions B S) the queries attend over."""
        if not ctx.decoding:
            return k_BTKH, v_BTKH, ctx.mask_B1TS, ctx.key_positions_BS
        # Keys/values of the T new tokens join the cache; queries then attend over all S slots.
        k_BSKH, v_BSKH = update_kv_cache(self, k_BTKH, v_BTKH, ctx.decode_index)
        return k_BSKH, v_BSKH, ctx.mask_B1TS, ctx.key_positions_BS

    @nn.compact
    def __call__(self, x_BTD, ctx: LayerContext):
        """Attend over the context's keys with its mask (and, when decoding, over this layer's cache)."""
        a = self.attn_cfg
        q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, ctx.positions_BT)
        k_BSKH, v_BSKH, mask_B1TS, key_pos_BS = self.keys(k_BTKH, v_BTKH, ctx)
        bias_BNTS = self.positional().bias(ctx.positions_BT, key_pos_BS, a.n_heads)  # ALiBi; else None
        opts = score_opts(self, self.cfg, a.n_heads)
        if not ctx.decoding:  # a full-sequence pass: the mask (causal, windowed) hides every later key
            opts = opts._replace(query_block=a.query_block)
        out_BTNH = attend(self, q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS, ctx.deterministic, opts)
        return self.out_proj(out_BTNH)


@ATTENTION.register("nope")
class NoPEAttention(CausalSelfAttention):
    """Causal attention without positional rotation or bias (NoPE layers, Llama-4 style)."""

    nope: bool = True


@ATTENTION.register("local")
class LocalAttention(CausalSelfAttention):
    """Causal attention within a sliding window of `model.attention.local.window` positions.

    A query at position p sees keys at positions p - window + 1 .. p of its document. Decoding
    keeps a ring buffer of `window` slots (keys, values, their positions, validity): the new
    tokens attend over the ring (earlier tokens) and over each other, then the last `window` of
    them overwrite the ring at slots (index + i) mod window. Cache memory is fixed for any length.
    """

    @property
    def window(self) -> int:
        return self.attn_cfg.local.window

    @staticmethod
    def score_macs(cfg: ModelConfig, seq_len: int) -> int:  # keys within the window only
        return min(seq_len, cfg.attention.local.window) * cfg.attention.n_heads * 2 * cfg.head_dim

    def keys(self, k_BTKH, v_BTKH, ctx: LayerContext):
        w = self.window
        if not ctx.decoding:
            dist_BTS = ctx.positions_BT[:, :, None] - ctx.key_positions_BS[:, None, :]
            return k_BTKH, v_BTKH, ctx.mask_B1TS & (dist_BTS < w)[:, None], ctx.key_positions_BS
        b, t, kv, h = k_BTKH.shape
        ring_k = self.variable("cache", "ring_key", jnp.zeros, (b, w, kv, h), k_BTKH.dtype)
        ring_v = self.variable("cache", "ring_value", jnp.zeros, (b, w, kv, v_BTKH.shape[-1]), v_BTKH.dtype)
        ring_pos = self.variable("cache", "ring_pos", jnp.zeros, (b, w), jnp.int32)
        ring_valid = self.variable("cache", "ring_valid", jnp.zeros, (b, w), jnp.bool_)
        q_pos_BT = ctx.positions_BT.astype(jnp.int32)
        new_valid_BT = ctx.segment_ids_BT != 0
        # The ring holds tokens before the new ones; among the new ones, causal by order.
        ring_mask_BTW = ring_valid.value[:, None, :] & (q_pos_BT[:, :, None] - ring_pos.value[:, None, :] < w)
        new_mask_BTT = (new_valid_BT[:, None, :] & jnp.tril(jnp.ones((t, t), bool))[None]
                        & (q_pos_BT[:, :, None] - q_pos_BT[:, None, :] < w))  # fmt: skip
        keys = jnp.concatenate([ring_k.value, k_BTKH.astype(ring_k.value.dtype)], axis=1)
        values = jnp.concatenate([ring_v.value, v_BTKH.astype(ring_v.value.dtype)], axis=1)
        key_pos_BS = jnp.concatenate([ring_pos.value, q_pos_BT], axis=1)
        mask_B1TS = jnp.concatenate([ring_mask_BTW, new_mask_BTT], axis=2)[:, None]
        # The last min(t, w) new tokens take their slots (distinct slots: no write conflicts).
        keep = min(t, w)
        idx = jnp.arange(t - keep, t)
        slots = (ctx.decode_index + idx) % w
        ring_k.value = ring_k.value.at[:, slots].set(k_BTKH[:, idx].astype(ring_k.value.dtype))
        ring_v.value = ring_v.value.at[:, slots].set(v_BTKH[:, idx].astype(ring_v.value.dtype))
        ring_pos.value = ring_pos.value.at[:, slots].set(q_pos_BT[:, idx])
        ring_valid.value = ring_valid.value.at[:, slots].set(new_valid_BT[:, idx])
        return keys, values, mask_B1TS, key_pos_BS


def update_kv_cache(module: nn.Module, k_BTKH, v_BTKH, index):
    """Write new keys/values at slot `index` of the module's 'cache' and return the full cache.

    Only the K kv heads are cached (GQA/MQA keep their memory saving). Keys are cached after the
    positional rotation, so a cached key never needs its position again. The buffers are created
    (zero) at the first decode call with that call's length, which is how `init_cache` sizes them.
    """
    names = ("batch", "length", "act_kv_heads", None)
    ck = module.variable("cache", "cached_key", jnp.zeros, k_BTKH.shape, k_BTKH.dtype)
    cv = module.variable("cache", "cached_value", jnp.zeros, v_BTKH.shape, v_BTKH.dtype)
    at = (0, index, 0, 0)
    ck.value = constrain(jax.lax.dynamic_update_slice(ck.value, k_BTKH.astype(ck.value.dtype), at), names)
    cv.value = constrain(jax.lax.dynamic_update_slice(cv.value, v_BTKH.astype(cv.value.dtype), at), names)
    return ck.value, cv.value


def lambda_init(layer) -> jax.Array:
    """Differential attention's depth-dependent lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)), l 1-based."""
    return 0.8 - 0.6 * jnp.exp(-0.3 * jnp.asarray(layer, jnp.float32))


def _positional(cfg: ModelConfig) -> Positional:
    from llm.model.registries import POSITIONAL  # noqa: PLC0415

    return POSITIONAL.get(cfg.positional, "model.positional")(cfg)


__all__ = ["CausalSelfAttention", "LocalAttention", "NoPEAttention", "ScoreOpts", "attend", "einsum_attention",
           "fused_attention", "jax_attention", "lambda_init", "math"]  # fmt: skip
