"""The host loop: builds data, model and state, then trains with eval, logging and checkpoints.

It owns everything impure (files, signals, the progress bar); the compiled work is the pure
`train_step` / `eval_step` from step.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from llm import flops, fs, sharding
from llm.checkpoint import (
    Checkpointer,
    CheckpointMismatch,
    checked_step,
    parse_init_from,
    restore_base_params,
    run_checkpointer,
)
from llm.config import ConfigError, RunConfig, from_dict
from llm.data import pipeline, sources
from llm.data.prepared import Mixture
from llm.data.tokenizers import META_FILE as TOKENIZER_META
from llm.data.tokenizers import Tokenizer, build_tokenizer, is_tokenizer_file, save_tokenizer
from llm.model import ModelConfig
from llm.model import lora as lora_lib
from llm.train import history
from llm.train import state as state_lib
from llm.train.builder import Trainer, build_trainer
from llm.train.metrics import MetricWriter
from llm.train.profiling import StepProfiler
from llm.train.step import eval_step, eval_summary, train_step
from llm.train.workdir_lock import WorkdirLock

log = logging.getLogger(__name__)

EXIT_SIGTERM = 128 + signal.SIGTERM  # 143: preempted, checkpoint saved; re-run to resume
EXIT_SIGINT = 128 + signal.SIGINT  # 130: Ctrl-C, checkpoint saved
EXIT_NONFINITE = 3  # non-finite loss with train.nan_policy=stop; last good state saved
EXIT_CHECKPOINT_FAILED = 4  # a checkpoint could not be written; earlier ones are intact


def resolve_vocab(model: ModelConfig, tok: Tokenizer) -> ModelConfig:
    """Fill model.vocab_size from the tokenizer (rounded up to 64), or check it is big enough."""
    if model.vocab_size is None:
        return model.replace(vocab_size=64 * math.ceil(tok.vocab_size / 64))
    if model.vocab_size < tok.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
            f"{tok.vocab_size} ids; unset model.vocab_size or raise it"
        )
    return model


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built once from a RunConfig (also handy in notebooks): the data
    and tokenizer here, model/optimizer/shardings in `trainer` (llm/train/builder.py)."""

    cfg: RunConfig
    workdir: str
    tokenizer: Tokenizer
    train_windows: pipeline.PackedWindows
    eval_windows: pipeline.PackedWindows
    trainer: Trainer
    # name -> held-out windows evaluated on their own as well (a data.mixture's datasets)
    eval_sets: dict = dataclasses.field(default_factory=dict)

    mesh = property(lambda self: self.trainer.mesh)
    rules = property(lambda self: self.trainer.rules)
    model = property(lambda self: self.trainer.model)
    tx = property(lambda self: self.trainer.tx)
    schedule = property(lambda self: self.trainer.schedule)
    abstract_state = property(lambda self: self.trainer.abstract_state)
    state_shardings = property(lambda self: self.trainer.state_shardings)
    batch_shardings = property(lambda self: self.trainer.batch_shardings)


def build(cfg: RunConfig, workdir: str, devices=None) -> Experiment:
    """Validate against the devices, read and tokenize the corpus, build model and optimizer.

    `devices` (default: all) lets tests and notebooks build the same run on a subset of devices.
    """
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.rules
    dp = sharding.data_parallel_size(mesh, rules)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % dp:
        raise ConfigError(
            f"micro-batch train.batch_size/train.grad_accum = {micro} is not divisible by the "
            f"data-parallel size {dp} (mesh {dict(mesh.shape)}); make the batch a multiple of {dp}"
        )
    if cfg.train.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size must divide over {jax.process_count()} processes")

    source = sources.source_for(cfg.data)

    def corpus_texts():  # read the corpus only when a tokenizer is trained on it
        yield from source.documents()[0]

    if jax.process_index() == 0:
        if cfg.train.init_from:
            copy_tokenizer(parse_init_from(cfg.train.init_from)[0], workdir)
        elif hasattr(source, "copy_tokenizer") and not fs.exists(fs.join(workdir, TOKENIZER_META)):
            source.copy_tokenizer(workdir)  # prepared data comes with the tokenizer of its ids
        save_tokenizer(build_tokenizer(cfg.data.tokenizer, workdir, corpus_texts()), workdir)
    if jax.process_count() > 1:
        # Other processes read the tokenizer only after process 0 has written it (reading during the
        # write could see half a file); without a shared workdir they train the same one themselves.
        multihost_utils.sync_global_devices("llm.build: tokenizer saved")
    if jax.process_index() != 0 and hasattr(source, "copy_tokenizer") and not cfg.train.init_from:
        if not fs.exists(fs.join(workdir, TOKENIZER_META)):
            source.copy_tokenizer(workdir)
    tok = build_tokenizer(cfg.data.tokenizer, workdir, corpus_texts())
    if hasattr(source, "check_tokenizer"):
        source.check_tokenizer(tok, workdir)
    model_cfg = resolve_vocab(cfg.model, tok)
    cfg = dataclasses.replace(cfg, model=model_cfg)

    train_w, eval_w = source.windows(tok)
    return Experiment(cfg=cfg, workdir=workdir, tokenizer=tok, train_windows=train_w, eval_windows=eval_w,
                      trainer=build_trainer(cfg, mesh), eval_sets=getattr(source, "eval_sets", {}))  # fmt: skip


