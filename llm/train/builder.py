"""One place that turns a RunConfig and a mesh into a model, an optimizer, sharded state and
jitted steps. The host loop, `llm.load` (params only) and the AOT fit check all build here, so
they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llm import sharding
from llm.config import ConfigError, RunConfig
from llm.model import Transformer
from llm.model import lora as lora_lib
from llm.train import optimizer as optim_lib
from llm.train import state as state_lib
from llm.train import step as step_lib
from llm.train import tasks
from llm.train.legacy import OptimizerUpgrade


def build_model(cfg: RunConfig) -> Transformer:
    if cfg.model.vocab_size is None:
        raise ConfigError("model.vocab_size is unset (it normally comes from the tokenizer); pass "
                          "--config.model.vocab_size=<n>")  # fmt: skip
    return Transformer(cfg.model)


def optimizer_groups(cfg: RunConfig) -> tuple[str, ...]:
    """Group rules the run adds after optim.groups: a LoRA run trains its adapters alone."""
    return lora_lib.OPTIMIZER_GROUPS if cfg.model.lora.rank else ()


def params_target(cfg: RunConfig, mesh: Mesh, model: Transformer | None = None):
    """The parameters' ShapeDtypeStructs with their shardings on `mesh`, in the form the run holds
    them (a QLoRA base's kernels as int8 QTensors): a params-only restore target."""
    model = model or build_model(cfg)
    target = state_lib.abstract_params(model, cfg.data.seq_len, mesh, cfg.mesh.rules)
    return lora_lib.quantized_target(target, cfg.model.lora)


@dataclasses.dataclass
class Trainer:
    """Model, optimizer, task and the sharded abstract train state of one run on one mesh."""

    cfg: RunConfig
    mesh: Mesh
    model: Transformer
    tx: Any
    schedule: Any
    task: tasks.Task
    abstract_state: Any
    state_shardings: Any

    @property
    def rules(self):
        return self.cfg.mesh.rules

    @functools.cached_property
    def batch_shardings(self) -> dict[str, jax.sharding.NamedSharding]:
        """Each batch field's sharding, from the logical axes the task gives it (made once: the
        loop places every batch with these objects)."""
        return {
            k: sharding.batch_sharding(self.mesh, self.rules, names) for k, names in self.task.fields.items()
        }

    def restore_target(self):
        """The abstract train state carrying its shardings (what a checkpoint restores into)."""
        return state_lib.sharded_target(self.abstract_state, self.state_shardings)

    def params_target(self):
        return state_lib.sharded_target(self.abstract_state.params, self.state_shardings.params)

    def upgrade(self) -> OptimizerUpgrade:
        """Reads checkpoints whose optimizer state has the earlier layout (llm/train/legacy.py)."""
        return OptimizerUpgrade(self.cfg.optim, self.schedule, self.mesh)

    def init_state(self, seed: int | None = None):
        """A fresh train state, initialised directly into its shardings."""
        c = self.cfg
        seed = c.train.seed if seed is None else seed
        return state_lib.create_state(self.model, self.tx, c.data.seq_len, self.mesh, self.rules, seed,
                                      c.train.spike_window, self.store, self.state_shardings)  # fmt: skip

    def store(self, params):
        """Float parameters -> the form this run holds them in (a QLoRA base quantized)."""
        return lora_lib.quantize_base(params, self.cfg.model.lora)

    def jit_train_step(self, step_fn=step_lib.train_step):
        """(state, batch) -> (state, metrics), explicit shardings, the state donated."""
        c = self.cfg
        fn = functools.partial(step_fn, model=self.model, tx=self.tx, schedule=self.schedule,
                               grad_accum=c.train.grad_accum, spike_sigmas=c.train.spike_sigmas,
                               trainable=optim_lib.trainable_mask(c.optim, optimizer_groups(c)), z_loss=c.train.z_loss,
                               **({} if self.task.name == "lm" else {"task": self.task}))  # fmt: skip
        return sharding.jit(fn, self.mesh, self.rules, in_shardings=(self.state_shardings, self.batch_shardings),
                            out_shardings=(self.state_shardings, None), donate_argnums=0)  # fmt: skip

    def jit_eval_step(self, token_bytes, step_fn=None):
        """(params, batch) -> sums for `eval_summary`; token_bytes [<= V] is the bytes per id."""
        token_bytes = jnp.asarray(token_bytes)
        token_bytes = jnp.pad(token_bytes, (0, self.model.cfg.vocab_size - len(token_bytes)))
        fn = functools.partial(step_fn or self.task.eval_sums, model=self.model, token_bytes=token_bytes)
        return sharding.jit(
            fn, self.mesh, self.rules, in_shardings=(self.state_shardings.params, self.batch_shardings)
        )


def param_axes(model, seq_len: int):
    """The parameters' logical axis names (PartitionSpecs), from an abstract init."""
    return nn.get_partition_spec(state_lib.boxed_abstract_params(model, seq_len))


def build_trainer(cfg: RunConfig, mesh: Mesh) -> Trainer:
    """The run's model, optimizer, task and sharded abstract state (no data, nothing allocated)."""
    model = build_model(cfg)
    tx, schedule = optim_lib.make_optimizer(
        cfg.optim,
        cfg.train.steps,
        optimizer_groups(cfg),
        param_axes(model, cfg.data.seq_len) if cfg.optim.name == "muon" else None,
    )
    abstract, shardings = state_lib.state_shardings(model, tx, cfg.data.seq_len, mesh, cfg.mesh.rules,
                                                    cfg.train.spike_window)  # fmt: skip
    if cfg.model.lora.base_quant != "none":  # the state holds the base's layer kernels as int8
        target = lora_lib.quantized_target(
            state_lib.sharded_target(abstract.params, shardings.params), cfg.model.lora
        )
        abstract = abstract.replace(
            params=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
        )
        shardings = shardings.replace(params=jax.tree.map(lambda x: x.sharding, target))
    return Trainer(cfg=cfg, mesh=mesh, model=model, tx=tx, schedule=schedule, task=tasks.get(cfg.train.task, cfg),
                   abstract_state=abstract, state_shardings=shardings)  # fmt: skip
