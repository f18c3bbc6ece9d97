"""Generation for notebooks and the CLI: prompts in, continuations out, on the KV-cached engine.

    from llm.infer import generate
    generate(model, params, tokenizer, ["ROMEO:", "JULIET:"], max_new_tokens=50, temperature=0)

A list of prompts runs as one left-padded batch, the whole loop on device; `generate_stream`
yields text as each token is chosen (same seed, same text as `generate` within the context).
`quantize="int8"` stores the weights as int8; `mesh=` runs on parameters sharded over a mesh.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm import sharding
from llm.infer import engine
from llm.infer.engine import Sampling
from llm.model.quant import QTensor, is_quantized


def prepare_params(model, params, quantize: str | None = None, mesh=None, rules=None):
    """Params ready for the engine: int8-quantized if asked (once), sharded over `mesh` if given."""
    if quantize not in (None, "none") and not is_quantized(params):
        params = engine.quantize_jit(params, quantize)  # raises ConfigError for an unknown kind
    if mesh is not None:
        params = shard_params(model, params, mesh, rules)
    return params


def shard_params(model, params, mesh, rules=None):
    """Place params (float or int8) on `mesh` by the model's logical axis names and the rules table."""
    rules = dict(rules or sharding.DEFAULT_RULES)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
    specs = nn.get_partition_spec(boxed)

    def put(spec, leaf):
        def one(x):
            return jax.device_put(
                x, NamedSharding(mesh, sharding.logical_to_spec(tuple(spec), x.shape, mesh, rules))
            )

        # An int8 tensor's values share the weight's layout; its scales (size 1 on contracted
        # axes) drop the mesh axes that no longer divide.
        return QTensor(q=one(leaf.q), scale=one(leaf.scale)) if isinstance(leaf, QTensor) else one(leaf)

    return jax.tree.map(put, specs, params, is_leaf=lambda x: isinstance(x, P))


def _place(mesh, rules, arrays, batched: bool = True):
    """Inputs onto the mesh: batch over the data-parallel axes when it divides, else replicated."""
    if mesh is None:
        return arrays
    rules = dict(rules or sharding.DEFAULT_RULES)
    out = []
    for x in arrays:
        x = jnp.asarray(x)
        if batched and x.ndim and x.shape[0] % sharding.data_parallel_size(mesh, rules) == 0:
            out.append(jax.device_put(x, sharding.batch_sharding(mesh, rules, x.ndim)))
        else:
            out.append(jax.device_put(x, NamedSharding(mesh, P())))
    return out


def _rules_key(mesh, rules):
    return None if mesh is None else tuple(sorted(dict(rules or sharding.DEFAULT_RULES).items()))


def check_context(model, lengths: Sequence[int], max_new_tokens: int) -> None:
    """Prompt plus new tokens must fit the model's context (positions below model.max_seq_len)."""
    ctx = model.cfg.max_seq_len
    if not lengths:
        raise ValueError("no prompts given: pass a list of token-id lists (or of strings to generate)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(lengths)
    # The last new token is never fed back, so positions reach length + max_new_tokens - 2.
    if longest + max_new_tokens - 1 > ctx:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"context model.max_seq_len={ctx}; shorten the prompt, lower max_new_tokens, or use "
            f"generate_stream (it slides the context window)"
        )


def generate_ids(
    model, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, sampling: Sampling = Sampling(),
    seed: int = 0, stop_ids: Sequence[int] = (), quantize: str | None = None, mesh=None, rules=None,
    pad_id: int = 0,
) -> list[list[int]]:  # fmt: skip
    """Token ids in, new token ids out (each row cut before its first stop id), one batch on device."""
    model = engine.inference_model(model)
    check_context(model, [len(p) for p in prompts], max_new_tokens)
    params = prepare_params(model, params, quantize, mesh, rules)
    tokens_BP, lengths_B = engine.left_pad(prompts, pad_id=pad_id)
    fn = engine.compiled_generate(model, max_new_tokens, sampling, tuple(int(s) for s in stop_ids), pad_id,
                                  mesh, _rules_key(mesh, rules))  # fmt: skip
    tokens_BP, lengths_B = _place(mesh, rules, [tokens_BP, lengths_B])
    (rng,) = _place(mesh, rules, [jax.random.PRNGKey(seed)], batched=False)
    out_BN, count_B = jax.device_get(fn(params, tokens_BP, lengths_B, rng))
    return [out_BN[b, : count_B[b]].tolist() for b in range(len(prompts))]


def with_pauses(ids: list[int], tokenizer, k: int) -> list[int]:
    """`ids` followed by k pause tokens (the tokenizer must have `<pause>`)."""
    if not k:
        return ids
    from llm.config import PAUSE  # noqa: PLC0415

    return ids + [tokenizer.special_id(PAUSE)] * k