def to_global(exp: Experiment, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays, each field sharded by its logical axes."""
    shardings = exp.batch_shardings
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local_batch.items()}


def compile_steps(exp: Experiment):
    """Jitted train and eval steps with explicit shardings; the train state is donated.

    (The step functions are looked up here, in this module, so tests can substitute them.)"""
    lm = exp.trainer.task.name == "lm"
    return exp.trainer.jit_train_step(train_step), exp.trainer.jit_eval_step(
        exp.tokenizer.token_bytes, eval_step if lm else None
    )


def evaluate(exp: Experiment, eval_fn, params) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte over the eval split (or its first N batches);
    with named eval sets (a data.mixture) also `eval_<name>_loss` / `_ppl` / `_bpb` per set."""
    t = exp.cfg.train

    def run(windows):
        batches = pipeline.eval_batches(windows, t.eval_batch_size or t.batch_size, jax.process_index(),
                                        jax.process_count(), t.eval_batches)  # fmt: skip
        return (eval_fn(params, to_global(exp, local)) for local in batches)

    if exp.trainer.task.name != "lm":  # the task's own metrics (classification: accuracy, F1, ...)
        s = exp.trainer.task.summary(run(exp.eval_windows))
        return {f"eval_{k}": v for k, v in s.items() if not isinstance(v, list)}
    out = {}
    for prefix, windows in [
        ("eval", exp.eval_windows),
        *((f"eval_{n}", w) for n, w in exp.eval_sets.items()),
    ]:
        s = eval_summary(run(windows))
        out.update({f"{prefix}_loss": s["loss"], f"{prefix}_ppl": s["perplexity"],
                    f"{prefix}_bpb": s["bits_per_byte"], f"{prefix}_tokens": s["tokens"]})  # fmt: skip
    return out


def eval_line(row: dict, final: bool = False) -> str:
    """The console summary of an eval row: loss (perplexity) and bits per byte, or loss and
    accuracy / macro F1."""
    if "eval_bpb" in row:
        ppl = f" | perplexity {row['eval_ppl']:.2f}" if final else ""
        return f"loss {row['eval_loss']:.4f}{ppl} | bits per byte {row['eval_bpb']:.4f}"
    shown = ("eval_accuracy", "eval_macro_f1", "eval_preference_accuracy", "eval_reward_margin")
    extra = " | ".join(f"{k[5:]} {row[k]:.4f}" for k in shown if k in row)
    return f"loss {row['eval_loss']:.4f}" + (f" | {extra}" if extra else "")


def _say(bar, is_main: bool, msg: str) -> None:
    """A console line from process 0 that does not break the progress bar."""
    if bar is not None:
        bar.write(msg)
    elif is_main:
        print(msg, flush=True)


class _Signals:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}
        # With several processes a per-process flag could stop them at different steps (one in a
        # collective save, one in a train step: a hang). There JAX's preemption notifier owns
        # SIGTERM and `reached_preemption(step)` makes every process stop at the same step.
        sigs = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else ()
        for sig in sigs:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook kernels)
                pass

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts at once
        self.received = signum

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _save(ckpt: Checkpointer, step: int, state, data_it, cfg: RunConfig, wait: bool = False) -> bool:
    """Save (async) and report a failed write (disk full, read-only) instead of crashing."""
    try:
        ckpt.save(step, state, data_it, cfg.to_json())
        if wait:
            ckpt.wait()
        return True
    except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many types for I/O errors)
        try:
            ckpt.wait()  # let earlier async saves commit before listing them
        except Exception:  # noqa: BLE001
            pass
        kept = [s for s in ckpt.steps() if s != step]
        print(f"error: writing the checkpoint for step {step} in {ckpt.directory} failed: {e!r}. "
              f"Earlier checkpoints are intact ({kept or 'none'}); free space or fix permissions and "
              f"re-run the same command to resume.", flush=True)  # fmt: skip
        return False


