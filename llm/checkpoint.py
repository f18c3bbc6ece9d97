"""Orbax checkpoints: parameters, optimizer state, the rest of the train state, data-iterator
state and the resolved config, each its own item; async, keep-N.

Every step directory is written under a temporary name and committed with a marker file
(`CommitFileTemporaryPath`), so a save killed mid-write never counts as a checkpoint. Restores go
through an abstract target that carries the target shardings, so a checkpoint saved on one mesh
restores on another mesh or on a single CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.path import atomicity

from llm import fs, trees
from llm.model import lora
from llm.registry import ConfigError

log = logging.getLogger(__name__)

# Items of a checkpoint step: the parameters and the optimizer state are separately restorable
# (notebooks, llm.evaluate, `train.init_from` and weight export read the parameters only).
# "train" holds the rest of the train state (step, rng, skipped, loss-spike monitor).
ITEMS = ("params", "opt_state", "train", "data", "config")
# Checkpoints written before that split (commit e9a0ace and earlier) hold the whole train state
# as one item; they restore too (`upgrade` converts an optimizer state of the earlier layout).
LEGACY_STATE = "state"
TRAIN_FIELDS = ("step", "rng", "skipped", "monitor")


def _uncompressed_handler() -> ocp.StandardCheckpointHandler:
    """A params handler writing without zstd. Compressing float weights saves little and holds a
    compressed copy of the whole tree while it writes (1.84x the parameters of peak memory for an
    imported GPT-2 vs 1.0x uncompressed; benchmarks/convert_memory.py). Readers need nothing
    special: the codec is in the array metadata. (Orbax 0.12 exposes the switch only on the
    PyTree handler that the standard one wraps.)"""
    handler = ocp.StandardCheckpointHandler()
    handler._impl = ocp.PyTreeCheckpointHandler(use_compression=False)  # noqa: SLF001
    return handler


class CheckpointCorrupt(RuntimeError):
    """A step directory exists but cannot be restored."""


class CheckpointMismatch(ConfigError):
    """A readable checkpoint whose state tree differs from the one the current config builds.

    Not damage: the files are fine, the flags changed (optimizer, loss-spike window, ...). Never
    quarantined or skipped, so a changed flag cannot make a run silently start over.
    `problems` lists the differences alone (callers word their own advice around it).
    """

    def __init__(self, message: str, problems: str = ""):
        super().__init__(message)
        self.problems = problems or message


class Checkpointer:
    """Orbax checkpoints of one run. `base` (a LoRA run with train.init_from): the checkpoints hold
    the adapters alone, and `base()` gives the frozen parameters they are combined with on restore."""

    def __init__(
        self, directory: str, keep: int = 3, async_save: bool = True, base=None, compress: bool = True,
        ocdbt: bool = True,
    ):  # fmt: skip
        self.directory = fs.absolute(directory)
        self.base = base
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            temporary_path_class=atomicity.CommitFileTemporaryPath,
        )  # fmt: skip
        # compress=False: a writer of parameters-only checkpoints (imports, merges) alone.
        handlers = (
            None if compress else {"params": _uncompressed_handler(), "config": ocp.JsonCheckpointHandler()}
        )
        if not ocdbt:  # (checkpoint.ocdbt=false) every item's handler named, each without OCDBT
            handlers = {
                k: ocp.StandardCheckpointHandler(use_ocdbt=False) for k in ("params", "opt_state", "train")
            }
            handlers.update(config=ocp.JsonCheckpointHandler(), data=grain.checkpoint.CheckpointHandler())
        self.mngr = ocp.CheckpointManager(self.directory, options=options, item_names=None if handlers else ITEMS + (LEGACY_STATE,),
                                          item_handlers=handlers)  # fmt: skip

    def steps(self) -> list[int]:
        self.mngr.reload()
        return sorted(self.mngr.all_steps())

    def _item_dir(self, step: int, item: str) -> str:
        return fs.join(self.directory, str(step), item)

    def is_legacy(self, step: int) -> bool:
        """Whether `step` was written in the single-item layout of commit e9a0ace and earlier."""
        return fs.isdir(self._item_dir(step, LEGACY_STATE)) and not fs.isdir(self._item_dir(step, "params"))

    def save(self, step: int, state, data_iter, config_json: str) -> None:
        params = lora.split(state.params)[0] if self.base else state.params  # adapters alone
        args = {
            "params": ocp.args.StandardSave(params),
            "opt_state": ocp.args.StandardSave(state.opt_state),
            "train": ocp.args.StandardSave(_train_tree(state, keep_empty=())),
            "config": ocp.args.JsonSave(json.loads(config_json)),
        }
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.mngr.save(step, args=ocp.args.Composite(**args), force=True)

    def save_params(self, step: int, params, config_json: str) -> None:
        """A parameters-only checkpoint (an imported model, llm/convert): `llm.load`,
        `llm.sample`, `llm.evaluate` and `train.init_from` read it; resuming training from it
        is refused (no optimizer state) — start a new run with init_from instead."""
        args = {"params": ocp.args.StandardSave(params), "config": ocp.args.JsonSave(json.loads(config_json))}
        self.mngr.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def restore(self, step: int, abstract_state, data_iter=None, upgrade=None):
        """(state, config dict) at `step`; data_iter (if given) is restored in place.

        `abstract_state` carries the target shardings. `upgrade` (llm/train/legacy.py) reads a
        single-item checkpoint whose optimizer state has the earlier layout.
        """
        args: dict = {"config": ocp.args.JsonRestore()}
        data_state = None
        if data_iter is not None:
            data_state = _other_process_count_data_state(self._item_dir(step, "data"))
            if data_state is None:
                args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        if self.is_legacy(step):
            return self._restore_legacy(step, abstract_state, args, data_iter, data_state, upgrade)
        if not fs.isdir(self._item_dir(step, "opt_state")) and fs.isdir(self._item_dir(step, "params")):
            raise ConfigError(f"{self.directory}/{step} holds parameters only (an imported model) and cannot be "
                              f"resumed; fine-tune it in a new run: --config.train.init_from={os.path.dirname(self.directory.rstrip('/'))} "
                              "--workdir=<new dir>")  # fmt: skip
        # Leaves are named as in the train state (params.*, opt_state.*, step, monitor.*).
        saved_params = lora.split(abstract_state.params)[0] if self.base else abstract_state.params
        check_compatible(self._item_dir(step, "params"), saved_params, step, "params")
        check_compatible(self._item_dir(step, "opt_state"), abstract_state.opt_state, step, "opt_state")
        train_keys = check_compatible(
            self._item_dir(step, "train"), _train_tree(abstract_state, keep_empty=TRAIN_FIELDS), step
        )
        # Restore into the fields the checkpoint has: an empty field (the loss-spike monitor when
        # off) is not saved; checkpoints with it saved empty restore too.
        args["params"] = ocp.args.StandardRestore(abstract_state.params)
        args["opt_state"] = ocp.args.StandardRestore(abstract_state.opt_state)
        args["train"] = ocp.args.StandardRestore(_train_tree(abstract_state, keep_empty=train_keys))
        if self.base:
            args["params"] = ocp.args.StandardRestore(lora.split(abstract_state.params)[0])
        out = self._restore_items(step, args)
        params = lora.combine(self.base(), out["params"]) if self.base else out["params"]
        state = abstract_state.replace(params=params, opt_state=out["opt_state"], **out["train"])
        _verify(state, abstract_state, step)
        if data_state is not None:
            data_iter.set_state(data_state)
        return state, out["config"]

    def _restore_items(self, step: int, args: dict) -> dict:
        try:
            return self.mngr.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # orbax raises many types for damaged directories
            raise CheckpointCorrupt(f"checkpoint {self.directory}/{step} cannot be restored: {e}") from e

    def _restore_legacy(self, step, abstract_state, args, data_iter, data_state, upgrade):
        state_dir = self._item_dir(step, LEGACY_STATE)
        target = abstract_state
        try:
            saved_keys = check_compatible(state_dir, abstract_state, step)
        except CheckpointMismatch:
            # The optimizer state of the earlier layout (per-group AdamW states): read it as such.
            if upgrade is None:
                raise
            target = upgrade.target(abstract_state)
            saved_keys = check_compatible(state_dir, target, step)
        args[LEGACY_STATE] = ocp.args.StandardRestore(_state_tree(target, keep_empty=saved_keys))
        out = self._restore_items(step, args)
        state = _from_state_tree(target, out[LEGACY_STATE])
        if target is not abstract_state:
            state = upgrade.convert(state, abstract_state)
        _verify(state, abstract_state, step)
        if data_state is not None:
            data_iter.set_state(data_state)
        return state, out["config"]

    def restore_params(self, step: int, abstract_params):
        """The parameters alone at `step`, into `abstract_params` (ShapeDtypeStructs with target
        shardings). A checkpoint of another model shape is a CheckpointMismatch naming the
        parameters that differ."""
        if self.base:
            adapters = self._restore_params(step, lora.split(abstract_params)[0])
            return lora.combine(self.base(), adapters)
        return self._restore_params(step, abstract_params)

    def restore_params_host(self, step: int, abstract_params, group_bytes: int = 16 << 20):
        """The parameters at `step` as host numpy arrays, read a group of arrays (<= `group_bytes`,
        or one larger array) at a time: memory peaks at one copy plus the group being read (a
        whole-tree restore holds ~1.5 copies while Orbax reads). For conversion/export.
        Adapter-only LoRA runs and the legacy layout go through `restore_params`."""
        if self.base or self.is_legacy(step):
            return jax.tree.map(np.asarray, self.restore_params(step, abstract_params))
        item_dir = epath.Path(self._item_dir(step, "params"))
        check_compatible(str(item_dir), abstract_params, step, "params")
        handler = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        groups, size = [[]], 0
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
            nbytes = leaf.size * leaf.dtype.itemsize
            if groups[-1] and size + nbytes > group_bytes:
                groups, size = [*groups, []], 0
            groups[-1].append(([k.key for k in path], leaf))
            size += nbytes
        out: dict = {}
        for group in groups:
            item, args = {}, {}  # the group's leaves at their paths: a partial restore reads only them
            for keys, leaf in group:
                trees.put(item, keys, leaf)
                trees.put(args, keys, ocp.RestoreArgs(restore_type=np.ndarray))
            try:
                got = handler.restore(item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                            partial_restore=True))  # fmt: skip
            except Exception as e:  # noqa: BLE001
                raise CheckpointCorrupt(f"checkpoint {self.directory}/{step} cannot be restored: {e}") from e
            for keys, _ in group:
                trees.put(out, keys, trees.at(got, keys))
        return out

    def restore_params_dropping(self, step: int, abstract_params, dropped: tuple[str, ...]):
        """The saved parameters into `abstract_params`, which lacks the top-level subtrees
        `dropped` (e.g. `lm_head` when a classifier starts from a language model)."""
        item_dir = self._item_dir(step, "params")
        check_compatible(item_dir, abstract_params, step, "params", ignore_saved=dropped)
        restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), abstract_params)
        args = ocp.args.PyTreeRestore(item=abstract_params, restore_args=restore_args, partial_restore=True)
        handler = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        try:
            return handler.restore(epath.Path(item_dir), args=args)
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorrupt(f"checkpoint {self.directory}/{step} cannot be restored: {e}") from e

    def _restore_params(self, step: int, abstract_params):
        if not self.is_legacy(step):
            check_compatible(self._item_dir(step, "params"), abstract_params, step, "params")
            return self._restore_items(step, {"params": ocp.args.StandardRestore(abstract_params)})["params"]
        state_dir = self._item_dir(step, LEGACY_STATE)
        check_compatible(state_dir, {"params": abstract_params}, step, only="params")
        target = {"params": abstract_params}
        restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)
        item = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        return self._restore_items(step, {LEGACY_STATE: item})[LEGACY_STATE]["params"]

    def restore_latest(self, abstract_state, data_iter=None, upgrade=None):
        """Newest restorable checkpoint, skipping damaged ones (reported by name); None if none."""
        for step in reversed(self.steps()):
            try:
                state, cfg = self.restore(step, abstract_state, data_iter, upgrade)
                return step, state, cfg
            except CheckpointCorrupt as e:
                log.error("%s; falling back to an older checkpoint", e)
                self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        """Rename a damaged step dir to corrupt-<step>-<n> (kept for inspection, never restored)."""
        if jax.process_index() != 0:
            return
        src = fs.join(self.directory, str(step))
        n = 0
        while fs.exists(dst := fs.join(self.directory, f"corrupt-{step}-{n}")):
            n += 1
        epath.Path(src).rename(dst)
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
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    d = epath.Path(data_dir)
    files = sorted(str(f) for f in d.glob("process_*-of-*.json")) if d.is_dir() else []
    if not files or (d / own).exists():
        return None
    states = [json.loads(epath.Path(f).read_text()) for f in files]
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


def _train_tree(state, keep_empty) -> dict:
    """The "train" item: the train state's fields other than params and opt_state."""
    tree = _state_tree(state, keep_empty)
    return {k: v for k, v in tree.items() if k in TRAIN_FIELDS}


