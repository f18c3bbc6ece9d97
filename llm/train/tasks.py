"""Tasks: what a batch holds and what the train step minimises (`train.task`).

A task names its batch fields with their logical axes (so the loop shards each field, e.g. a
per-example label `[B]` as ("batch",)), the normaliser of its loss (scored tokens, examples), the
loss of one (micro-)batch and its evaluation sums. Language modelling is the one task so far;
classification, instruction tuning and preference tuning register here.
"""

from __future__ import annotations

from llm.data import pipeline
from llm.registry import Registry
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


def get(name: str) -> Task:
    return TASKS.get(name, "train.task")()