def check_same_model(saved: dict, cfg: RunConfig, directory: str) -> None:
    """A checkpoint from another model shape is refused with the differing fields."""
    cur = json.loads(cfg.to_json())["model"]
    old = _normalised_model(saved.get("model", {}))
    diff = sorted(k for k in set(cur) | set(old) if cur.get(k) != old.get(k)
                  and k not in ("dtype", "remat", "scan_layers", "dropout"))  # fmt: skip
    # scan_layers changes the params tree layout, so it does matter for restoring:
    if cur.get("scan_layers") != old.get("scan_layers"):
        diff.append("scan_layers")
    if diff:
        raise ConfigError(
            f"the checkpoint in {directory} was trained with a different model: "
            + ", ".join(f"model.{k}={old.get(k)!r} (now {cur.get(k)!r})" for k in diff)
            + "; use a new --workdir or the original flags"
        )


def _normalised_model(saved_model: dict) -> dict:
    """A saved model config with today's defaults for the fields added since it was written."""
    try:
        return json.loads(json.dumps(dataclasses.asdict(from_dict(ModelConfig, saved_model))))
    except ConfigError:
        return saved_model


def copy_tokenizer(src_workdir: str, workdir: str) -> None:
    """A new run initialised from another's parameters must read text as that run did: its
    tokenizer files are copied in (unless this workdir already has its own, e.g. on resume)."""
    if fs.exists(fs.join(workdir, TOKENIZER_META)):
        return
    if not fs.exists(fs.join(src_workdir, TOKENIZER_META)):
        raise FileNotFoundError(
            f"train.init_from={src_workdir}: no tokenizer there (expected {TOKENIZER_META})"
        )
    fs.makedirs(workdir)
    for f in epath.Path(src_workdir).iterdir():
        if is_tokenizer_file(f.name):
            fs.copy_tree(str(f), fs.join(workdir, f.name))


def init_params_from(spec: str, trainer: Trainer, fresh=None):
    """Parameters of another run (`train.init_from`), restored straight into this run's shardings.
    A LoRA run (model.lora.rank > 0) takes its base from there and keeps `fresh`'s adapters."""
    src, step = parse_init_from(spec)
    ckpt = Checkpointer(fs.join(src, "checkpoints"), async_save=False)
    try:
        step = checked_step(ckpt, step, f"train.init_from={spec}")
    finally:
        ckpt.close()
    adapters, base_target = lora_lib.split(trainer.params_target())
    if adapters:  # LoRA adapters or a new task head: the base from `src`, the rest fresh
        try:
            base = restore_base_params(
                src, step, lora_lib.unquantized_target(base_target, trainer.model.cfg.param_dtype)
            )
        except CheckpointMismatch as e:
            raise ConfigError(
                f"train.init_from={spec}: its parameters do not fit this model's base ({e.problems})"
            ) from e
        base = lora_lib.store_base(base, base_target, trainer.cfg.model.lora)  # a QLoRA base: int8
        return lora_lib.combine(base, lora_lib.split(fresh)[0] if fresh is not None else adapters), step
    ckpt = Checkpointer(fs.join(src, "checkpoints"), async_save=False)
    try:
        try:
            params = ckpt.restore_params(step, trainer.params_target())
        except CheckpointMismatch as e:
            raise ConfigError(
                f"train.init_from={spec}: its parameters do not fit this model ({e.problems}); "
                f"start from a run of the same model shape (see its config.json)"
            ) from e
    finally:
        ckpt.close()
    log.info("initialised the parameters from %s step %d", src, step)
    return params, step


def train(cfg: RunConfig, workdir: str, stop_at: int | None = None) -> dict[str, Any]:
    """Train (or resume) in `workdir`. Returns the final metrics; exits 143/130 on signals.

    `stop_at` ends this invocation early at that step (with a checkpoint), as an interruption
    would; calling again resumes. The schedule still follows cfg.train.steps.
    """
    fs.makedirs(workdir)
    if jax.process_index() != 0 or fs.is_remote(workdir):
        # Process 0 only: hosts may not share a lockable filesystem; an object store has no locks.
        return _train(cfg, workdir, stop_at)
    with WorkdirLock(workdir):
        return _train(cfg, workdir, stop_at)


