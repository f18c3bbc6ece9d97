"""Token sampling (greedy, temperature, top-k, top-p) and a simple windowed generator.

The generator recomputes the forward pass over a fixed window each step: simple and correct for
every positional kind. (A KV-cached prefill/decode engine is the inference issue's work.)
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

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


def make_next_token_fn(model, window: int, temperature, top_k, top_p) -> Callable:
    @jax.jit
    def next_token(params, tokens_1W, length, rng):
        logits = model.apply({"params": params}, tokens_1W)
        last_1V = jax.lax.dynamic_slice_in_dim(logits, length - 1, 1, axis=1)[:, 0]
        return sample_logits(rng, last_1V, temperature, top_k, top_p)[0]

    return next_token


def generate_stream(
    model, params, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
    top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
) -> Iterator[str]:  # fmt: skip
    """Yield decoded text pieces as tokens are sampled (seeded: same seed, same text)."""
    window = model.cfg.max_seq_len
    step_fn = make_next_token_fn(model, window, temperature, top_k, top_p)
    ids = list(tokenizer.encode(prompt)) or [tokenizer.eos_id]
    rng = jax.random.PRNGKey(seed)
    emitted = ""
    n_prompt = len(ids)
    for i in range(max_new_tokens):
        ctx = ids[-window:]
        buf = np.zeros((1, window), np.int32)
        buf[0, : len(ctx)] = ctx
        tok = int(step_fn(params, buf, len(ctx), jax.random.fold_in(rng, i)))
        if stop_at_eos and tok == tokenizer.eos_id:
            break
        ids.append(tok)
        text = tokenizer.decode(ids[n_prompt:])
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(emitted) :]
            emitted = text


def generate(model, params, tokenizer, prompt: str, **kw) -> str:
    """The prompt's continuation as one string."""
    return "".join(generate_stream(model, params, tokenizer, prompt, **kw))


__all__ = ["filter_logits", "generate", "generate_stream", "sample_logits"]
