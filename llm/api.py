"""Notebook entry: `llm.load(workdir)` -> config, params, tokenizer and a ready model."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
from etils import epath

from llm import sharding
from llm.checkpoint import Checkpointer, checked_step, run_checkpointer
from llm.config import RunConfig, from_json
from llm.data.tokenizers import Tokenizer, load_tokenizer
from llm.model import Transformer
from llm.train.builder import build_model, params_target


@dataclasses.dataclass
class Loaded:
    config: RunConfig
    params: Any
    tokenizer: Tokenizer
    model: Transformer
    step: int

    def __repr__(self) -> str:  # the default would print every parameter array
        m = self.config.model
        n = sum(int(x.size) for x in jax.tree.leaves(self.params))
        kinds = m.attention.pattern or (m.attention.kind,)
        return (f"Loaded(step={self.step}, params={n:,}, d_model={m.d_model}, n_layers={m.n_layers}, "
                f"attention={'/'.join(kinds)}, ffn={m.ffn.kind}, head={m.head}, tokenizer={self.tokenizer.kind} "
                f"({self.tokenizer.vocab_size} ids))")  # fmt: skip

    def generate(self, prompt: str | list[str], **kw) -> str | list[str]:
        """Continuation(s) of a prompt or a batch of prompts; see llm.infer.generation.generate."""
        from llm.infer.generation import generate  # noqa: PLC0415

        return generate(self.model, self.params, self.tokenizer, prompt, **kw)


def load(workdir: str, step: int | None = None, mesh=None, host: bool = False) -> Loaded:
    """Restore a run's checkpoint onto this process's devices (one device unless `mesh` is given).

    Parameters are resharded on restore, so a checkpoint written on a pod loads in a notebook.
    `host=True`: the parameters as numpy arrays read one at a time (memory: one copy plus one
    array; what conversion uses).
    """
    if not epath.Path(workdir, "checkpoints").is_dir():  # (Orbax would create it: load only reads)
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints; train first (or check the path)")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    step = checked_step(ckpt, step, f"{workdir}", hint="; train first")
    cfg = from_json(json.dumps(ckpt.read_config(step)))
    ckpt.close()
    if mesh is None:
        mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
    model = build_model(cfg)
    # Parameters only: the optimizer state is neither built nor read (an adapters-only LoRA
    # checkpoint is combined with its base, read from the run's train.init_from).
    target = params_target(cfg, mesh, model)
    ckpt = run_checkpointer(workdir, cfg, target, async_save=False)
    params = ckpt.restore_params_host(step, target) if host else ckpt.restore_params(step, target)
    ckpt.close()
    return Loaded(config=cfg, params=params, tokenizer=load_tokenizer(workdir), model=model, step=step)