def _from_state_tree(abstract_state, tree):
    if not dataclasses.is_dataclass(abstract_state):
        return tree
    return abstract_state.replace(**tree)  # fields left out were empty: the target's value stands


def _leaf_name(path) -> str:
    """'opt_state.1.inner_states.matrix.mu.w': the dotted name orbax stores a leaf under."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def check_compatible(state_dir: str, abstract_state, step: int, item: str | None = None,
                     only: str | None = None, ignore_saved: tuple[str, ...] = ()) -> set[str]:  # fmt: skip
    """Compare an item's saved tree metadata with the target before reading any array.

    Unreadable metadata is damage (CheckpointCorrupt: the caller falls back to an older step);
    readable metadata with other leaves/shapes/dtypes is a config change (CheckpointMismatch).
    `item` prefixes the leaf names in the message; `only` compares that top-level key alone.
    Returns the item's top-level keys.
    """
    try:
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
        meta_tree = getattr(meta, "tree", meta)
        saved = {_leaf_name(p): m for p, m in jax.tree_util.tree_leaves_with_path(meta_tree)}
    except Exception as e:  # noqa: BLE001 (missing/garbled _METADATA raises many types)
        raise CheckpointCorrupt(f"checkpoint {state_dir} has no readable metadata: {e!r}") from e
    if not saved and not jax.tree.leaves(abstract_state):
        return set()  # an item with nothing in it (an optimizer state of a fully frozen model)
    if not saved:
        raise CheckpointCorrupt(f"checkpoint {state_dir} has no arrays")
    if only is not None:
        saved = {k: m for k, m in saved.items() if k == only or k.startswith(only + ".")}
    # Saved subtrees the target drops on purpose (an LM head under a new classifier head).
    saved = {k: m for k, m in saved.items() if not any(k == x or k.startswith(x + ".") for x in ignore_saved)}
    want = {_leaf_name(p): a for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)}
    if item:
        saved = {f"{item}.{k}": m for k, m in saved.items()}
        want = {f"{item}.{k}": a for k, a in want.items()}
    # Shape/dtype differences first (they say most), then what is missing or extra, grouped.
    problems = []
    for k in sorted(set(want) & set(saved)):
        a, m = want[k], saved[k]
        if tuple(m.shape) != tuple(a.shape) or jax.numpy.dtype(m.dtype) != jax.numpy.dtype(a.dtype):
            problems.append(f"{k}: saved {tuple(m.shape)} {m.dtype}, now {tuple(a.shape)} {a.dtype}")
    for what, keys in (("missing in the checkpoint", set(want) - set(saved)),
                       ("not in the current state", set(saved) - set(want))):  # fmt: skip
        if keys:
            keys = sorted(keys)
            more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
            problems.append(f"{what}: {', '.join(keys[:4])}{more}")
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; ... ({len(problems)} differences)" if len(problems) > 6 else ""
        )
        raise CheckpointMismatch(
            f"checkpoint {os.path.dirname(state_dir)} does not match the train state this "
            f"config builds ({shown}). The optimizer, loss-spike or model flags differ from the run that "
            "saved it: re-run with its flags (config.json in the workdir) or use a new --workdir",
            problems=shown,
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


def adapters_only(cfg) -> bool:
    """A LoRA run started from another run keeps its adapters alone in its checkpoints."""
    return bool(cfg.model.lora.rank and cfg.train.init_from)


def parse_init_from(spec: str) -> tuple[str, int | None]:
    """'<run dir>[:step]' -> (run dir, step or None for the newest)."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit():
        return head, int(tail)
    return spec, None


