"""Causal self-attention with MHA/GQA/MQA head layouts and pluggable score implementations."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llm.model import attention_core, dots
from llm.model.attention_core import NEG_INF
from llm.model.config import ModelConfig
from llm.model.context import LayerContext
from llm.model.layers import dtypes, init, out_proj_std, zeros
from llm.model.positional import Positional
from llm.model.registries import ATTENTION, ATTENTION_IMPL
from llm.sharding import constrain


@ATTENTION_IMPL.register("einsum")
def einsum_attention(module, q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS, deterministic):
    """Reference implementation (autodiff backward): fp32 scores and softmax, GQA by grouping query heads."""
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
    scores_BKGTS = dots.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, jnp.float32, module.cfg.matmul_dtype) * (
        h**-0.5
    )
    if bias_BNTS is not None:
        scores_BKGTS = scores_BKGTS + bias_BNTS.reshape(b, kv, n // kv, t, -1)
    scores_BKGTS = jnp.where(mask_B1TS[:, :, None], scores_BKGTS, NEG_INF)
    # Sown for llm.introspect (logit statistics); masked entries stay NEG_INF so readers can tell.
    module.sow("intermediates", "attn_logits", scores_BKGTS.reshape(b, n, t, -1))
    # Softmax in fp32: bf16 loses the small probabilities of long rows.
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
    module.sow("intermediates", "attn_probs", probs_BKGTS.reshape(b, n, t, -1))
    rate = module.attn_cfg.dropout
    if rate > 0 and not deterministic:
        probs_BKGTS = nn.Dropout(rate, name="attn_dropout")(probs_BKGTS, deterministic=False)
    out_BTKGH = dots.einsum("bkgts,bskh->btkgh", probs_BKGTS.astype(v_BSKH.dtype), v_BSKH,
                            matmul_dtype=module.cfg.matmul_dtype)  # fmt: skip
    return out_BTKGH.reshape(b, t, n, h)


@ATTENTION_IMPL.register("jax")
def jax_attention(module, q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS, deterministic):
    """jax.nn.dot_product_attention: XLA's fused path on CPU/TPU, cuDNN flash on GPU via XLA."""
    if module.attn_cfg.dropout > 0 and not deterministic:
        raise ValueError("model.attention.impl=jax has no attention dropout; use impl=einsum")
    dtype, mm = q_BTNH.dtype, module.cfg.matmul_dtype
    if mm is not None and dtype == jnp.float32:  # autocast: bf16 inputs, result back in f32
        q_BTNH, k_BSKH, v_BSKH = (x.astype(mm) for x in (q_BTNH, k_BSKH, v_BSKH))
    out = jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH,
        bias=None if bias_BNTS is None else bias_BNTS.astype(q_BTNH.dtype),
        mask=mask_B1TS,
    )  # fmt: skip
    return out.astype(dtype)


@ATTENTION_IMPL.register("fused")
def fused_attention(module, q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS, deterministic):
    """The einsum math as one op with a hand-written backward in XLA:CPU's fast matmul forms
    (llm/model/attention_core.py). Falls back to `einsum` where it has no equivalent: ALiBi's
    additive bias, attention dropout in training, and introspection (sown logits/probs)."""
    dropout = module.attn_cfg.dropout > 0 and not deterministic
    if bias_BNTS is not None or dropout or module.is_mutable_collection("intermediates"):
        return einsum_attention(module, q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS, deterministic)
    return attention_core.causal_core(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, module.cfg.matmul_dtype)


@ATTENTION.register("causal")
class CausalSelfAttention(nn.Module):
    """Projections to N query and K key/value heads, positional rotation, scores, output proj."""

    cfg: ModelConfig

    @property
    def attn_cfg(self):
        return self.cfg.attention

    @nn.compact
    def __call__(self, x_BTD, ctx: LayerContext):
        """Attend over the context's keys with its standard causal mask (and, when decoding,
        over this layer's cache of every earlier key/value)."""
        cfg, a = self.cfg, self.cfg.attention
        positions_BT = ctx.positions_BT
        dtype, pdtype = dtypes(cfg)
        n, kv, h = a.n_heads, a.kv_heads, cfg.head_dim
        pos: Positional = _positional(cfg)

        def proj(heads, head_axis, name):
            return nn.DenseGeneral(
                (heads, h), use_bias=cfg.use_bias, dtype=dtype, param_dtype=pdtype, name=name,
                kernel_init=init(cfg.init_std, ("embed", head_axis, "head_dim")),
                bias_init=zeros((head_axis, "head_dim")), dot_general=dots.dot_general_for(cfg.matmul_dtype),
            )(x_BTD)  # fmt: skip

        q_BTNH = pos.rotate(proj(n, "heads", "query"), positions_BT)
        k_BSKH = pos.rotate(proj(kv, "kv_heads", "key"), positions_BT)
        v_BSKH = proj(kv, "kv_heads", "value")
        q_BTNH = constrain(q_BTNH, ("batch", "length", "act_heads", None))
        k_BSKH = constrain(k_BSKH, ("batch", "length", "act_kv_heads", None))
        v_BSKH = constrain(v_BSKH, ("batch", "length", "act_kv_heads", None))
        if ctx.decoding:
            # Keys/values of the T new tokens join the cache; queries then attend over all S slots.
            k_BSKH, v_BSKH = update_kv_cache(self, k_BSKH, v_BSKH, ctx.decode_index)

        bias_BNTS = pos.bias(positions_BT, ctx.key_positions_BS, n)  # ALiBi; None for other kinds
        impl = ATTENTION_IMPL.get(a.impl, "model.attention.impl")
        out_BTNH = impl(self, q_BTNH, k_BSKH, v_BSKH, ctx.mask_B1TS, bias_BNTS, ctx.deterministic)
        out_BTNH = checkpoint_name(out_BTNH, "attention_out")
        return nn.DenseGeneral(
            cfg.d_model, axis=(-2, -1), use_bias=cfg.use_bias, dtype=dtype, param_dtype=pdtype,
            kernel_init=init(out_proj_std(cfg), ("heads", "head_dim", "embed")),
            bias_init=zeros(("embed",)), name="out", dot_general=dots.dot_general_for(cfg.matmul_dtype),
        )(out_BTNH)  # fmt: skip


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


def _positional(cfg: ModelConfig) -> Positional:
    from llm.model.registries import POSITIONAL  # noqa: PLC0415

    return POSITIONAL.get(cfg.positional, "model.positional")(cfg)
