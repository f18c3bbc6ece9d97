"""Infini-attention (`model.attention.kind=infini`; Munkhdalai, Faruqui, Gopal 2024, arXiv:2404.07143).

The sequence is cut into segments of `infini.segment_len` slots. Per kv head, a compressive memory
M (H x Hv) and normaliser z (H) carry what earlier segments held; with s(x) = ELU(x) + 1:

    local     A_dot = causal softmax attention inside the segment (RoPE applied here)
    retrieve  A_mem = s(Q) M / (s(Q) z)
    combine   A = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_dot     (beta learned per head)
    update    linear: M += s(K)^T V          delta: M += s(K)^T (V - s(K) M / (s(K) z))      z += sum s(K)

Choices the paper leaves open, each a flag under `model.attention.infini.`: `update_rule`, `gate_init`,
`memory_positional` (rotate the memory path's Q/K; off by default), `first_segment` (`skip`: where
a document has no memory yet the output is A_dot alone; `eps`: always gated, A_mem = s(Q)M /
(s(Q)z + eps), i.e. 0 on empty memory), `bptt_segments` (stop gradients through M, z every k
segments).

Packed documents: a segment's memory belongs to one document. Carried across a boundary is only
the memory of the document that is still running at the segment's end (tokens of that document in
the segment are folded in; a document that starts in the segment resets it), and a query reads it
only if it belongs to that document. Since documents are contiguous this is exact.

Training runs the segments in a `lax.scan` carrying (M, z) in f32, each segment rematerialised, so
the attention's memory grows with the segment, not the sequence (the projections outside the scan
are linear in T). With `chunk_segments` set, the step runs the whole model one chunk at a time
(llm/train/recurrent.py): the layer then reads its starting (M, z) from, and leaves its final one
in, the `memory` collection, and nothing in the model is linear in T. Decoding keeps the current segment's keys/values (`segment_len` slots) and folds them
into (M, z) when the segment fills: the cache is bounded for any generated length. A multi-token
decode call (prefill) runs the same one-token step over its tokens in a scan, so it can start at
any slot.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.model import attention_core, channels
from llm.model.attention import CausalSelfAttention, score_opts
from llm.model.config import ModelConfig
from llm.model.context import LayerContext
from llm.model.registries import ATTENTION
from llm.sharding import constrain

EPS = 1e-6  # the eps of `first_segment=eps` and of the delta update's retrieval


def sigma(x):
    """ELU + 1: the positive feature map of the memory path (f32)."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def retrieve(sq_BTKGH, mem_BKHV, z_BKH, has_mem_BT, gate_N, a_dot_BTNV, first_segment: str):
    """Gated mix of memory retrieval and local attention: [B, T, N, Hv] (f32)."""
    b, t, kv, g, _ = sq_BTKGH.shape
    num_BTKGV = jnp.einsum("btkgh,bkhv->btkgv", sq_BTKGH, mem_BKHV)
    den_BTKG = jnp.einsum("btkgh,bkh->btkg", sq_BTKGH, z_BKH)
    gate_11N1 = gate_N.reshape(1, 1, kv * g, 1)
    has_11 = has_mem_BT[:, :, None, None]
    a_dot = a_dot_BTNV.astype(jnp.float32)
    if first_segment == "eps":
        a_mem = (num_BTKGV / (den_BTKG + EPS)[..., None]).reshape(b, t, kv * g, -1)
        a_mem = jnp.where(has_11, a_mem, 0.0)  # another document's memory is not this query's
        return gate_11N1 * a_mem + (1.0 - gate_11N1) * a_dot
    a_mem = (num_BTKGV / jnp.where(has_mem_BT[:, :, None, None], den_BTKG, 1.0)[..., None]).reshape(
        b, t, kv * g, -1
    )
    return jnp.where(has_11, gate_11N1 * a_mem + (1.0 - gate_11N1) * a_dot, a_dot)


def fold(mem_BKHV, z_BKH, mem_doc_B, sk_BNKH, v_BNKV, doc_BN, update: str):
    """(M, z, doc) after a full segment: the memory of the document running at its end."""
    last_B = doc_BN[:, -1]
    keep_BN1 = (doc_BN == last_B[:, None])[:, :, None, None].astype(jnp.float32)
    same_B = mem_doc_B == last_B
    mem_BKHV = jnp.where(same_B[:, None, None, None], mem_BKHV, 0.0)  # a new document: empty memory
    z_BKH = jnp.where(same_B[:, None, None], z_BKH, 0.0)
    v = v_BNKV.astype(jnp.float32)
    if update == "delta":  # write only what the memory does not already return for these keys
        got_BNKV = jnp.einsum("bnkh,bkhv->bnkv", sk_BNKH, mem_BKHV)
        den_BNK = jnp.einsum("bnkh,bkh->bnk", sk_BNKH, z_BKH)
        v = v - got_BNKV / (den_BNK + EPS)[..., None]
    sk = sk_BNKH * keep_BN1
    return mem_BKHV + jnp.einsum("bnkh,bnkv->bkhv", sk, v), z_BKH + jnp.sum(sk, axis=1), last_B


