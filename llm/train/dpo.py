"""Direct Preference Optimization (Rafailov et al. 2023): `train.task=dpo`, `data.kind=preferences`.

For a prompt x with a chosen completion y_w and a rejected one y_l, with log pi(y|x) the summed
log-probability of the completion's tokens (and EOS) under the policy and log ref(y|x) under the
frozen reference (the run's `train.init_from` checkpoint):

    implicit reward  r(y) = beta * (log pi(y|x) - log ref(y|x))
    loss             -log sigmoid(r(y_w) - r(y_l))

averaged over pairs; `train.dpo_beta` is beta. The reference log-probabilities are computed once,
before the first step, with the reference parameters and stored in the examples
(`ref_chosen` / `ref_rejected`), so the reference model is never held during training. Logged:
the rewards of chosen and rejected completions, their margin and the preference accuracy
(margin > 0), in training (`model/dpo/*`) and on the held-out pairs (`eval_*`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llm.registry import ConfigError
from llm.train import step as step_lib
from llm.train.tasks import TASKS, Task

FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def dpo_loss(pc_B, pr_B, rc_B, rr_B, beta: float):
    """(per-pair loss, reward chosen, reward rejected) from summed log-probabilities."""
    r_chosen, r_rejected = beta * (pc_B - rc_B), beta * (pr_B - rr_B)
    return -jax.nn.log_sigmoid(r_chosen - r_rejected), r_chosen, r_rejected


def completion_logp(params, model, batch, side: str, rng=None, train: bool = False):
    """Summed log-probability of the scored tokens of one side of the pair: [B] (f32)."""
    b = {k: batch[f"{side}_{k}"] for k in FIELDS}
    logits_BTV, aux = step_lib.forward(params, model, b, rng, train=train)
    return -jnp.sum(step_lib.token_nll(logits_BTV, b["targets"]) * b["loss_mask"], axis=1), aux


@TASKS.register("dpo")
class DPO(Task):
    name = "dpo"
    fields = {**{f"{s}_{k}": ("batch", "length") for s in ("chosen", "rejected") for k in FIELDS},
              "ref_chosen": ("batch",), "ref_rejected": ("batch",), "weight": ("batch",)}  # fmt: skip
    beta = 0.1

    def configure(self, cfg) -> None:
        self.beta = cfg.train.dpo_beta
        if cfg.data.kind != "preferences":
            raise ConfigError(
                "train.task=dpo needs data.kind=preferences (pairs of chosen/rejected completions)"
            )
        if not cfg.train.init_from:
            raise ConfigError(
                "train.task=dpo needs train.init_from=<run dir>: the reference model it starts from"
            )

    def normaliser(self, batch):
        return jnp.maximum(jnp.sum(batch["weight"]), 1.0)

    def _pairs(self, params, model, batch, rng, train):
        r1, r2 = jax.random.split(rng) if rng is not None else (None, None)
        pc, aux = completion_logp(params, model, batch, "chosen", r1, train)
        pr, _ = completion_logp(params, model, batch, "rejected", r2, train)
        return dpo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], self.beta), aux

    def loss(self, params, model, batch, rng, n_units, aux_weight):
        (loss_B, rc, rr), aux = self._pairs(params, model, batch, rng, True)
        w = batch["weight"]
        loss = jnp.sum(loss_B * w) / n_units
        mean = lambda x: jnp.sum(x * w) / n_units  # noqa: E731
        aux = {**aux, "metrics": {**aux["metrics"], "dpo/reward_chosen": mean(rc), "dpo/reward_rejected": mean(rr),
                                  "dpo/reward_margin": mean(rc - rr),
                                  "dpo/accuracy": mean((rc > rr).astype(jnp.float32))}}  # fmt: skip
        return loss, (loss, aux)

    def eval_sums(self, params, batch, *, model, token_bytes):
        (loss_B, rc, rr), _ = self._pairs(params, model, batch, None, False)
        w = batch["weight"]
        return {"loss": jnp.sum(loss_B * w), "chosen": jnp.sum(rc * w), "rejected": jnp.sum(rr * w),
                "correct": jnp.sum((rc > rr) * w), "n": jnp.sum(w)}  # fmt: skip

    @staticmethod
    def summary(outputs) -> dict:
        tot = {"loss": 0.0, "chosen": 0.0, "rejected": 0.0, "correct": 0.0, "n": 0.0}
        for out in outputs:
            out = jax.device_get(out)
            for k in tot:
                tot[k] += float(out[k])
        n = max(tot["n"], 1.0)
        return {"loss": tot["loss"] / n, "preference_accuracy": tot["correct"] / n,
                "reward_margin": (tot["chosen"] - tot["rejected"]) / n, "reward_chosen": tot["chosen"] / n,
                "reward_rejected": tot["rejected"] / n, "pairs": int(tot["n"])}  # fmt: skip

    @staticmethod
    def prepare(examples, params, model, batch_size: int) -> None:
        """Fill `examples.ref` with the reference log-probabilities (one pass, no gradient)."""
        fn = jax.jit(
            lambda p, b: (
                completion_logp(p, model, b, "chosen")[0],
                completion_logp(p, model, b, "rejected")[0],
            )
        )
        for lo in range(0, len(examples), batch_size):
            rows = [examples[i] for i in range(lo, min(lo + batch_size, len(examples)))]
            rows += [examples.empty()] * (batch_size - len(rows))
            batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
            pc, pr = jax.device_get(fn(params, batch))
            n = min(batch_size, len(examples) - lo)
            examples.ref[lo : lo + n, 0], examples.ref[lo : lo + n, 1] = pc[:n], pr[:n]
