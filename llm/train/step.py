"""Pure, jit-able step functions: `train_step(state, batch) -> (state, metrics)` and `eval_step`
(plus `eval_summary`, which turns summed eval_step outputs into loss / perplexity / bits per byte).

Model, optimizer and schedule are bound with functools.partial before jitting (see loop.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import optax

from llm.model.channels import (
    LOSSES,
    METRICS,
    PARAM_UPDATES,
    apply_param_updates,
    layer_metrics,
    total_losses,
)
from llm.model.quant import QTensor
from llm.train import recurrent
from llm.train.state import TrainState


def token_nll(logits_BTV, targets_BT):
    """Per-token negative log-likelihood in fp32 (bf16 logits lose precision in logsumexp)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)


def forward(params, model, batch, rng=None, train: bool = False):
    """Logits, the sown auxiliary losses {name: sum over layers} (already weighted by the layers)
    and the sown metrics (flat scalars, llm/model/channels.py) of one batch."""
    logits_BTV, sown = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
        deterministic=not train, rngs={"dropout": rng} if train else {},
        mutable=[LOSSES, METRICS, PARAM_UPDATES],
    )  # fmt: skip
    aux = {
        "losses": total_losses(sown.get(LOSSES, {})),
        "metrics": layer_metrics(sown.get(METRICS, {}), model.cfg),
        # New values of parameters kept outside the optimizer (channels.set_param).
        "param_updates": jax.lax.stop_gradient(sown.get(PARAM_UPDATES, {})),
    }
    return logits_BTV, aux


def _nll_sum(logits_BTV, batch):
    return jnp.sum(token_nll(logits_BTV, batch["targets"]) * batch["loss_mask"].astype(jnp.float32))


def _nll_and_z_sums(logits_BTV, batch):
    """(masked NLL sum, masked sum of log Z^2): the z-loss's log-partition from the same logsumexp."""
    logits = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits, axis=-1)
    target_BT = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum((log_z_BT - target_BT) * mask), jnp.sum(jnp.square(log_z_BT) * mask)


def _loss(params, model, batch, rng, n_tokens, aux_weight, z_loss: float = 0.0):
    """Sum of masked NLL / n_tokens (so micro-batch losses add up to the batch mean) + aux losses
    (each micro-batch's weighted by aux_weight = 1/grad_accum, so they too average).

    `z_loss` > 0 adds PaLM's output z-loss, z_loss * mean(log Z^2) over the scored tokens (Z the
    softmax normaliser: keeps the logits from drifting), as the aux loss `z_loss`."""
    per_chunk = _nll_and_z_sums if z_loss else _nll_sum
    if recurrent.chunk_len(model.cfg):  # the stack chunk by chunk, the loss summed per chunk
        sums, aux = recurrent.chunked_apply(params, model, batch, rng, True, per_chunk)
    else:
        logits_BTV, aux = forward(params, model, batch, rng, train=True)
        sums = per_chunk(logits_BTV, batch)
    nll_sum = sums[0] if z_loss else sums
    if z_loss:  # a micro-batch mean, weighted like the other aux losses
        aux["losses"] = {**aux["losses"], "z_loss": z_loss * sums[1] / scored_tokens(batch)}
    nll = nll_sum / n_tokens
    aux_total = sum(aux["losses"].values()) if aux["losses"] else 0.0
    return nll + aux_weight * aux_total, (nll, aux)


def scored_tokens(batch):
    """Tokens whose targets are scored (the LM loss's normaliser), at least 1."""
    return jnp.maximum(jnp.sum(batch["loss_mask"]), 1).astype(jnp.float32)