def run_checkpointer(workdir: str, cfg, abstract_params, **kw) -> Checkpointer:
    """The Checkpointer of a run directory; for an adapters-only LoRA run, one that restores the
    frozen base from the run's `train.init_from` (the base part of `abstract_params`)."""
    base = None
    if adapters_only(cfg):
        src, step = parse_init_from(cfg.train.init_from)
        base_target = lora.split(abstract_params)[1]  # (a QLoRA base: int8 QTensors)
        float_target = lora.unquantized_target(base_target, cfg.model.param_dtype)
        base = lambda: lora.store_base(
            restore_base_params(src, step, float_target), base_target, cfg.model.lora
        )  # noqa: E731
    return Checkpointer(fs.join(workdir, "checkpoints"), base=base, **kw)


def checked_step(ckpt: Checkpointer, step: int | None, what: str, hint: str = "") -> int:
    """`step`, or the newest when None, after checking the directory has it (FileNotFoundError
    naming `what` and the steps there otherwise; `hint` follows the no-checkpoint message)."""
    steps = ckpt.steps()
    if not steps:
        raise FileNotFoundError(f"{what}: no checkpoint in {ckpt.directory}{hint}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{what}: no checkpoint for step {step}; available: {steps}")
    return step


def restore_base_params(src: str, step: int | None, base_target):
    """Parameters of run `src` (newest step if None) into `base_target` (no adapters). A LoRA
    source must be merged first (`python -m llm.convert --merge_lora`)."""
    ckpt = Checkpointer(fs.join(src, "checkpoints"), async_save=False)
    try:
        step = checked_step(ckpt, step, f"train.init_from={src}")
        saved_model = ckpt.read_config(step).get("model", {})
        if saved_model.get("lora", {}).get("rank"):
            raise ConfigError(f"train.init_from={src} is a LoRA run; merge its adapters first "
                              f"(python -m llm.convert --workdir={src} --merge_lora=<new dir>) and start from that")  # fmt: skip
        if "lm_head" not in base_target and not ckpt.is_legacy(step):
            return ckpt.restore_params_dropping(step, base_target, ("lm_head",))
        return ckpt.restore_params(step, base_target)
    finally:
        ckpt.close()