@ATTENTION.register("infini")
class InfiniAttention(CausalSelfAttention):
    """Local softmax attention per segment plus a gated compressive memory of earlier segments."""

    @staticmethod
    def score_macs(cfg: ModelConfig, seq_len: int) -> int:
        a, h = cfg.attention, cfg.head_dim
        local = min(seq_len, a.infini.segment_len) * a.n_heads * 2 * h
        return local + a.n_heads * (h * h + h) + a.kv_heads * (h * h + h)  # retrieve + update per token

    @nn.compact
    def __call__(self, x_BTD, ctx: LayerContext):
        cfg, a = self.cfg, self.attn_cfg
        f = a.infini
        n = a.n_heads
        pos = self.positional()
        q_BTNH, k_BTKH, v_BTKH = self.project_qkv(x_BTD)
        ql, kl = pos.rotate(q_BTNH, ctx.positions_BT), pos.rotate(k_BTKH, ctx.positions_BT)
        qm, km = (ql, kl) if f.memory_positional else (q_BTNH, k_BTKH)
        beta_N = self.param(
            "infini_gate", nn.with_logical_partitioning(nn.initializers.constant(f.gate_init), ("heads",)), (n,),
            jnp.float32,
        )  # fmt: skip
        gate_N = jax.nn.sigmoid(beta_N)
        channels.add_metric(self, "infini_gate", gate_N)
        self.sow("intermediates", "infini_gate", gate_N)
        doc_BT = ctx.segment_ids_BT.astype(jnp.int32)
        opts = score_opts(self, cfg, n)  # soft-capping and sinks apply to the local attention
        core = functools.partial(attention_core.causal_core, matmul_dtype=cfg.matmul_dtype, softcap=opts.softcap,
                                 sink_N=opts.sink_N)  # fmt: skip
        if ctx.decoding:
            out_BTNV = self._decode(ql, kl, v_BTKH, qm, km, doc_BT, gate_N, ctx, core)
        elif self.is_mutable_collection(channels.MEMORY):
            # Model-level recurrence (llm/train/recurrent.py): this call is one chunk of the
            # sequence; (M, z, doc) come from the previous chunk and go on to the next.
            b, _, kv, h = k_BTKH.shape
            mem = self.variable(
                channels.MEMORY, "memory", jnp.zeros, (b, kv, h, v_BTKH.shape[-1]), jnp.float32
            )
            z = self.variable(channels.MEMORY, "memory_z", jnp.zeros, (b, kv, h), jnp.float32)
            mdoc = self.variable(channels.MEMORY, "memory_doc", jnp.zeros, (b,), jnp.int32)
            out_BTNV, (mem.value, z.value, mdoc.value) = segments_forward(
                ql, kl, v_BTKH, qm, km, doc_BT, gate_N, f, core, carry=(mem.value, z.value, mdoc.value)
            )
        else:
            out_BTNV, _ = segments_forward(ql, kl, v_BTKH, qm, km, doc_BT, gate_N, f, core)
        return self.out_proj(out_BTNV.astype(q_BTNH.dtype))

    def _decode(self, ql, kl, v, qm, km, doc_BT, gate_N, ctx: LayerContext, core):
        """One step per new token over the segment cache; fold into (M, z) when a segment fills."""
        f = self.attn_cfg.infini
        n_seg = f.segment_len
        b, t, kv, h = kl.shape
        hv = v.shape[-1]
        c_k = self.variable("cache", "segment_key", jnp.zeros, (b, n_seg, kv, h), kl.dtype)
        c_v = self.variable("cache", "segment_value", jnp.zeros, (b, n_seg, kv, hv), v.dtype)
        c_km = self.variable("cache", "segment_mem_key", jnp.zeros, (b, n_seg, kv, h), jnp.float32)
        c_doc = self.variable("cache", "segment_doc", jnp.zeros, (b, n_seg), jnp.int32)
        c_mem = self.variable("cache", "memory", jnp.zeros, (b, kv, h, hv), jnp.float32)
        c_z = self.variable("cache", "memory_z", jnp.zeros, (b, kv, h), jnp.float32)
        c_mdoc = self.variable("cache", "memory_doc", jnp.zeros, (b,), jnp.int32)
        n = ql.shape[2]

        def step(state, xs):
            sk_, sv_, skm_, sdoc_, mem, z, mdoc = state
            q1, k1, v1, qm1, km1, d1, slot = xs  # [B, N, H], [B, K, H], ..., [B], scalar
            c = slot % n_seg
            sk_ = jax.lax.dynamic_update_index_in_dim(sk_, k1.astype(sk_.dtype), c, 1)
            sv_ = jax.lax.dynamic_update_index_in_dim(sv_, v1.astype(sv_.dtype), c, 1)
            skm_ = jax.lax.dynamic_update_index_in_dim(skm_, sigma(km1), c, 1)
            sdoc_ = jax.lax.dynamic_update_index_in_dim(sdoc_, d1, c, 1)
            mask_B11S = ((jnp.arange(n_seg) <= c)[None] & (sdoc_ == d1[:, None]))[:, None, None]
            a_dot = core(q1[:, None], sk_, sv_, mask_B11S)  # [B, 1, N, Hv]
            sq = sigma(qm1)[:, None].reshape(b, 1, kv, n // kv, h)
            has = ((mdoc == d1) & (d1 != 0))[:, None]
            out = retrieve(sq, mem, z, has, gate_N, a_dot, f.first_segment)[:, 0]
            # Fold only when the segment is full (a cond, not a select: no fold work on other steps).
            mem, z, mdoc = jax.lax.cond(
                c == n_seg - 1,
                lambda: fold(mem, z, mdoc, skm_, sv_, sdoc_, f.update_rule),
                lambda: (mem, z, mdoc),
            )
            return (sk_, sv_, skm_, sdoc_, mem, z, mdoc), out

        slots_T = ctx.decode_index + jnp.arange(t)
        xs = tuple(jnp.moveaxis(x, 1, 0) for x in (ql, kl, v, qm, km, doc_BT)) + (slots_T,)
        state = (c_k.value, c_v.value, c_km.value, c_doc.value, c_mem.value, c_z.value, c_mdoc.value)
        state, out_TBNV = jax.lax.scan(step, state, xs)
        c_k.value, c_v.value, c_km.value, c_doc.value, c_mem.value, c_z.value, c_mdoc.value = state
        return jnp.moveaxis(out_TBNV, 0, 1)


def segments_forward(ql, kl, v, qm, km, doc_BT, gate_N, f, core=attention_core.causal_core, carry=None):
    """The full-sequence path, a rematerialised `lax.scan` over segments: (output [B, T, N, Hv] f32,
    final (M, z, doc)). `core(q, k, v, mask)` is the local attention (the fused core with the
    layer's options); `carry` is the (M, z, doc) left by earlier tokens (None: empty memory)."""
    b, t, n, h = ql.shape
    kv, hv = kl.shape[2], v.shape[-1]
    seg = f.segment_len
    n_segs = -(-t // seg)
    pad = n_segs * seg - t

    def split(x):  # [B, T, ...] -> [S, B, seg, ...], padded with zeros (document 0)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n_segs, seg, *x.shape[2:]), 1, 0)

    causal_NN = jnp.tril(jnp.ones((seg, seg), bool))

    def body(carry, xs):
        mem, z, mdoc = carry
        q_s, k_s, v_s, qm_s, km_s, doc_s, s = xs
        if f.bptt_segments:  # truncated backpropagation through the memory
            cut = (s % f.bptt_segments == 0) & (s > 0)
            mem = jnp.where(cut, jax.lax.stop_gradient(mem), mem)
            z = jnp.where(cut, jax.lax.stop_gradient(z), z)
        mask_B1NN = (causal_NN[None] & (doc_s[:, :, None] == doc_s[:, None, :]))[:, None]
        # Inside the scan the pure fused core (no sows: flax side effects cannot cross lax.scan).
        a_dot = core(q_s, k_s, v_s, mask_B1NN)
        sq = sigma(qm_s).reshape(b, seg, kv, n // kv, h)
        has = (doc_s == mdoc[:, None]) & (doc_s != 0)
        out = retrieve(sq, mem, z, has, gate_N, a_dot, f.first_segment)
        mem, z, mdoc = fold(mem, z, mdoc, sigma(km_s), v_s, doc_s, f.update_rule)
        mem = constrain(mem, ("batch", "act_kv_heads", None, None))
        z = constrain(z, ("batch", "act_kv_heads", None))
        return (mem, z, mdoc), out

    if carry is None:
        carry = (
            jnp.zeros((b, kv, h, hv), jnp.float32),
            jnp.zeros((b, kv, h), jnp.float32),
            jnp.zeros((b,), jnp.int32),
        )
    xs = tuple(split(x) for x in (ql, kl, v, qm, km, doc_BT)) + (jnp.arange(n_segs),)
    carry, out_SBTNV = jax.lax.scan(jax.checkpoint(body), carry, xs)
    return jnp.moveaxis(out_SBTNV, 0, 1).reshape(b, n_segs * seg, n, hv)[:, :t], carry