def train_step(
    state: TrainState,
    batch,
    *,
    model,
    tx,
    schedule,
    grad_accum: int = 1,
    spike_sigmas: float = 6.0,
    task=None,
    trainable=None,
    z_loss: float = 0.0,
):
    """One optimizer update on a global batch (optionally in `grad_accum` micro-batches).

    `task` (llm/train/tasks.py; default language modelling) gives the loss and its normaliser.
    A non-finite loss or gradient leaves params and optimizer state untouched and counts a skip;
    the host loop decides (train.nan_policy) whether to stop or go on. `trainable(params)` (a
    pytree of bools) says which parameters are differentiated and updated (the rest is frozen). With a loss-spike monitor
    in the state (train.spike_window > 0) a spiking loss is skipped the same way.
    """
    lm_loss = functools.partial(_loss, z_loss=z_loss) if z_loss else _loss
    normaliser, loss_fn = (scored_tokens, lm_loss) if task is None else (task.normaliser, task.loss)
    n_tokens = normaliser(batch)
    # The normaliser is a global sum (an all-reduce over the data-parallel devices) that depends on
    # the batch alone. XLA:CPU runs each device's ops as a dataflow graph on one shared thread pool:
    # a device that issues that all-reduce first blocks a pool thread until the other device has
    # run its forward pass too (~200 ms idle core in 1 of 4 steps of the default model on 2 CPU
    # devices). Tying the batch to the summed count makes every device sum first, then compute.
    n_tokens, batch = jax.lax.optimization_barrier((n_tokens, batch))
    rng = jax.random.fold_in(state.rng, state.step)
    split = Trainable(state.params, trainable)
    # Differentiate the trainable leaves alone: XLA never forms a frozen parameter's gradient (a
    # LoRA step does no weight-gradient matmul for its base), and an int8 base needs none.
    grad_fn = jax.value_and_grad(lambda leaves, *a: loss_fn(split.params(leaves), *a), has_aux=True)
    if grad_accum == 1:
        (loss, (nll, aux)), grads = grad_fn(split.leaves, model, batch, rng, n_tokens, 1.0)
    else:
        # Micro-batch a takes rows a, a+A, a+2A, ...: every micro-batch stays spread over all
        # data-parallel devices (a contiguous split would put each on a subset of them).
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1),
            batch,
        )

        def body(carry, xs):
            mb, i = xs
            (l, (n, a)), g = grad_fn(split.leaves, model, mb, jax.random.fold_in(rng, i), n_tokens,
                                     1.0 / grad_accum)  # fmt: skip
            acc_g, acc_l, acc_n, acc_a = carry
            return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, acc_n + n,
                    jax.tree.map(lambda x, y: x + y / grad_accum, acc_a, a)), None  # fmt: skip

        zeros = jax.tree.map(jnp.zeros_like, split.leaves)
        first = jax.tree.map(lambda x: x[0], micro)
        loss_shape = lambda p, b: loss_fn(p, model, b, rng, n_tokens, 1.0)  # noqa: E731
        _, (_, aux0) = jax.eval_shape(loss_shape, state.params, first)
        aux_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
        (grads, loss, nll, aux), _ = jax.lax.scan(
            body, (zeros, 0.0, 0.0, aux_zero), (micro, jnp.arange(grad_accum))
        )

    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(split.full(grads), state.opt_state, split.view)
    new_params = split.params([optax.apply_updates(p, u) for p, u in zip(split.leaves, split.pick(updates))])
    # Parameters that layers set outside the optimizer (channels.set_param), then the rest.
    new_params = apply_param_updates(new_params, aux["param_updates"])
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    monitor, spike_metrics, apply = state.monitor, {}, finite
    if monitor:
        losses, count = monitor["losses"], monitor["count"]
        window = losses.shape[0]
        mean, std = jnp.mean(losses), jnp.maximum(jnp.std(losses), 0.01)
        # Judged once the window is full; std is floored at 0.01 nats so a flat curve does not
        # turn ordinary noise into spikes. Skipped losses never enter the window.
        spike = finite & (count >= window) & (nll > mean + spike_sigmas * std)
        apply = finite & ~spike
        monitor = {
            "losses": jnp.where(apply, losses.at[count % window].set(nll), losses),
            "count": count + apply.astype(jnp.int32),
            "spikes": monitor["spikes"] + spike.astype(jnp.int32),
        }
        spike_metrics = {"loss_spike": spike.astype(jnp.int32), "spike_threshold": mean + spike_sigmas * std}
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        skipped=state.skipped + (1 - apply.astype(jnp.int32)),
        monitor=monitor,
    )
    metrics = {
        "loss": nll, "total_loss": loss, "grad_norm": grad_norm,
        "learning_rate": schedule(state.step), "nonfinite": 1 - finite.astype(jnp.int32),
        "n_tokens": n_tokens, **spike_metrics, **{f"aux/{k}": v for k, v in aux["losses"].items()},
        **{f"model/{k}": v for k, v in aux["metrics"].items()},
    }  # fmt: skip
    return new_state, metrics


