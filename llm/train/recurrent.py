"""Model-level recurrence: run the whole layer stack over a long sequence one chunk at a time.

With `model.attention.infini.chunk_segments=k` every attention layer is Infini-attention, whose
only link between segments is its memory (M, z). The step then cuts each [B, T] batch into chunks
of k * segment_len tokens and scans over them, carrying every layer's memory (the `memory`
collection, llm/model/channels.py) and summing the loss chunk by chunk. Logits, residual stream
and projections exist for one chunk at a time, so a step's memory does not grow with T:

- each chunk is rematerialised (the backward pass keeps only the carried memories);
- past `NEST_ABOVE` chunks the scan is nested two deep (groups of ~sqrt(n) chunks, each group
  rematerialised too), so the stored memories number ~2 sqrt(n), not n.

The result equals the full-sequence forward pass (a chunk starts on a segment boundary, and
segments see each other only through the memory; tested). Auxiliary losses and metrics are
averaged over chunks (the max for max-metrics); parameter updates kept outside the optimizer
(MoE bias balancing) take the mean of the chunks' new values.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llm.model.channels import (
    LOSSES,
    MAX_METRICS,
    MEMORY,
    METRICS,
    PARAM_UPDATES,
    layer_metrics,
    total_losses,
)

NEST_ABOVE = 8  # chunks: beyond this many the scan nests (sqrt(n)-sized groups, each remat)


def chunk_len(cfg) -> int:
    """Tokens per chunk of model-level recurrence; 0 = off (the whole sequence in one call)."""
    f = cfg.attention.infini
    return f.chunk_segments * f.segment_len if f.chunk_segments else 0


def _group_size(n: int) -> int:
    """Chunks per group of the nested scan: the divisor of n nearest sqrt(n) from below (1 = flat)."""
    if n <= NEST_ABOVE:
        return 1
    return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)


def chunked_apply(params, model, batch, rng, train: bool, per_chunk):
    """(sum over chunks of `per_chunk(logits_BCV, chunk_batch)`, aux as llm/train/step.py's
    `forward` returns it). `batch` fields are [B, T]; T is padded to whole chunks (padding tokens
    are document 0 with loss mask 0, so they score nothing and reset no one's memory)."""
    c = chunk_len(model.cfg)
    b, t = batch["tokens"].shape
    n = -(-t // c)
    pad = n * c - t
    # Chunks are sliced inside the scan, not stacked outside it: no second copy of the batch.
    fields = {k: jnp.pad(v, ((0, 0), (0, pad))) if pad else v for k, v in batch.items() if v.shape == (b, t)}

    def apply(memory, i):
        chunk = {k: jax.lax.dynamic_slice_in_dim(v, i * c, c, axis=1) for k, v in fields.items()}
        variables = {"params": params, **({MEMORY: memory} if memory is not None else {})}
        rngs = {"dropout": jax.random.fold_in(rng, i)} if train else {}
        logits_BCV, sown = model.apply(
            variables, chunk["tokens"], chunk["positions"], chunk["segment_ids"], deterministic=not train,
            rngs=rngs, mutable=[MEMORY, LOSSES, METRICS, PARAM_UPDATES],
        )  # fmt: skip
        aux = {
            "losses": total_losses(sown.get(LOSSES, {})),
            "metrics": layer_metrics(sown.get(METRICS, {}), model.cfg),
            "param_updates": jax.lax.stop_gradient(sown.get(PARAM_UPDATES, {})),
        }
        return sown[MEMORY], (per_chunk(logits_BCV, chunk), aux)

    memory_shape, _ = jax.eval_shape(lambda: apply(None, jnp.int32(0)))
    memory0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), memory_shape)

    step = jax.checkpoint(apply)
    xs = jnp.arange(n, dtype=jnp.int32)
    g = _group_size(n)
    if g == 1:
        _, (outs, aux) = jax.lax.scan(step, memory0, xs)
    else:  # n/g groups of g chunks: the backward pass keeps n/g + g memories, not n
        grouped = xs.reshape(n // g, g)
        _, (outs, aux) = jax.lax.scan(
            jax.checkpoint(lambda m, ys: jax.lax.scan(step, m, ys)), memory0, grouped
        )
        outs, aux = jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), (outs, aux))
    total = jax.tree.map(lambda x: jnp.sum(x, axis=0), outs)
    metrics = {
        k: (jnp.max(v, 0) if k.split("/")[0] in MAX_METRICS else jnp.mean(v, 0))
        for k, v in aux["metrics"].items()
    }
    aux = {
        "losses": {k: jnp.mean(v, 0) for k, v in aux["losses"].items()},
        "metrics": metrics,
        "param_updates": jax.tree.map(lambda x: jnp.mean(x, 0).astype(x.dtype), aux["param_updates"]),
    }
    return total, aux
