"""Token choice from logits: greedy, temperature, top-k, top-p and a repetition penalty.

Generation itself (KV cache, prefill, decode loop) is in llm/infer/engine.py and generation.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def filter_logits(logits_BV, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Scaled logits with tokens outside the top-k / nucleus set at -inf (fp32)."""
    logits_BV = logits_BV.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k and top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, NEG_INF, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep a token if the mass strictly before it is < top_p (the top token always stays).
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        keep_BV = before_BV < top_p
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, NEG_INF, logits_BV)
    return logits_BV


def sample_logits(rng, logits_BV, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """One token id per row; temperature 0 is greedy."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits_BV, temperature, top_k, top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def penalize_repetition(logits_BV, seen_BV, penalty: float):
    """CTRL (Keskar et al. 2019): divide positive / multiply negative logits of seen tokens by `penalty`."""
    logits_BV = logits_BV.astype(jnp.float32)
    penalized_BV = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalized_BV, logits_BV)


__all__ = ["filter_logits", "penalize_repetition", "sample_logits"]
