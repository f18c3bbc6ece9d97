"""Mixture-of-Experts feed-forward layer (`model.ffn.kind=moe`, knobs under `model.ffn.moe.`).

Per token: a router (f32 whatever the compute dtype) scores the E experts, the top-k are chosen
(`ROUTERS`: Switch/GShard softmax-then-top-k, Mixtral top-k-then-softmax, DeepSeek-V3 sigmoid),
the token goes through those experts' MLPs (`model.mlp`: gelu or swiglu, each expert
`expert_d_ff` wide) and their outputs are summed with the gate weights. Always-on shared experts
(`shared_experts`) are a dense MLP added on top.

Capacity (`capacity_factor`, unset = dropless): within each group of tokens (a sequence, as
GShard's groups) an expert takes at most C = ceil(capacity_factor * T * k / E) assignments, first
choices before second ones, in token order; an assignment past C is dropped (the token keeps only
its residual for that choice) and counted. (One decoded token is a group of its own, so cached
decoding never drops: with a capacity, prefill and decode can route differently.)
Two implementations (`impl`, registry `MOE_IMPLS`), the same function:
- `dropless`: assignments sorted by expert and run as grouped matmuls: `jax.lax.ragged_dot` on
  TPU/GPU (native kernels), block-diagonal batched matmuls on CPU (XLA:CPU expands ragged_dot
  into E dense matmuls); compute proportional to the routed tokens.
- `dense`: one-hot dispatch/combine einsums into a [G, E, C, D] buffer (GShard). With an `expert`
  mesh axis the dispatch einsum is where GSPMD moves tokens to their experts' devices (an
  all-to-all); the dropless sort instead gathers the routing decisions on every device.

Losses (weighted, through llm/model/channels.py): the Switch load-balancing loss
E * sum_e f_e P_e (f_e: fraction of routed assignments, P_e: mean router probability) and the
router z-loss mean(logsumexp(logits)^2) (ST-MoE). Auxiliary-loss-free balancing (DeepSeek-V3,
`bias_balancing_rate`): a per-expert bias added to the scores for selection only; after each step
it moves by rate * sign(mean load - load). It is a parameter that the optimizer leaves alone
(frozen by a built-in group rule) and the step sets (channels.set_param), so it is checkpointed
and loaded with the model. Telemetry per layer as metrics: load per expert, max load over the
mean, drop fraction, router entropy, the two losses, the biases; routing is sown for introspect.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.model import channels, lora
from llm.model.config import ModelConfig
from llm.model.layers import dtypes, init, out_proj_std, zeros
from llm.model.registries import FFN, MLP
from llm.registry import Registry
from llm.sharding import constrain

ROUTERS: Registry = Registry("moe router")
MOE_IMPLS: Registry = Registry("moe impl")


# ---- routers: logits [N, E] (+ selection bias [E]) -> experts [N, K], gates [N, K], probs [N, E] ----


@ROUTERS.register("softmax_topk")
def softmax_topk(logits_NE, bias_E, k):
    """Switch/GShard: softmax over all experts, then the top-k probabilities are the gates."""
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    _, expert_NK = jax.lax.top_k(probs_NE + bias_E, k)
    return expert_NK, jnp.take_along_axis(probs_NE, expert_NK, axis=-1), probs_NE


@ROUTERS.register("topk_softmax")
def topk_softmax(logits_NE, bias_E, k):
    """Mixtral: the top-k logits, softmax over just those."""
    _, expert_NK = jax.lax.top_k(logits_NE + bias_E, k)
    gate_NK = jax.nn.softmax(jnp.take_along_axis(logits_NE, expert_NK, axis=-1), axis=-1)
    return expert_NK, gate_NK, jax.nn.softmax(logits_NE, axis=-1)


@ROUTERS.register("sigmoid")
def sigmoid(logits_NE, bias_E, k):
    """DeepSeek-V3: sigmoid scores, top-k (by score + bias), gates renormalised over the k."""
    scores_NE = jax.nn.sigmoid(logits_NE)
    _, expert_NK = jax.lax.top_k(scores_NE + bias_E, k)
    gate_NK = jnp.take_along_axis(scores_NE, expert_NK, axis=-1)
    gate_NK = gate_NK / jnp.sum(gate_NK, axis=-1, keepdims=True)
    return expert_NK, gate_NK, scores_NE / jnp.sum(scores_NE, axis=-1, keepdims=True)


def positions_in_expert(expert_GSK, n_experts: int):
    """Each assignment's slot in its expert's queue within its group (a sequence): first choices
    of all the group's tokens, then second choices, each in token order (so a capacity drops the
    least preferred assignments first). [G, S, K] -> [G, S, K]."""
    g, s, k = expert_GSK.shape
    onehot_GME = jax.nn.one_hot(jnp.swapaxes(expert_GSK, 1, 2).reshape(g, k * s), n_experts, dtype=jnp.int32)
    pos_GME = jnp.cumsum(onehot_GME, axis=1) - 1
    return jnp.swapaxes(jnp.sum(pos_GME * onehot_GME, axis=-1).reshape(g, k, s), 1, 2)


def capacity(cfg, group_size: int) -> int | None:
    """Assignments one expert takes per group of `group_size` tokens (None: dropless)."""
    m = cfg.ffn.moe
    if m.capacity_factor is None:
        return None
    return max(1, math.ceil(m.capacity_factor * group_size * m.top_k / m.num_experts))


# ---- the experts' MLPs ---------------------------------------------------------------------------


def _act(cfg, h_in, h_gate=None):
    if cfg.mlp == "swiglu":
        return jax.nn.silu(h_gate) * h_in
    return jax.nn.gelu(h_in, approximate=True)


def _mm_dtype(cfg, dtype):
    return jnp.dtype(cfg.matmul_dtype) if cfg.matmul_dtype and dtype == jnp.float32 else dtype


@MOE_IMPLS.register("dense")
def dense_impl(cfg, w, x_GSD, expert_GSK, gate_GSK, keep_GSK, cap: int | None):
    """One-hot dispatch of each group (sequence) into [G, E, C, D], per-expert einsums, one-hot
    combine (GShard). Dispatch costs G*S*E*C*D: capacity per group keeps it linear in tokens."""
    g, s, _ = x_GSD.shape
    e = cfg.ffn.moe.num_experts
    c = cap if cap is not None else s  # no capacity: every token of the group fits
    pos_GSK = positions_in_expert(expert_GSK, e)
    slot_GSKC = jax.nn.one_hot(jnp.where(keep_GSK, pos_GSK, c), c, dtype=x_GSD.dtype)  # dropped: no slot
    onehot_GSKE = jax.nn.one_hot(expert_GSK, e, dtype=x_GSD.dtype)
    dispatch_GSEC = jnp.einsum("gske,gskc->gsec", onehot_GSKE, slot_GSKC)
    combine_GSEC = jnp.einsum("gske,gskc,gsk->gsec", onehot_GSKE, slot_GSKC, gate_GSK.astype(x_GSD.dtype))
    # With an `expert` mesh axis this is where tokens move to their experts' devices (an
    # all-to-all that GSPMD inserts: groups leave the expert axis, experts take it).
    names = ("act_moe_group", "act_expert", None, "act_embed")
    x_GECD = constrain(jnp.einsum("gsec,gsd->gecd", dispatch_GSEC, x_GSD), names)
    mm = _mm_dtype(cfg, x_GSD.dtype)

    def ein(spec, a, b):
        return jnp.einsum(spec, a.astype(mm), b.astype(mm), preferred_element_type=jnp.float32).astype(
            x_GSD.dtype
        )

    def proj(name, x_GECI):  # x @ w[name] per expert (+ its LoRA adapters, factored)
        y_GECO = ein("geci,eio->geco", x_GECI, w[name])
        if f"{name}_lora" in w:
            a, b = w[f"{name}_lora"]
            y_GECO = y_GECO + ein("gecr,ero->geco", ein("geci,eir->gecr", x_GECI, a), b)
        return y_GECO

    h = proj("w_in", x_GECD) + (w["b_in"][None, :, None] if "b_in" in w else 0)
    gate = proj("w_gate", x_GECD) if "w_gate" in w else None
    h = constrain(_act(cfg, h, gate), ("act_moe_group", "act_expert", None, "act_mlp"))
    y_GECD = proj("w_out", h) + (w["b_out"][None, :, None] if "b_out" in w else 0)
    return jnp.einsum("gsec,gecd->gsd", combine_GSEC, y_GECD)


BLOCK_ROWS = 128  # CPU grouped matmul: rows per block (each block belongs to one expert)


def grouped_matmul_blocked(x_MD, w_EDF, sorted_expert_M, group_sizes_E, block: int = BLOCK_ROWS):
    """x (rows sorted by expert) @ w[expert of the row], as block-diagonal batched matmuls: each
    expert's rows padded to a multiple of `block`, every block multiplied by its expert's weight.
    Work ~ (M + E * block) * D * F, where XLA:CPU's ragged_dot would do E * M * D * F (it expands
    the groups densely); TPU/GPU run ragged_dot natively (megablox, grouped GEMM)."""
    m, d = x_MD.shape
    e = w_EDF.shape[0]
    n_blocks = -(-(m + e * (block - 1)) // block)
    padded_E = -(-group_sizes_E // block) * block
    pad_ends_E = jnp.cumsum(padded_E)
    starts_E, pad_starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E, pad_ends_E - padded_E
    dest_M = pad_starts_E[sorted_expert_M] + jnp.arange(m) - starts_E[sorted_expert_M]
    xp_BND = jnp.zeros((n_blocks * block, d), x_MD.dtype).at[dest_M].set(x_MD).reshape(n_blocks, block, d)
    block_expert_B = jnp.minimum(
        jnp.searchsorted(pad_ends_E, jnp.arange(n_blocks) * block, side="right"), e - 1
    )
    y = jnp.einsum("bnd,bdf->bnf", xp_BND, w_EDF[block_expert_B], preferred_element_type=jnp.float32)
    return y.reshape(n_blocks * block, -1)[dest_M]


def grouped_matmul(x_MD, w_EDF, sorted_expert_M, group_sizes_E, dtype):
    """Rows sorted by expert times their expert's matrix, f32 accumulation, in `dtype`."""
    if jax.default_backend() == "cpu":
        out = grouped_matmul_blocked(x_MD, w_EDF, sorted_expert_M, group_sizes_E)
    else:
        out = jax.lax.ragged_dot(x_MD, w_EDF, group_sizes_E, preferred_element_type=jnp.float32)
    return out.astype(dtype)