class Trainable:
    """A params tree split into the leaves a step differentiates and updates (`trainable(params)`
    True; all when `trainable` is None) and the frozen rest, which passes through untouched.

    The optimizer sees `view` / `full(grads)`: the tree with every frozen leaf a scalar zero, so
    an int8 QTensor of a QLoRA base (one node, two arrays) stands where its float kernel stood
    when the optimizer state was made; frozen leaves hold no optimizer state either way.
    """

    def __init__(self, params, trainable=None):
        is_q = lambda x: isinstance(x, QTensor)  # noqa: E731
        self._flat, self._treedef = jax.tree.flatten(params, is_leaf=is_q)
        zero = jnp.zeros((), jnp.float32)
        self.view = self._treedef.unflatten([zero if is_q(x) else x for x in self._flat])
        mask = [True] * len(self._flat) if trainable is None else jax.tree.leaves(trainable(self.view))
        self._index = [i for i, m in enumerate(mask) if m]
        self.leaves = [self._flat[i] for i in self._index]

    def params(self, leaves):
        """The full params tree with the trainable leaves replaced by `leaves`."""
        flat = list(self._flat)
        for i, x in zip(self._index, leaves, strict=True):
            flat[i] = x
        return self._treedef.unflatten(flat)

    def full(self, leaves):
        """`view`'s structure with `leaves` at the trainable places and scalar zeros elsewhere."""
        flat = [jnp.zeros((), jnp.float32)] * len(self._flat)
        for i, x in zip(self._index, leaves, strict=True):
            flat[i] = x
        return self._treedef.unflatten(flat)

    def pick(self, tree):
        """The trainable leaves of a tree of `view`'s structure."""
        flat = self._treedef.flatten_up_to(tree)
        return [flat[i] for i in self._index]


def eval_step(params, batch, *, model, token_bytes):
    """Sums over one held-out batch: NLL (nats), scored tokens, and raw-text bytes they cover."""

    def sums(logits_BTV, b):
        mask_BT = b["loss_mask"].astype(jnp.float32)
        n_bytes = jnp.sum(jnp.take(token_bytes, b["targets"]) * mask_BT)
        return {"nll_sum": _nll_sum(logits_BTV, b), "n_tokens": jnp.sum(mask_BT), "n_bytes": n_bytes}

    if recurrent.chunk_len(model.cfg):
        return recurrent.chunked_apply(params, model, batch, None, False, sums)[0]
    return sums(forward(params, model, batch)[0], batch)


def eval_summary(outputs: Iterable[dict]) -> dict[str, float]:
    """Sum eval_step outputs (host or device) over batches: loss in nats/token, perplexity,
    bits per byte (NLL in bits over the UTF-8 bytes of the scored tokens), tokens, bytes."""
    totals = {"nll_sum": 0.0, "n_tokens": 0.0, "n_bytes": 0.0}
    for out in outputs:
        out = jax.device_get(out)
        for k in totals:
            totals[k] += float(out[k])
    loss = totals["nll_sum"] / max(totals["n_tokens"], 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "bits_per_byte": totals["nll_sum"] / math.log(2) / max(totals["n_bytes"], 1),
        "tokens": int(totals["n_tokens"]),
        "bytes": int(totals["n_bytes"]),
    }