def generate(
    model, params, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 200,
    temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
    seed: int = 0, stop_at_eos: bool = True, quantize: str | None = None, mesh=None, rules=None,
    pause_tokens: int = 0,
) -> str | list[str]:  # fmt: skip
    """Continuations of a prompt (-> str) or of a list of prompts (-> list of str, one batch).

    `pause_tokens` = k appends k `<pause>` tokens to every prompt (llm/data/pause.py: a model
    fine-tuned with data.pause.k expects them before its answer).

    Prompts longer than the context keep their last tokens. A single prompt whose continuation
    would overflow the context is generated by `generate_stream`, which slides the window.
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    sampling = Sampling(**kw)
    ctx = model.cfg.max_seq_len
    if single and max_new_tokens >= ctx:
        return "".join(generate_stream(model, params, tokenizer, prompts, max_new_tokens, seed=seed,
                                       stop_at_eos=stop_at_eos, quantize=quantize, mesh=mesh, rules=rules,
                                       pause_tokens=pause_tokens, **kw))  # fmt: skip
    if max_new_tokens >= ctx:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be below model.max_seq_len={ctx} for a "
                         f"batch of prompts; generate_stream slides the window for one prompt")  # fmt: skip
    keep = ctx - max_new_tokens + 1
    ids = [
        with_pauses((tokenizer.encode(t) or [tokenizer.eos_id]), tokenizer, pause_tokens)[-keep:]
        for t in texts
    ]
    stop = (tokenizer.eos_id,) if stop_at_eos else ()
    out = generate_ids(model, params, ids, max_new_tokens, sampling=sampling, seed=seed, stop_ids=stop,
                       quantize=quantize, mesh=mesh, rules=rules)  # fmt: skip
    decoded = [tokenizer.decode(o) for o in out]
    return decoded[0] if single else decoded


def generate_stream(
    model, params, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
    top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
    stop_at_eos: bool = True, quantize: str | None = None, mesh=None, rules=None, pause_tokens: int = 0,
) -> Iterator[str]:  # fmt: skip
    """Yield text pieces as tokens are chosen: prefill once, then one cached decode step per token.
    `pause_tokens` = k appends k `<pause>` tokens to the prompt (see `generate`).

    When the context (model.max_seq_len) is full, the last half of it is prefilled again and
    decoding goes on from there, so any number of tokens can be generated.
    """
    model = engine.inference_model(model)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty)  # fmt: skip
    params = prepare_params(model, params, quantize, mesh, rules)
    first, step = engine.compiled_steps(model, sampling, mesh, _rules_key(mesh, rules))
    ctx = model.cfg.max_seq_len
    ids = with_pauses(list(tokenizer.encode(prompt)) or [tokenizer.eos_id], tokenizer, pause_tokens)
    n_prompt = len(ids)
    (keys_1,) = _place(mesh, rules, [engine.row_keys(jax.random.PRNGKey(seed), 1)], batched=False)

    def restart(window, i):
        """Prefill `window` and choose token i. The cache has room until the context is full; its
        size depends only on the padded prompt length, so a window slide reuses the compiled steps."""
        tokens_1P, lengths_1 = engine.left_pad([window])
        cache_len = tokens_1P.shape[1] + min(max_new_tokens - 1, ctx)
        tokens_1P, lengths_1 = _place(mesh, rules, [tokens_1P, lengths_1])
        tok, cache, seen = first(params, tokens_1P, lengths_1, keys_1, i, cache_len=cache_len)
        return tok, cache, seen, len(window)

    if max_new_tokens < 1:
        return
    tok_1, cache, seen, pos = restart(ids[-ctx:], 0)
    emitted = ""
    for i in range(max_new_tokens):
        t = int(tok_1[0])
        if stop_at_eos and t == tokenizer.eos_id:
            break
        ids.append(t)
        text = tokenizer.decode(ids[n_prompt:])
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(emitted) :]
            emitted = text
        if i + 1 == max_new_tokens:
            break
        if pos >= ctx:  # no position left: slide the window
            tok_1, cache, seen, pos = restart(ids[-max(ctx // 2, 1) :], i + 1)
        else:
            pos_1 = _place(mesh, rules, [np.asarray([pos], np.int32)])[0]
            tok_1, cache, seen = step(params, tok_1, pos_1, i + 1, cache, seen, keys_1)
            pos += 1
    text = tokenizer.decode(ids[n_prompt:])
    if len(text) > len(emitted):  # a character left incomplete at the end
        yield text[len(emitted) :]
