"""KV-cached decoding: prefill a batch of prompts in one pass, then one cached step per token.

Decode state lives in the flax 'cache' collection, one sub-tree per layer: an attention kind
declares what it keeps (the causal kind: keys and values of its K kv heads) and the transformer
keeps the slot bookkeeping (each slot's position, whether it holds a real token, the write index).
The engine only creates the collection (`init_cache`: every leaf starts at zero) and threads it
through; it never looks inside, so a layer kind with other state (a compressive memory, say)
needs no change here.

Prompts of different lengths are left-padded: every row's last prompt token sits in the same
slot, padding slots are masked out, and positions count a row's real tokens only, so each row
computes what it would compute alone. `generate_tokens` is the whole loop on device
(`lax.while_loop`); `start` / `advance` are the same steps one at a time, for streaming.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm import sharding
from llm.infer.sampling import filter_logits, penalize_repetition
from llm.model import quant

PAD_MULTIPLE = 16  # prompt lengths are padded up to a multiple of this: fewer recompilations


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when temperature is 0, else filtered sampling."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0  # nucleus mass; 1 = off
    repetition_penalty: float = 1.0  # CTRL-style; > 1 discourages tokens already in the context

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")


def inference_model(model):
    """The same model (same parameters) without remat: there is no backward pass to save for."""
    if model.cfg.remat == "none":
        return model
    return type(model)(model.cfg.replace(remat="none"))


def init_cache(model, batch: int, max_len: int) -> Any:
    """Empty decode state for `batch` rows of `max_len` slots (its structure comes from the model)."""

    def make(tokens_BS):
        return model.init(jax.random.PRNGKey(0), tokens_BS, decode=True)["cache"]

    shapes = jax.eval_shape(make, jax.ShapeDtypeStruct((batch, max_len), jnp.int32))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def forward(model, params, tokens_BT, positions_BT, valid_BT, cache):
    """Append T tokens per row to the cache: (logits B T V, new cache). Params may be int8."""
    variables = {"params": quant.dequantize(params, jnp.dtype(model.cfg.param_dtype)), "cache": cache}
    logits_BTV, updated = model.apply(
        variables, tokens_BT, positions_BT, valid_BT.astype(jnp.int32), decode=True, mutable=["cache"]
    )
    return logits_BTV, updated["cache"]


def prompt_layout(lengths_B, p: int):
    """Left padding: (valid B P, positions B P) for rows whose last `lengths[b]` slots are real."""
    slot_P = jnp.arange(p)
    pad_B1 = (p - lengths_B)[:, None]
    valid_BP = slot_P[None, :] >= pad_B1
    return valid_BP, jnp.where(valid_BP, slot_P[None, :] - pad_B1, 0)


def prefill(model, params, tokens_BP, lengths_B, cache):
    """All prompt tokens in one pass (row b's prompt in its last lengths[b] slots): logits B P V."""
    valid_BP, positions_BP = prompt_layout(lengths_B, tokens_BP.shape[1])
    return forward(model, params, tokens_BP, positions_BP, valid_BP, cache)


def decode_step(model, params, tokens_B, positions_B, cache):
    """One new token per row at `positions`: (logits B V, new cache)."""
    tokens_B1 = tokens_B[:, None]
    logits_B1V, cache = forward(model, params, tokens_B1, positions_B[:, None], jnp.ones(tokens_B1.shape, bool),
                                cache)  # fmt: skip
    return logits_B1V[:, 0], cache


def row_keys(rng, batch: int):
    """One PRNG key per row (row b: fold_in(rng, b)); step i then folds in i: same seed, same text."""
    return jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(batch))


def choose(keys_B, step, logits_BV, seen_BV, sampling: Sampling):
    """Each row's next token: penalise repeats, then greedy or sample with the row's own key."""
    if seen_BV is not None:
        logits_BV = penalize_repetition(logits_BV, seen_BV, sampling.repetition_penalty)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    filtered_BV = filter_logits(logits_BV, sampling.temperature, sampling.top_k, sampling.top_p)
    step_keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys_B, step)
    return jax.vmap(jax.random.categorical)(step_keys_B, filtered_BV).astype(jnp.int32)


def start(params, tokens_BP, lengths_B, keys_B, step, *, model, cache_len: int, sampling: Sampling):
    """Prefill and choose each row's first new token: (tokens B, cache, seen B V or None)."""
    b, p = tokens_BP.shape
    cache = init_cache(model, b, cache_len)
    logits_BPV, cache = prefill(model, params, tokens_BP, lengths_B, cache)
    seen_BV = None
    if sampling.repetition_penalty != 1.0:
        valid_BP, _ = prompt_layout(lengths_B, p)
        rows_B1 = jnp.arange(b)[:, None]
        seen_BV = jnp.zeros((b, model.cfg.vocab_size), jnp.int32).at[rows_B1, tokens_BP].max(valid_BP)
        seen_BV = seen_BV.astype(bool)
    return choose(keys_B, step, logits_BPV[:, -1], seen_BV, sampling), cache, seen_BV


