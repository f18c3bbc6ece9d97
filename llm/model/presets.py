"""Published model shapes, as overrides of the `model` config section."""

from __future__ import annotations

_GPT2 = dict(
    vocab_size=50257, max_seq_len=1024, positional="learned", norm="layernorm",
    norm_position="pre", mlp="gelu", use_bias=True, tie_embeddings=True, norm_eps=1e-5,
)  # fmt: skip
_LLAMA2 = dict(
    vocab_size=32000, max_seq_len=4096, positional="rope", rope_theta=10000.0, norm="rmsnorm",
    norm_position="pre", mlp="swiglu", use_bias=False, tie_embeddings=False, norm_eps=1e-5,
)  # fmt: skip


def _gpt2(d, layers, heads):
    return dict(_GPT2, d_model=d, n_layers=layers, attention=dict(n_heads=heads, n_kv_heads=heads))


def _llama(d, layers, heads, kv, ff):
    return dict(_LLAMA2, d_model=d, n_layers=layers, d_ff=ff,
                attention=dict(n_heads=heads, n_kv_heads=kv))  # fmt: skip


def _moe(base: dict, **moe) -> dict:
    """A preset with an MoE feed-forward (model.ffn.moe knobs)."""
    return dict(base, ffn=dict(kind="moe", moe=moe))


PRESETS: dict[str, dict] = {
    "gpt2-124m": _gpt2(768, 12, 12),
    "gpt2-355m": _gpt2(1024, 24, 16),
    "gpt2-774m": _gpt2(1280, 36, 20),
    "gpt2-1.5b": _gpt2(1600, 48, 25),
    "llama2-7b": _llama(4096, 32, 32, 32, 11008),
    "llama2-13b": _llama(5120, 40, 40, 40, 13824),
    "llama2-70b": _llama(8192, 80, 64, 8, 28672),
    # ~1B Llama-style model for GPU throughput work (not a published checkpoint).
    "llama-1b": _llama(2048, 16, 16, 8, 5632),
    # Mixtral 8x7B (Jiang et al. 2024): 46.7B parameters, 12.9B active per token; rope theta 1e6.
    "mixtral-8x7b": _moe(dict(_llama(4096, 32, 32, 8, 14336), vocab_size=32000, max_seq_len=32768, rope_theta=1e6),
                         num_experts=8, top_k=2, router="topk_softmax"),
    # Mistral 7B v0.1 (Jiang et al. 2023): Llama-shaped, GQA with 8 KV heads, every layer a
    # sliding window of 4,096 positions; 7,241,732,096 parameters.
    "mistral-7b": dict(_llama(4096, 32, 32, 8, 14336), max_seq_len=32768,
                       attention=dict(n_heads=32, n_kv_heads=8, kind="local", local=dict(window=4096))),
    # OLMoE-1B-7B (Muennighoff et al. 2024): 64 fine-grained experts, top-8; ~6.9B total, ~1.3B
    # active. OLMoE's QK-norm normalises the whole q/k projection (d_model wide); model.attention.qk_norm
    # is per head (OLMo-2 / Gemma-3), so it is left out here.
    "olmoe-1b-7b": _moe(dict(_llama(2048, 16, 16, 16, 1024), vocab_size=50304, max_seq_len=4096),
                        num_experts=64, top_k=8, router="softmax_topk"),
    # Tiny shapes for tests and smoke runs (vocab from the tokenizer).
    "tiny-gpt2": dict(_GPT2, vocab_size=None, max_seq_len=128, d_model=64, n_layers=2,
                      attention=dict(n_heads=4, n_kv_heads=4)),
    "tiny-llama": dict(_LLAMA2, vocab_size=None, max_seq_len=128, d_model=64, n_layers=2,
                       d_ff=192, attention=dict(n_heads=4, n_kv_heads=2)),
    "tiny-moe": _moe(dict(_LLAMA2, vocab_size=None, max_seq_len=128, d_model=64, n_layers=2,
                          d_ff=96, attention=dict(n_heads=4, n_kv_heads=2)), num_experts=4, top_k=2),
}  # fmt: skip
