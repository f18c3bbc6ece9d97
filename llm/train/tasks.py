"""Tasks: what a batch holds and what the train step minimises (`train.task`).

A task names its batch fields with their logical axes (so the loop shards each field, e.g. a
per-example label `[B]` as ("batch",)), the normaliser of its loss (scored tokens, examples), the
loss of one (micro-)batch and its evaluation sums. Language modelling is the one task so far;
classification, instruction tuning and preference tuning register here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm.data import pipeline
from llm.registry import ConfigError, Registry
from llm.train import step as step_lib

TASKS: Registry = Registry("task")

# What the packing pipeline yields (llm/data/pipeline.py): tokens, targets, positions, segment ids
# and the loss mask (1 where the target is scored), each [batch, length].
LM_FIELDS: dict[str, tuple[str, ...]] = {k: ("batch", "length") for k in pipeline.FIELDS}


class Task:
    """Interface; see LanguageModelling."""

    name: str
    fields: dict[str, tuple[str, ...]]

    def normaliser(self, batch):
        """How many units the batch's loss averages over (a traced scalar)."""
        raise NotImplementedError

    def loss(self, params, model, batch, rng, n_units, aux_weight):
        """(loss, (main loss, aux)) of a (micro-)batch; the loss sums to the batch mean."""
        raise NotImplementedError

    def eval_sums(self, params, batch, *, model, token_bytes):
        """Sums over one held-out batch, added up by `summary`."""
        raise NotImplementedError

    @staticmethod
    def summary(outputs) -> dict:
        """The eval_sums of every held-out batch -> metrics (`loss` at least)."""
        raise NotImplementedError


@TASKS.register("lm")
class LanguageModelling(Task):
    """Next-token prediction on packed windows: mean NLL of the scored tokens."""

    name = "lm"
    fields = LM_FIELDS

    def normaliser(self, batch):
        return step_lib.scored_tokens(batch)

    def loss(self, params, model, batch, rng, n_units, aux_weight):
        return step_lib._loss(params, model, batch, rng, n_units, aux_weight)

    def eval_sums(self, params, batch, *, model, token_bytes):
        return step_lib.eval_step(params, batch, model=model, token_bytes=token_bytes)

    @staticmethod
    def summary(outputs) -> dict:
        return step_lib.eval_summary(outputs)


CLASSIFY_FIELDS: dict[str, tuple[str, ...]] = {
    "tokens": ("batch", "length"), "positions": ("batch", "length"), "segment_ids": ("batch", "length"),
    "label": ("batch",), "weight": ("batch",),
}  # fmt: skip


@TASKS.register("classify")
class Classify(Task):
    """Sequence classification (`model.head=classifier`, `data.kind=classification`): mean
    cross-entropy of the class logits over the real examples; evaluation sums a confusion matrix
    (rows: true class, columns: predicted) and the loss, `summary` turns them into accuracy,
    per-class precision / recall / F1 and their macro averages."""

    name = "classify"
    fields = CLASSIFY_FIELDS

    def normaliser(self, batch):
        return jnp.maximum(jnp.sum(batch["weight"]), 1.0)

    def _logits(self, params, model, batch, rng, train):
        if model.cfg.head != "classifier":
            raise ConfigError(
                "train.task=classify needs --config.model.head=classifier (and model.n_classes)"
            )
        return step_lib.forward(params, model, batch, rng, train=train)

    def loss(self, params, model, batch, rng, n_units, aux_weight):
        logits_BC, aux = self._logits(params, model, batch, rng, True)
        nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["label"])
        nll = jnp.sum(nll_B * batch["weight"]) / n_units
        aux_total = sum(aux["losses"].values()) if aux["losses"] else 0.0
        return nll + aux_weight * aux_total, (nll, aux)

    def eval_sums(self, params, batch, *, model, token_bytes):
        logits_BC, _ = self._logits(params, model, batch, None, False)
        w_B = batch["weight"]
        c = logits_BC.shape[-1]
        pred_B = jnp.argmax(logits_BC, -1)
        confusion_CC = jnp.einsum(
            "b,bi,bj->ij", w_B, jax.nn.one_hot(batch["label"], c), jax.nn.one_hot(pred_B, c)
        )
        nll = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["label"]) * w_B)
        return {"confusion": confusion_CC, "nll_sum": nll, "n": jnp.sum(w_B)}

    @staticmethod
    def summary(outputs) -> dict:
        conf, nll, n = None, 0.0, 0.0
        for out in outputs:
            out = jax.device_get(out)
            conf = np.asarray(out["confusion"], np.float64) + (0 if conf is None else conf)
            nll += float(out["nll_sum"])
            n += float(out["n"])
        return classification_metrics(conf, nll / max(n, 1.0))


def classification_metrics(confusion, loss: float) -> dict:
    """Accuracy, per-class precision / recall / F1 and macro averages from a confusion matrix
    (rows true, columns predicted); a class never predicted has precision 0."""
    conf = np.asarray(confusion, np.float64)
    tp = np.diag(conf)
    pred, true = conf.sum(0), conf.sum(1)
    precision = np.where(pred > 0, tp / np.maximum(pred, 1e-12), 0.0)
    recall = np.where(true > 0, tp / np.maximum(true, 1e-12), 0.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return {"loss": loss, "accuracy": float(tp.sum() / max(conf.sum(), 1.0)),
            "precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "macro_f1": float(f1.mean()), "confusion": conf.astype(int).tolist(), "examples": int(conf.sum())}  # fmt: skip


def get(name: str, cfg=None) -> Task:
    """The task named `name`, configured from the RunConfig `cfg` when it takes settings."""
    from llm.train import dpo  # noqa: F401, PLC0415  (registers `dpo`)

    task = TASKS.get(name, "train.task")()
    if cfg is not None and hasattr(task, "configure"):
        task.configure(cfg)
    return task