def advance(params, tokens_B, positions_B, step, cache, seen_BV, keys_B, *, model, sampling: Sampling):
    """Feed each row's latest token (at `positions`) and choose the next: (tokens B, cache, seen)."""
    logits_BV, cache = decode_step(model, params, tokens_B, positions_B, cache)
    if seen_BV is not None:
        seen_BV = seen_BV.at[jnp.arange(tokens_B.shape[0]), tokens_B].set(True)
    return choose(keys_B, step, logits_BV, seen_BV, sampling), cache, seen_BV


def generate_tokens(params, tokens_BP, lengths_B, rng, *, model, max_new_tokens: int, sampling: Sampling,
                    stop_ids: tuple[int, ...] = (), pad_id: int = 0):  # fmt: skip
    """The whole generation on device: (tokens B N, counts B). Row b's output is tokens[b, :counts[b]].

    A row stops at its first stop token (not included in its count); the loop ends when every row
    has stopped or after `max_new_tokens`. Finished rows keep decoding (masked out) until then.
    """
    b, p = tokens_BP.shape
    keys_B = row_keys(rng, b)
    stop_N = jnp.asarray(stop_ids, jnp.int32)
    is_stop = (lambda t: jnp.isin(t, stop_N)) if stop_ids else (lambda t: jnp.zeros(t.shape, bool))
    # A prompt needs max_new_tokens - 1 more slots: the last sampled token is never fed back.
    tok_B, cache, seen_BV = start(params, tokens_BP, lengths_B, keys_B, 0, model=model,
                                  cache_len=p + max_new_tokens - 1, sampling=sampling)  # fmt: skip
    done_B = is_stop(tok_B)
    count_B = (~done_B).astype(jnp.int32)
    out_BN = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok_B)

    def cond(carry):
        i, _, done_B, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        i, tok_B, done_B, count_B, out_BN, seen_BV, cache = carry
        # The token chosen at step i-1 sits at position length + i - 1.
        tok_B, cache, seen_BV = advance(params, tok_B, lengths_B + i - 1, i, cache, seen_BV, keys_B,
                                        model=model, sampling=sampling)  # fmt: skip
        stop_B = is_stop(tok_B)
        count_B = count_B + (~done_B & ~stop_B)
        out_BN = jax.lax.dynamic_update_slice(out_BN, jnp.where(done_B, pad_id, tok_B)[:, None], (0, i))
        return i + 1, tok_B, done_B | stop_B, count_B, out_BN, seen_BV, cache

    carry = (jnp.int32(1), tok_B, done_B, count_B, out_BN, seen_BV, cache)
    _, _, _, count_B, out_BN, _, _ = jax.lax.while_loop(cond, body, carry)
    return out_BN, count_B


def left_pad(prompts: Sequence[Sequence[int]], multiple: int = PAD_MULTIPLE, pad_id: int = 0):
    """(tokens B P, lengths B) with each prompt right-aligned; P rounded up to `multiple`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (encode an empty prompt as [eos_id])")
    p = multiple * -(-max(len(x) for x in prompts) // multiple)
    tokens_BP = np.full((len(prompts), p), pad_id, np.int32)
    for b, x in enumerate(prompts):
        tokens_BP[b, p - len(x) :] = x
    return tokens_BP, np.asarray([len(x) for x in prompts], np.int32)


def _traced_in(fn, mesh, rules):
    """Trace `fn` with the model's activation sharding constraints bound to `mesh` (if any)."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sharding.activate(mesh, dict(rules)):
            return fn(*args, **kwargs)

    return wrapped


@functools.lru_cache(maxsize=32)
def compiled_generate(model, max_new_tokens: int, sampling: Sampling, stop_ids: tuple, pad_id: int,
                      mesh=None, rules: tuple | None = None):  # fmt: skip
    """Jitted `generate_tokens` for these static settings (cached: one compile per prompt bucket)."""
    fn = functools.partial(generate_tokens, model=model, max_new_tokens=max_new_tokens, sampling=sampling,
                           stop_ids=stop_ids, pad_id=pad_id)  # fmt: skip
    return jax.jit(_traced_in(fn, mesh, rules))


@functools.lru_cache(maxsize=32)
def compiled_steps(model, sampling: Sampling, mesh=None, rules: tuple | None = None):
    """Jitted (`start`, `advance`) for streaming; `advance` updates the cache in place."""
    first = jax.jit(_traced_in(functools.partial(start, model=model, sampling=sampling), mesh, rules),
                    static_argnames=("cache_len",))  # fmt: skip
    step = jax.jit(_traced_in(functools.partial(advance, model=model, sampling=sampling), mesh, rules),
                   donate_argnums=(4,))  # fmt: skip
    return first, step


quantize_jit = jax.jit(quant.quantize_params, static_argnums=1)
