"""Orbax checkpoints: train state + data-iterator state + resolved config, async, keep-N.

Every step directory is written under a temporary name and committed with a marker file
(`CommitFileTemporaryPath`), so a save killed mid-write never counts as a checkpoint. Restores go
through an abstract target that carries the target shardings, so a checkpoint saved on one mesh
restores on another mesh or on a single CPU.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.path import atomicity

from llm.registry import ConfigError

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "config")


class CheckpointCorrupt(RuntimeError):
    """A step directory exists but cannot be restored."""


class CheckpointMismatch(ConfigError):
    """A readable checkpoint whose state tree differs from the one the current config builds.

    Not damage: the files are fine, the flags changed (optimizer, loss-spike window, ...). Never
    quarantined or skipped, so a changed flag cannot make a run silently start over.
    """


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            temporary_path_class=atomicity.CommitFileTemporaryPath,
        )  # fmt: skip
        self.mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        self.mngr.reload()
        return sorted(self.mngr.all_steps())

    def save(self, step: int, state, data_iter, config_json: str) -> None:
        tree = _state_tree(state, keep_empty=())
        args = {"state": ocp.args.StandardSave(tree), "config": ocp.args.JsonSave(json.loads(config_json))}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.mngr.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def restore(self, step: int, abstract_state, data_iter=None):
        """(state, config dict) at `step`; data_iter (if given) is restored in place."""
        args = {"state": ocp.args.StandardRestore(abstract_state), "config": ocp.args.JsonRestore()}
        data_state = None
        if data_iter is not None:
            data_state = _other_process_count_data_state(os.path.join(self.directory, str(step), "data"))
            if data_state is None:
                args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        saved_keys = check_compatible(os.path.join(self.directory, str(step), "state"), abstract_state, step)
        # Restore into the fields the checkpoint has: an empty field (the loss-spike monitor when
        # off) is absent from checkpoints written before it existed and present in some after.
        args["state"] = ocp.args.StandardRestore(_state_tree(abstract_state, keep_empty=saved_keys))
        try:
            out = self.mngr.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # orbax raises many types for damaged directories
            raise CheckpointCorrupt(f"checkpoint {self.directory}/{step} cannot be restored: {e}") from e
        state = _from_state_tree(abstract_state, out["state"])
        _verify(state, abstract_state, step)
        if data_state is not None:
            data_iter.set_state(data_state)
        return state, out["config"]

    def restore_latest(self, abstract_state, data_iter=None):
        """Newest restorable checkpoint, skipping damaged ones (reported by name); None if none."""
        for step in reversed(self.steps()):
            try:
                state, cfg = self.restore(step, abstract_state, data_iter)
                return step, state, cfg
            except CheckpointCorrupt as e:
                log.error("%s; falling back to an older checkpoint", e)
                self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        """Rename a damaged step dir to corrupt-<step>-<n> (kept for inspection, never restored)."""
        if jax.process_index() != 0:
            return
        src = os.path.join(self.directory, str(step))
        n = 0
        while os.path.exists(dst := os.path.join(self.directory, f"corrupt-{step}-{n}")):
            n += 1
        os.rename(src, dst)
        log.error("moved the damaged checkpoint %s to %s", src, dst)
        self.mngr.reload()

    def read_config(self, step: int | None = None) -> dict:
        step = self.steps()[-1] if step is None else step
        out = self.mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return out["config"]

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def _other_process_count_data_state(data_dir: str) -> dict | None:
    """The data-iterator state of a checkpoint written by another process count; None if this
    process's own `process_i-of-n.json` is there (grain restores it) or there is none.

    grain keeps one file per process and refuses other counts, which would make a pod checkpoint
    look damaged on one host. Every process's iterator stands at the same global batch
    (pipeline.train_dataset), so their states are identical and any one fits every process.
    """
    own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    files = sorted(glob.glob(os.path.join(data_dir, "process_*-of-*.json")))
    if not files or os.path.exists(own):
        return None
    states = []
    for f in files:
        with open(f) as fh:
            states.append(json.load(fh))
    if any(s != states[0] for s in states):
        raise CheckpointCorrupt(f"{data_dir}: the data-iterator states of the {len(files)} processes that "
                                f"wrote it differ; it can only be restored with {len(files)} processes")  # fmt: skip
    return states[0]


def _state_tree(state, keep_empty) -> dict | object:
    """A dataclass train state as a dict of its fields, without empty ones (unless named in
    keep_empty): the on-disk layout stays the same when a feature adds an unused field."""
    if not dataclasses.is_dataclass(state):
        return state
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    empty = lambda v: isinstance(v, dict | list | tuple) and not v  # noqa: E731
    return {k: v for k, v in fields.items() if k in keep_empty or not empty(v)}


def _from_state_tree(abstract_state, tree):
    if not dataclasses.is_dataclass(abstract_state):
        return tree
    return abstract_state.replace(**tree)  # fields left out were empty: the target's value stands


def _leaf_name(path) -> str:
    """'opt_state.1.inner_states.matrix.mu.w': the dotted name orbax stores a leaf under."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def check_compatible(state_dir: str, abstract_state, step: int) -> set[str]:
    """Compare the saved state's tree metadata with the target before reading any array.

    Unreadable metadata is damage (CheckpointCorrupt: the caller falls back to an older step);
    readable metadata with other leaves/shapes/dtypes is a config change (CheckpointMismatch).
    """
    try:
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
        meta_tree = getattr(meta, "tree", meta)
        saved = {_leaf_name(p): m for p, m in jax.tree_util.tree_leaves_with_path(meta_tree)}
    except Exception as e:  # noqa: BLE001 (missing/garbled _METADATA raises many types)
        raise CheckpointCorrupt(f"checkpoint {state_dir} has no readable metadata: {e!r}") from e
    if not saved:
        raise CheckpointCorrupt(f"checkpoint {state_dir} has no arrays")
    want = {_leaf_name(p): a for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)}
    problems = [f"missing in the checkpoint: {k}" for k in sorted(set(want) - set(saved))]
    problems += [f"not in the current state: {k}" for k in sorted(set(saved) - set(want))]
    for k in sorted(set(want) & set(saved)):
        a, m = want[k], saved[k]
        if tuple(m.shape) != tuple(a.shape) or jax.numpy.dtype(m.dtype) != jax.numpy.dtype(a.dtype):
            problems.append(f"{k}: saved {tuple(m.shape)} {m.dtype}, now {tuple(a.shape)} {a.dtype}")
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; ... ({len(problems)} differences)" if len(problems) > 6 else ""
        )
        raise CheckpointMismatch(
            f"checkpoint step {step} in {os.path.dirname(state_dir)} does not match the train state this "
            f"config builds ({shown}). The optimizer, loss-spike or model flags differ from the run that "
            "saved it: re-run with its flags (config.json in the workdir) or use a new --workdir"
        )
    return set(meta_tree) if isinstance(meta_tree, dict) else set()


def _verify(state, abstract_state, step: int) -> None:
    """The restored tree must have the target's structure, shapes and dtypes."""
    got = jax.tree.structure(state)
    want = jax.tree.structure(abstract_state)
    if got != want:
        raise CheckpointCorrupt(f"checkpoint step {step}: restored tree structure differs from the model's")
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(abstract_state)):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise CheckpointCorrupt(
                f"checkpoint step {step}: array {a.shape} {a.dtype} where the model has {b.shape} {b.dtype}"
            )
