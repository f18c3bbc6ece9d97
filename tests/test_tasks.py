"""Batch fields as data: a task declares its fields with logical axes, the loop shards each field
by them (a per-example `[B]` field included) and the step minimises the task's loss.

A toy task registered here: language modelling with a per-example weight `[B]`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llm.data import pipeline
from llm.train import loop, step, tasks
from tests.test_train import tiny_cfg


@tasks.TASKS.register("test_weighted_lm")
class WeightedLM(tasks.LanguageModelling):
    """LM loss with each example's tokens weighted by `example_weight` [B]."""

    name = "test_weighted_lm"
    fields = {**tasks.LM_FIELDS, "example_weight": ("batch",)}

    def loss(self, params, model, batch, rng, n_units, aux_weight):
        logits_BTV, aux = step.forward(params, model, batch, rng, train=True)
        w_BT = batch["loss_mask"] * batch["example_weight"][:, None]
        nll = jnp.sum(step.token_nll(logits_BTV, batch["targets"]) * w_BT) / n_units
        return nll, (nll, aux)


def _setup(tmp_path, task, mesh=(4, 1, 1)):
    cfg = tiny_cfg(**{"train.task": task, "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
    exp = loop.build(cfg, str(tmp_path), devices=jax.devices()[: int(np.prod(mesh))])
    ds = pipeline.train_dataset(exp.train_windows, cfg.train.batch_size, cfg.data.seed)
    return exp, ds[0]


def test_a_per_example_field_is_sharded_by_its_logical_axes_and_reaches_the_loss(tmp_path):
    exp, local = _setup(tmp_path / "w", "test_weighted_lm")
    sh = exp.batch_shardings
    assert sh["example_weight"].spec == P("data") and sh["tokens"].spec == P("data", None)
    b = local["tokens"].shape[0]
    train_fn, _ = loop.compile_steps(exp)

    def loss_with(weights):
        batch = loop.to_global(exp, {**local, "example_weight": np.asarray(weights, np.float32)})
        assert (
            batch["example_weight"].sharding.spec == P("data")
            and len(batch["example_weight"].addressable_shards) == 4
        )
        state = exp.trainer.init_state()
        return float(train_fn(state, batch)[1]["loss"])

    lm_exp, _ = _setup(tmp_path / "lm", "lm")
    lm_train, _ = loop.compile_steps(lm_exp)
    lm_loss = float(lm_train(lm_exp.trainer.init_state(), loop.to_global(lm_exp, local))[1]["loss"])
    np.testing.assert_allclose(loss_with(np.ones(b)), lm_loss, rtol=1e-6)  # weight 1 = the LM task
    assert loss_with(np.zeros(b)) == 0.0
    half = np.r_[np.ones(b // 2), np.zeros(b - b // 2)]
    assert 0 < loss_with(half) < lm_loss  # the zero-weight rows' tokens no longer count


def test_unknown_task_lists_the_registered_ones():
    from llm.config import ConfigError

    with pytest.raises(
        ConfigError, match=r"unknown task 'clasify' \(config field train.task\); valid choices: .*lm"
    ):
        dataclasses.replace(tiny_cfg(), train=dataclasses.replace(tiny_cfg().train, task="clasify"))