@MOE_IMPLS.register("dropless")
def dropless_impl(cfg, w, x_GSD, expert_GSK, gate_GSK, keep_GSK, cap: int | None):
    """Assignments sorted by expert, grouped matmuls (`grouped_matmul`), scattered back."""
    g, s, d = x_GSD.shape
    k = expert_GSK.shape[-1]
    e = cfg.ffn.moe.num_experts
    n = g * s
    x_ND = x_GSD.reshape(n, d)
    expert_M = expert_GSK.reshape(n * k)
    order_M = jnp.argsort(expert_M, stable=True)
    token_M = (jnp.arange(n * k) // k)[order_M]
    sorted_expert_M = expert_M[order_M]
    group_sizes_E = jnp.bincount(expert_M, length=e).astype(jnp.int32)
    weight_M = (gate_GSK * keep_GSK).reshape(n * k)[order_M].astype(x_ND.dtype)
    mm = _mm_dtype(cfg, x_ND.dtype)
    x_MD = x_ND[token_M].astype(mm)

    def gmm(a, b):
        return grouped_matmul(a.astype(mm), b.astype(mm), sorted_expert_M, group_sizes_E, x_ND.dtype)

    def proj(name, x_MI):  # rows times their expert's w[name] (+ its LoRA adapters, factored)
        y_MO = gmm(x_MI, w[name])
        if f"{name}_lora" in w:
            a, b = w[f"{name}_lora"]
            y_MO = y_MO + gmm(gmm(x_MI, a), b)
        return y_MO

    h_MF = proj("w_in", x_MD) + (w["b_in"][sorted_expert_M] if "b_in" in w else 0)
    gate_MF = proj("w_gate", x_MD) if "w_gate" in w else None
    h_MF = _act(cfg, h_MF, gate_MF)
    y_MD = proj("w_out", h_MF) + (w["b_out"][sorted_expert_M] if "b_out" in w else 0)
    return jnp.zeros((n, d), x_ND.dtype).at[token_M].add(y_MD * weight_M[:, None]).reshape(g, s, d)


# ---- the layer ------------------------------------------------------------------------------------


def expert_ffn_dim(cfg: ModelConfig) -> int:
    return cfg.ffn.moe.expert_d_ff or cfg.ffn_dim


@FFN.register("moe")
class MoE(nn.Module):
    """Routed experts (+ shared experts): x B T D -> B T D."""

    cfg: ModelConfig

    @staticmethod
    def active_matmul_params(cfg: ModelConfig) -> int:
        """Matmul weights one token passes through: the router, k routed experts, the shared ones."""
        m = cfg.ffn.moe
        per_expert = (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model * expert_ffn_dim(cfg)
        return cfg.d_model * m.num_experts + (m.top_k + m.shared_experts) * per_expert

    @staticmethod
    def inactive_params(cfg: ModelConfig) -> int:
        """Parameters of the experts a token is not routed to (for the active parameter count)."""
        m, d, f = cfg.ffn.moe, cfg.d_model, expert_ffn_dim(cfg)
        per_expert = (3 if cfg.mlp == "swiglu" else 2) * d * f + ((f + d) if cfg.use_bias else 0)
        return (m.num_experts - m.top_k) * per_expert

    @nn.compact
    def __call__(self, x_BTD, ctx=None):
        cfg, m = self.cfg, self.cfg.ffn.moe
        deterministic = ctx is None or ctx.deterministic
        dtype, pdtype = dtypes(cfg)
        b, t, d = x_BTD.shape
        e, k, f = m.num_experts, m.top_k, expert_ffn_dim(cfg)
        x_ND = x_BTD.reshape(b * t, d)

        # Router in f32: its softmax/top-k and losses lose too much in bf16.
        w_router = self.param("router", init(cfg.init_std, ("embed", None)), (d, e), jnp.float32)
        x_router = x_ND.astype(jnp.float32)
        if m.router_jitter > 0 and not deterministic:  # Switch: multiplicative input noise
            x_router = x_router * jax.random.uniform(self.make_rng("dropout"), x_router.shape, jnp.float32,
                                                     1.0 - m.router_jitter, 1.0 + m.router_jitter)  # fmt: skip
        logits_NE = x_router @ w_router
        if m.bias_balancing_rate > 0:
            bias_E = self.param("router_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                                (e,), jnp.float32)  # fmt: skip
            bias_E = jax.lax.stop_gradient(bias_E)  # selection only: no gradient reaches it
        else:
            bias_E = jnp.zeros((e,), jnp.float32)
        expert_NK, gate_NK, probs_NE = ROUTERS.get(m.router, "model.ffn.moe.router")(logits_NE, bias_E, k)

        # Capacity is per group, a group being one sequence (GShard's groups): the dispatch of the
        # dense impl stays linear in the number of tokens.
        expert_BTK = expert_NK.reshape(b, t, k)
        cap = capacity(cfg, t)
        keep_BTK = (
            positions_in_expert(expert_BTK, e) < cap if cap is not None else jnp.ones(expert_BTK.shape, bool)
        )
        keep_NK = keep_BTK.reshape(b * t, k)

        w = {}
        in_names, out_names = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
        names = ("w_gate", "w_in") if cfg.mlp == "swiglu" else ("w_in",)
        for name in names:
            w[name] = self.param(name, init(cfg.init_std, in_names), (e, d, f), pdtype)
        w["w_out"] = self.param("w_out", init(out_proj_std(cfg), out_names), (e, f, d), pdtype)
        if cfg.use_bias:
            w["b_in"] = self.param("b_in", zeros(("expert", "mlp")), (e, f), pdtype)
            w["b_out"] = self.param("b_out", zeros(("expert", "embed")), (e, d), pdtype)
        w = {name: v.astype(dtype) for name, v in w.items()}
        # LoRA on the experts (model.lora.targets naming w_in/w_gate/w_out): per-expert A, B.
        shapes = {n: ((e, d, f), in_names) for n in names} | {"w_out": ((e, f, d), out_names)}
        adapters = lora.expert_adapters(self, shapes, cfg.lora, pdtype)
        w |= {f"{n}_lora": tuple(x.astype(dtype) for x in ab) for n, ab in adapters.items()}
        impl = MOE_IMPLS.get(m.impl, "model.ffn.moe.impl")
        y_BTD = impl(cfg, w, x_BTD.astype(dtype), expert_BTK, gate_NK.reshape(b, t, k), keep_BTK, cap)
        if m.shared_experts:
            shared_cfg = cfg.replace(d_ff=m.shared_experts * f)
            y_BTD = y_BTD + MLP.get(cfg.mlp, "model.mlp")(shared_cfg, name="shared")(x_BTD)

        # Losses and telemetry (f32).
        n_assign = b * t * k
        load_E = jnp.bincount(expert_NK.reshape(-1), length=e).astype(jnp.float32) / n_assign
        aux = e * jnp.sum(load_E * jnp.mean(probs_NE, axis=0))
        z = jnp.mean(jax.nn.logsumexp(logits_NE, axis=-1) ** 2)
        channels.add_loss(self, "moe_aux_loss", aux, m.aux_loss_weight)
        channels.add_loss(self, "moe_z_loss", z, m.z_loss_weight)
        channels.add_metric(self, "moe_load", load_E)
        channels.add_metric(self, "moe_max_load", jnp.max(load_E) * e)  # 1.0 = perfectly balanced
        channels.add_metric(self, "moe_drop_fraction", 1.0 - jnp.mean(keep_NK.astype(jnp.float32)))
        p = jax.nn.softmax(logits_NE, axis=-1)
        channels.add_metric(self, "moe_router_entropy", -jnp.mean(jnp.sum(p * jnp.log(p + 1e-9), axis=-1)))
        channels.add_metric(self, "moe_aux", aux)
        channels.add_metric(self, "moe_z", z)
        if m.bias_balancing_rate > 0:
            channels.add_metric(self, "moe_bias", bias_E)
            new_bias = bias_E + m.bias_balancing_rate * jnp.sign(jnp.mean(load_E) - load_E)
            channels.set_param(self, "router_bias", new_bias)
        self.sow("intermediates", "router_probs", probs_NE.reshape(b, t, e))
        self.sow("intermediates", "expert_index", expert_NK.reshape(b, t, k))
        self.sow("intermediates", "expert_gate", (gate_NK * keep_NK).reshape(b, t, k))
        return constrain(y_BTD.astype(dtype), ("batch", "length", "act_embed"))
