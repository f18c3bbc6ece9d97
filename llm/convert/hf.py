"""Hugging Face checkpoints <-> this project's parameters: GPT-2, Llama 1/2/3, Mistral, Mixtral.

Each architecture is (a) a config mapping (HF `config.json` <-> `ModelConfig`) that refuses fields
it cannot honour, naming them, and (b) a list of `Rule`s, each turning a few HF tensors into a few
of our parameters and back. Import walks the rules, reading HF tensors one at a time from the
safetensors files (memory-mapped), so a model is held once, as our parameters.

Layout conventions (HF on the left):
- `nn.Linear` weights are [out, in]; ours are [in, out] with heads split: q_proj [N*H, D] ->
  query.kernel [D, N, H], o_proj [D, N*H] -> out.kernel [N, H, D].
- GPT-2's `Conv1D` weights are already [in, out]; c_attn [D, 3D] holds q | k | v.
- RoPE: HF Llama rotates channel pairs (i, i + H/2) ("rotate_half"), the layout of
  llm/model/positional.py, so q/k weights copy over unpermuted. (Meta's original consolidated
  checkpoints pair (2i, 2i+1); HF's own conversion script permutes those rows. Importing from HF
  format needs no permutation; a wrong one is caught by the logits test.)
- Mixtral experts on disk: `block_sparse_moe.experts.<e>.w1/w3/w2` (gate, up, down) -> our stacked
  `mlp.w_gate / w_in [E, D, F]`, `mlp.w_out [E, F, D]`; `block_sparse_moe.gate` -> `mlp.router [D, E]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from llm.registry import ConfigError

# HF config keys that carry no architecture (or only training-time behaviour) and are ignored.
BENIGN = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "attention_dropout",
    "attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_activation", "summary_first_dropout",
    "summary_proj_to_labels", "summary_type", "summary_use_proj", "output_router_logits",
    "router_aux_loss_coef", "router_jitter_noise", "task_specific_params", "add_cross_attention",
    "reorder_and_upcast_attn", "scale_attn_weights", "tie_word_embeddings", "max_window_layers",
    "use_sliding_window", "n_ctx", "_name_or_path", "id2label", "label2id", "problem_type",
    "return_dict", "output_attentions", "output_hidden_states",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF tensors `hf` <-> our parameters `ours` (paths of dict keys)."""

    hf: tuple[str, ...]
    ours: tuple[tuple[str, ...], ...]
    to_ours: Callable[[list[np.ndarray]], list[np.ndarray]]
    to_hf: Callable[[list[np.ndarray]], list[np.ndarray]]


def _same(name: str, path: tuple[str, ...]) -> Rule:
    return Rule((name,), (path,), lambda xs: xs, lambda xs: xs)


def _linear(name: str, path: tuple[str, ...], split_out: tuple[int, int] | None = None,
            split_in: tuple[int, int] | None = None) -> Rule:  # fmt: skip
    """nn.Linear weight [out, in] <-> kernel [in, out], optionally with out or in split in heads."""

    def to_ours(xs):
        w = xs[0].T
        if split_out:
            w = w.reshape(w.shape[0], *split_out)
        if split_in:
            w = w.reshape(*split_in, w.shape[-1])
        return [np.ascontiguousarray(w)]

    def to_hf(xs):
        w = xs[0]
        w = w.reshape(-1, w.shape[-1]) if split_in else w.reshape(w.shape[0], -1)
        return [np.ascontiguousarray(w.T)]

    return Rule((name,), (path,), to_ours, to_hf)


# ---- config mapping -----------------------------------------------------------------------------


