"""The run record: `<workdir>/runs.jsonl`, one line appended per start or resume and one per end.

A start line says what ran and where: the step it started from, the command line, the git commit
of the code (and whether the work tree had uncommitted changes), library versions, the host (CPU
vector ISA, accelerator kind and count, processes) and, on a resume that changed the learning-rate
schedule (`train.allow_schedule_change`), what changed. An end line gives the last step, the exit
code and the seconds spent training. Nothing is ever rewritten: `config.json` is the current
config, `runs.jsonl` how the run got there.

`check_same_schedule` refuses a resume that would silently bend the schedule (another
train.steps, lr, warmup, schedule, optimizer or batch): the loss curve would no longer be one run.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
import subprocess
import sys
import time

from etils import epath

from llm.registry import ConfigError

HISTORY_FILE = "runs.jsonl"
# What shapes the learning-rate schedule and the meaning of a step.
SCHEDULE_FIELDS = (
    "train.steps", "train.batch_size", "optim.name", "optim.schedule", "optim.lr", "optim.warmup_steps",
    "optim.min_lr_ratio", "optim.wsd.decay_fraction", "optim.wsd.decay_shape",
)  # fmt: skip


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def schedule_changes(saved: dict, cfg) -> dict[str, list]:
    """{field: [checkpoint's value, now]} for the schedule-defining fields that differ; fields the
    saved config predates are judged by today's defaults (which they were trained with)."""
    from llm.config import RunConfig  # noqa: PLC0415

    now, default = json.loads(cfg.to_json()), json.loads(RunConfig().to_json())
    out = {}
    for f in SCHEDULE_FIELDS:
        old = _get(saved, f)
        old = _get(default, f) if old is None else old
        if old != _get(now, f):
            out[f] = [old, _get(now, f)]
    return out


def check_same_schedule(saved: dict, cfg, directory: str) -> dict[str, list]:
    """The changes (allowed by train.allow_schedule_change), or a ConfigError naming them."""
    changes = schedule_changes(saved, cfg)
    if changes and not cfg.train.allow_schedule_change:
        listed = ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in changes.items())
        raise ConfigError(f"resuming {directory} would change its learning-rate schedule: {listed}; use the "
                          f"original flags, a new --workdir (train.init_from=<this run> starts from its "
                          f"weights), or --config.train.allow_schedule_change=true to change it mid-run "
                          f"(recorded in {HISTORY_FILE})")  # fmt: skip
    return changes


@functools.lru_cache(maxsize=1)
def git_state() -> dict | None:
    """The commit of the code that runs and whether tracked files differ from it (None: not a checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def _cpu_flags() -> list[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return None


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it XLA and
    PyTorch emulate bf16 matmuls, slower than fp32 (torch.mm bf16 ran at ~0.3 GFLOP/s on an
    AVX2-only host), so nothing here picks bf16 there by default."""
    flags = _cpu_flags() or []
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_isa() -> str:
    flags = _cpu_flags()
    if flags is None:
        return platform.machine()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    return (
        isa + (" + AVX512-BF16" if "avx512_bf16" in flags else "") + (" + AMX" if "amx_bf16" in flags else "")
    )


def versions() -> dict[str, str]:
    import importlib.metadata as md  # noqa: PLC0415

    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def start_record(start_step: int, schedule_change: dict | None = None) -> dict:
    import jax  # noqa: PLC0415

    rec = {
        "event": "resume" if start_step else "start", "time": time.time(), "step": start_step,
        "argv": list(sys.argv), "git": git_state(), "versions": versions(),
        "host": {"hostname": socket.gethostname(), "cpu_isa": cpu_isa(), "cpus": os.cpu_count(),
                 "platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                 "devices": jax.device_count(), "processes": jax.process_count()},
    }  # fmt: skip
    if schedule_change:
        rec["schedule_change"] = schedule_change
    return rec


def append(workdir: str, record: dict) -> None:
    """One JSON line appended (read-append-write through etils.epath: object stores cannot append)."""
    path = epath.Path(workdir) / HISTORY_FILE
    old = path.read_text() if path.exists() else ""
    path.write_text(old + json.dumps(record) + "\n")


def read(workdir: str) -> list[dict]:
    path = epath.Path(workdir) / HISTORY_FILE
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def training_seconds(workdir: str) -> float | None:
    """Seconds spent training over every launch (the end records), None if none ended."""
    ends = [r["train_seconds"] for r in read(workdir) if r.get("event") == "end"]
    return sum(ends) if ends else None