def _train(cfg: RunConfig, workdir: str, stop_at: int | None) -> dict[str, Any]:
    exp = build(cfg, workdir)
    cfg = exp.cfg
    is_main = jax.process_index() == 0
    task = exp.trainer.task
    if hasattr(task, "prepare"):
        # E.g. DPO's reference log-probabilities from the starting parameters (train.init_from),
        # fresh run or resume alike; before the data iterator exists, which may read ahead.
        ref, _ = init_params_from(cfg.train.init_from, exp.trainer, exp.trainer.init_state().params)
        for examples in (exp.train_windows, exp.eval_windows):
            task.prepare(examples, ref, exp.model, cfg.train.eval_batch_size or cfg.train.batch_size)
        del ref
    abstract = exp.trainer.restore_target()
    ckpt = run_checkpointer(workdir, cfg, abstract.params, keep=cfg.checkpoint.keep,
                            async_save=cfg.checkpoint.async_save, ocdbt=cfg.checkpoint.ocdbt)  # fmt: skip
    data_ds = pipeline.train_dataset(exp.train_windows, cfg.train.batch_size, cfg.data.seed,
                                     jax.process_index(), jax.process_count(),
                                     shift_windows=cfg.data.shift_windows)  # fmt: skip
    data_it = pipeline.train_iterator(data_ds, cfg.data.worker_threads)
    schedule_change = {}
    if ckpt.steps():
        saved_cfg = ckpt.read_config()
        check_same_model(saved_cfg, cfg, ckpt.directory)
        schedule_change = history.check_same_schedule(saved_cfg, cfg, ckpt.directory)
    restored = ckpt.restore_latest(abstract, data_it, upgrade=exp.trainer.upgrade())
    if restored is None:
        state = exp.trainer.init_state()
        start = 0
        if cfg.train.init_from:
            params, src_step = init_params_from(cfg.train.init_from, exp.trainer, state.params)
            state = state.replace(params=params)
            if is_main:
                print(f"initialised the parameters from {cfg.train.init_from} (step {src_step}); "
                      f"fresh optimizer state", flush=True)  # fmt: skip
    else:
        start, state, _ = restored
        log.info("resumed from checkpoint step %d", start)
    if is_main:  # only now: a refused resume must not overwrite the record of the run it refused
        fs.write_text(fs.join(workdir, "config.json"), cfg.to_json())
        history.append(workdir, history.start_record(start, schedule_change))
    n_params = state_lib.count_params(state.params)
    train_fn, eval_fn = compile_steps(exp)
    writer = MetricWriter(workdir)
    signals = _Signals()
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    throughput = flops.Throughput(cfg.model, cfg.data.seq_len, exp.mesh.devices.flat, cfg.train.peak_tflops)
    if is_main:
        print(f"model: {n_params:,} parameters | mesh {dict(exp.mesh.shape)} | vocab "
              f"{cfg.model.vocab_size} | {len(exp.train_windows)} train windows of {cfg.data.seq_len} "
              f"tokens | {'resuming at step ' + str(start) if start else 'from scratch'}", flush=True)  # fmt: skip
        bf16 = "bfloat16" in (cfg.model.dtype, cfg.model.matmul_dtype)
        if bf16 and jax.default_backend() == "cpu" and not history.native_bf16():
            print(f"warning: bf16 matmuls on a CPU without AVX512-BF16/AMX ({history.cpu_isa()}): emulated, "
                  "usually slower than fp32 (train in fp32: model.dtype=float32, model.matmul_dtype unset)",
                  flush=True)  # fmt: skip

    bar = None
    if is_main and cfg.train.progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True)
    pending: list[dict] = []
    mixture = exp.train_windows if isinstance(exp.train_windows, Mixture) else None
    mix_counts = np.zeros(len(mixture.names), np.int64) if mixture else None
    t_window, steps_window = time.perf_counter(), 0
    last_saved, step, exit_code, result = start, start, 0, {}
    t_loop, eval_seconds, train_seconds, finished = time.perf_counter(), 0.0, None, False
    # Trace from the step after the one that compiles, so the profile shows steady-state steps.
    profiler = StepProfiler(workdir, start + 1, cfg.train.profile_steps)
    try:
        end = min(cfg.train.steps, stop_at or cfg.train.steps)
        while step < end:
            profiler.before_step(step, state)
            local = next(data_it)
            if mix_counts is not None:  # the datasets of this global batch's rows (not a model input)
                mix_counts += np.bincount(local.pop(pipeline.MIXTURE_FIELD), minlength=len(mix_counts))
            batch = to_global(exp, local)
            state, metrics = train_fn(state, batch)
            step += 1
            profiler.after_step(step, state)
            steps_window += 1
            pending.append(metrics)
            if bar is not None:
                bar.update(1)
            # An evaluation step always logs too, so eval_every need not be a multiple of log_every.
            eval_due = (
                bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0 and step != cfg.train.steps
            )
            logged = step % cfg.train.log_every == 0 or step == end or eval_due
            if logged:
                host = jax.device_get(pending)
                pending = []
                dt = time.perf_counter() - t_window
                row = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                row["nonfinite"] = float(sum(m["nonfinite"] for m in host))
                row["tokens_per_sec"] = tokens_per_step * steps_window / dt
                row.update(throughput.metrics(row["tokens_per_sec"]))  # tflops_per_device, mfu
                row["skipped_total"] = int(jax.device_get(state.skipped))
                if mixture:  # realised share of each dataset in the rows trained on since this launch
                    row.update(
                        {f"mix_{n}": float(c / mix_counts.sum()) for n, c in zip(mixture.names, mix_counts)}
                    )
                if state.monitor:
                    row["loss_spike"] = float(sum(m["loss_spike"] for m in host))
                    row["spikes_total"] = int(jax.device_get(state.monitor["spikes"]))
                t_window, steps_window = time.perf_counter(), 0
                if eval_due:
                    t_eval = time.perf_counter()
                    row.update(evaluate(exp, eval_fn, state.params))
                    t_window = time.perf_counter()  # keep eval time out of tokens/s
                    eval_seconds += t_window - t_eval
                    _say(bar, is_main, f"step {step}: eval {eval_line(row)}")
                writer.write(step, row)
                if row.get("loss_spike"):
                    _say(bar, is_main, f"step {step}: skipped {row['loss_spike']:.0f} loss-spike update(s) in the "
                         f"last {cfg.train.log_every} steps (threshold {row['spike_threshold']:.3f}; "
                         f"{row['spikes_total']} so far)")  # fmt: skip
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}")
                if row["nonfinite"] and cfg.train.nan_policy == "stop":
                    msg = (f"non-finite loss/gradients at step {step} (train.nan_policy=stop); the "
                           f"update was not applied and the last good state is saved at step {step}")  # fmt: skip
                    log.error(msg)
                    print(msg, flush=True)
                    exit_code = EXIT_NONFINITE
                    break
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < end:
                if not _save(ckpt, step, state, data_it, cfg):
                    exit_code = EXIT_CHECKPOINT_FAILED
                    break
                last_saved = step
            if signals.received is not None or ckpt.mngr.reached_preemption(step):
                exit_code = EXIT_SIGINT if signals.received == signal.SIGINT else EXIT_SIGTERM
                print(f"signal received: saving a checkpoint at step {step} and exiting "
                      f"(exit code {exit_code}); run the same command to resume", flush=True)  # fmt: skip
                break
        if exit_code != EXIT_CHECKPOINT_FAILED and (step != last_saved or not ckpt.steps()):
            if not _save(ckpt, step, state, data_it, cfg, wait=True):
                exit_code = EXIT_CHECKPOINT_FAILED
        train_seconds = time.perf_counter() - t_loop - eval_seconds  # (the final save included)
        if exit_code == 0 and step == cfg.train.steps:
            result = evaluate(exp, eval_fn, state.params)
            result.update(step=step, n_params=n_params)
            writer.write(step, result)
            if is_main:
                print(f"final eval at step {step}: {eval_line(result, final=True)}", flush=True)
        finished = True
    finally:
        profiler.stop()
        if bar is not None:
            bar.close()
        signals.restore()
        writer.close()
        try:
            ckpt.close()
        except Exception as e:  # a failed async write surfaces here; earlier checkpoints are intact
            print(f"error: checkpoint write failed: {e}", flush=True)
            exit_code = exit_code or EXIT_CHECKPOINT_FAILED
        if is_main:  # (an exception on its way out: recorded as such)
            seconds = (
                train_seconds if train_seconds is not None else time.perf_counter() - t_loop - eval_seconds
            )
            history.append(workdir, {"event": "end", "time": time.time(), "step": step,
                                     "exit_code": exit_code if finished else "exception",
                                     "train_seconds": round(seconds, 3)})  # fmt: skip
    if exit_code:
        raise SystemExit(exit_code)
    return result