def _check_known(hf: dict, known: set[str], arch: str) -> None:
    unknown = sorted(k for k in hf if k not in known and k not in BENIGN)
    if unknown:
        raise ConfigError(f"{arch} config.json fields this converter cannot honour: {unknown}; "
                          "they would change the model, so conversion stops (see llm/convert/hf.py)")  # fmt: skip


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _rope(hf: dict) -> tuple[float, dict]:
    """(rope theta, our rope_scaling overrides) from either the transformers-4 keys (rope_theta,
    rope_scaling) or transformers-5's rope_parameters."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return theta, {}
    _require(kind == "llama3", f"rope scaling of type {kind!r} is not supported (only llama3)")
    return theta, dict(kind="llama3", factor=float(scaling["factor"]),
                       low_freq_factor=float(scaling["low_freq_factor"]),
                       high_freq_factor=float(scaling["high_freq_factor"]),
                       original_max_len=int(scaling["original_max_position_embeddings"]))  # fmt: skip


def gpt2_config(hf: dict) -> dict:
    _check_known(hf, {"n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "layer_norm_epsilon",
                      "activation_function", "n_inner", "scale_attn_by_inverse_layer_idx"}, "gpt2")  # fmt: skip
    _require(hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
             f"gpt2 activation_function={hf.get('activation_function')!r}: only the tanh GELU (gelu_new) is supported")  # fmt: skip
    _require(
        not hf.get("scale_attn_by_inverse_layer_idx"),
        "gpt2 scale_attn_by_inverse_layer_idx=true is not supported",
    )
    _require(hf.get("tie_word_embeddings", True), "an untied GPT-2 head is not supported")
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_layers=hf["n_layer"], d_ff=hf.get("n_inner"),
        max_seq_len=hf["n_positions"], positional="learned", norm="layernorm", norm_position="pre",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", use_bias=True, tie_embeddings=True,
        attention=dict(n_heads=hf["n_head"], n_kv_heads=hf["n_head"]),
    )  # fmt: skip


LLAMA_KEYS = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "vocab_size", "hidden_act", "attention_bias", "mlp_bias", "pretraining_tp",
}  # fmt: skip


def llama_config(hf: dict, arch: str = "llama") -> dict:
    extra = {"sliding_window"} if arch in ("mistral", "mixtral") else set()
    if arch == "mixtral":
        extra |= {"num_local_experts", "num_experts_per_tok"}
    _check_known(hf, LLAMA_KEYS | extra, arch)
    _require(
        hf.get("hidden_act", "silu") == "silu",
        f"{arch} hidden_act={hf.get('hidden_act')!r}: only silu (SwiGLU)",
    )
    _require(
        not hf.get("attention_bias") and not hf.get("mlp_bias"),
        f"{arch} attention_bias/mlp_bias are not supported",
    )
    _require(hf.get("pretraining_tp", 1) == 1, f"{arch} pretraining_tp={hf.get('pretraining_tp')}: only 1")
    theta, scaling = _rope(hf)
    n, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    attn: dict[str, Any] = dict(
        n_heads=n, n_kv_heads=kv, head_dim=hf.get("head_dim") or hf["hidden_size"] // n
    )
    if hf.get("sliding_window") and hf.get("use_sliding_window", True):
        attn.update(kind="local", local=dict(window=int(hf["sliding_window"])))
    out = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 4096), positional="rope",
        rope_theta=theta, rope_scaling=scaling, norm="rmsnorm", norm_position="pre",
        norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", use_bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention=attn,
    )  # fmt: skip
    if arch == "mixtral":
        out["ffn"] = dict(kind="moe", moe=dict(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                                               router="topk_softmax", impl="dropless"))  # fmt: skip
    return out


CONFIGS: dict[str, Callable[[dict], dict]] = {
    "gpt2": gpt2_config,
    "llama": llama_config,
    "mistral": lambda hf: llama_config(hf, "mistral"),
    "mixtral": lambda hf: llama_config(hf, "mixtral"),
}


def model_overrides(hf: dict) -> dict:
    """`model` config overrides for a HF config.json (ConfigError for what cannot be honoured)."""
    arch = hf.get("model_type")
    if arch not in CONFIGS:
        raise ConfigError(f"model_type={arch!r} is not supported; supported: {sorted(CONFIGS)}")
    return CONFIGS[arch](hf)


def architecture_of(cfg) -> str:
    """Which HF architecture a ModelConfig exports as (ConfigError naming what has no equivalent)."""
    a = cfg.attention
    kinds = set(a.pattern or (a.kind,))
    gpt2 = dict(positional="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True)
    llama = dict(positional="rope", norm="rmsnorm", mlp="swiglu", use_bias=False)
    plain = (not a.qk_norm and a.logit_softcap is None and not a.sinks and not a.nope_every
             and cfg.final_logit_softcap is None and cfg.norm_position == "pre")  # fmt: skip
    if not plain:
        raise ConfigError(
            "qk_norm, soft-capping, sinks, NoPE layers and post-norm have no GPT-2/Llama equivalent"
        )
    if all(getattr(cfg, k) == v for k, v in gpt2.items()) and kinds == {"causal"} and cfg.ffn.kind == "dense":
        _require(a.kv_heads == a.n_heads and cfg.head_dim * a.n_heads == cfg.d_model,
                 "GPT-2 has n_kv_heads = n_heads and head_dim = d_model / n_heads")  # fmt: skip
        return "gpt2"
    if all(getattr(cfg, k) == v for k, v in llama.items()):
        if cfg.ffn.kind == "moe":
            m = cfg.ffn.moe
            _require(m.router == "topk_softmax" and m.every == 1 and not m.first_dense and not m.shared_experts,
                     "Mixtral export needs router=topk_softmax, every layer MoE, no shared experts")  # fmt: skip
            _require(kinds <= {"causal", "local"} and len(kinds) == 1, "Mixtral: one attention kind")
            return "mixtral"
        if kinds == {"local"}:
            return "mistral"
        if kinds == {"causal"}:
            return "llama"
    raise ConfigError(
        f"no Hugging Face architecture for this model (positional={cfg.positional}, norm={cfg.norm}, mlp={cfg.mlp}, "
        f"use_bias={cfg.use_bias}, attention kinds {sorted(kinds)}, ffn={cfg.ffn.kind}); export supports GPT-2 and "
        "Llama/Mistral/Mixtral shapes"
    )


def hf_config(cfg, arch: str) -> dict:
    """config.json for `transformers` from a ModelConfig."""
    a = cfg.attention
    if arch == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                    n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=a.n_heads, n_positions=cfg.max_seq_len,
                    n_inner=cfg.ffn_dim, layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                    tie_word_embeddings=True, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)  # fmt: skip
    names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}
    out = dict(model_type=arch, architectures=[names[arch]], vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
               intermediate_size=(cfg.ffn.moe.expert_d_ff or cfg.ffn_dim) if arch == "mixtral" else cfg.ffn_dim,
               num_hidden_layers=cfg.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.kv_heads,
               head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
               hidden_act="silu", tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta,
               attention_bias=False)  # fmt: skip
    r = cfg.rope_scaling
    if r.kind == "llama3":
        out["rope_scaling"] = dict(rope_type="llama3", factor=r.factor, low_freq_factor=r.low_freq_factor,
                                   high_freq_factor=r.high_freq_factor,
                                   original_max_position_embeddings=r.original_max_len)  # fmt: skip
    if arch in ("mistral", "mixtral"):
        out["sliding_window"] = a.local.window if a.kind == "local" else None
    if arch == "mixtral":
        out.update(num_local_experts=cfg.ffn.moe.num_experts, num_experts_per_tok=cfg.ffn.moe.top_k)
    return out


# ---- weight rules -------------------------------------------------------------------------------


def gpt2_rules(cfg) -> list[Rule]:
    d, n, h = cfg.d_model, cfg.attention.n_heads, cfg.head_dim
    rules = [_same("transformer.wte.weight", ("embed", "embedding")),
             _same("transformer.wpe.weight", ("pos_embed", "embedding")),
             _same("transformer.ln_f.weight", ("norm_final", "scale")),
             _same("transformer.ln_f.bias", ("norm_final", "bias"))]  # fmt: skip
    for i in range(cfg.n_layers):
        p, L = f"transformer.h.{i}.", f"layer_{i}"
        qkv = tuple((L, "attn", x) for x in ("query", "key", "value"))
        rules += [
            _same(p + "ln_1.weight", (L, "norm_attn", "scale")), _same(p + "ln_1.bias", (L, "norm_attn", "bias")),
            _same(p + "ln_2.weight", (L, "norm_mlp", "scale")), _same(p + "ln_2.bias", (L, "norm_mlp", "bias")),
            Rule((p + "attn.c_attn.weight",), tuple(q + ("kernel",) for q in qkv),
                 lambda xs: [w.reshape(d, n, h) for w in np.split(xs[0], 3, axis=1)],
                 lambda xs: [np.concatenate([w.reshape(d, -1) for w in xs], axis=1)]),
            Rule((p + "attn.c_attn.bias",), tuple(q + ("bias",) for q in qkv),
                 lambda xs: [b.reshape(n, h) for b in np.split(xs[0], 3)],
                 lambda xs: [np.concatenate([b.reshape(-1) for b in xs])]),
            Rule((p + "attn.c_proj.weight",), ((L, "attn", "out", "kernel"),),
                 lambda xs: [xs[0].reshape(n, h, d)], lambda xs: [xs[0].reshape(n * h, d)]),
            _same(p + "attn.c_proj.bias", (L, "attn", "out", "bias")),
            _same(p + "mlp.c_fc.weight", (L, "mlp", "fc_in", "kernel")),
            _same(p + "mlp.c_fc.bias", (L, "mlp", "fc_in", "bias")),
            _same(p + "mlp.c_proj.weight", (L, "mlp", "fc_out", "kernel")),
            _same(p + "mlp.c_proj.bias", (L, "mlp", "fc_out", "bias")),
        ]  # fmt: skip
    return rules


def llama_rules(cfg, arch: str) -> list[Rule]:
    n, kv, h = cfg.attention.n_heads, cfg.attention.kv_heads, cfg.head_dim
    rules = [_same("model.embed_tokens.weight", ("embed", "embedding")),
             _same("model.norm.weight", ("norm_final", "scale"))]  # fmt: skip
    if not cfg.tie_embeddings:
        rules.append(_linear("lm_head.weight", ("lm_head", "kernel")))
    for i in range(cfg.n_layers):
        p, L = f"model.layers.{i}.", f"layer_{i}"
        a = p + "self_attn."
        rules += [
            _same(p + "input_layernorm.weight", (L, "norm_attn", "scale")),
            _same(p + "post_attention_layernorm.weight", (L, "norm_mlp", "scale")),
            _linear(a + "q_proj.weight", (L, "attn", "query", "kernel"), split_out=(n, h)),
            _linear(a + "k_proj.weight", (L, "attn", "key", "kernel"), split_out=(kv, h)),
            _linear(a + "v_proj.weight", (L, "attn", "value", "kernel"), split_out=(kv, h)),
            _linear(a + "o_proj.weight", (L, "attn", "out", "kernel"), split_in=(n, h)),
        ]  # fmt: skip
        if arch == "mixtral":
            e = cfg.ffn.moe.num_experts
            m = p + "block_sparse_moe."
            rules.append(_linear(m + "gate.weight", (L, "mlp", "router")))
            for w, ours in (("w1", "w_gate"), ("w3", "w_in"), ("w2", "w_out")):
                rules.append(Rule(tuple(f"{m}experts.{j}.{w}.weight" for j in range(e)), ((L, "mlp", ours),),
                                  lambda xs: [np.stack([x.T for x in xs])],
                                  lambda xs: [np.ascontiguousarray(x.T) for x in xs[0]]))  # fmt: skip
        else:
            rules += [_linear(p + f"mlp.{hf}_proj.weight", (L, "mlp", ours, "kernel"))
                      for hf, ours in (("gate", "gate"), ("up", "up"), ("down", "down"))]  # fmt: skip
    return rules


def rules_for(cfg, arch: str) -> list[Rule]:
    return gpt2_rules(cfg) if arch == "gpt2" else llama_rules(cfg, arch)
