"""Tiny cached runs for notebooks and examples, so they work anywhere without a prepared checkpoint.

`tiny_run(overrides)` trains configs/tiny.py (seconds on a CPU) once per set of overrides into
$LLM_DEMO_CACHE (default ~/.cache/llm/demo) and returns the workdir; later calls reuse it.
`tiny_sweep(axes)` does the same for a small sweep through launch.sweep (one process per run).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DONE = "demo_done.json"
WAIT_S = 600  # how long to wait for another process that is training the same demo run
# Long enough for visible structure (held-out loss ~2.6 nats vs 4.2 after tiny.py's 30 steps,
# attention heads that specialise), still seconds of compute: compilation dominates.
DEMO_DEFAULTS = {"train.steps": 150, "train.eval_every": 50, "train.log_every": 10, "checkpoint.every": 0,
                 "optim.lr": 3e-3, "optim.warmup_steps": 20}  # fmt: skip


def cache_dir() -> str:
    return os.environ.get("LLM_DEMO_CACHE", os.path.expanduser("~/.cache/llm/demo"))


def _slug(d: dict, hashed: dict | None = None) -> str:
    """A readable, unique directory name: the overrides, then a hash of everything that matters."""
    text = json.dumps(d if hashed is None else hashed, sort_keys=True)
    readable = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in sorted(d.items()))[:60] or "default"
    return f"{readable}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def tiny_config(overrides: dict | None = None, arg: str | None = None):
    """configs/tiny.py[:arg] with `{"model.positional": "rope", ...}` applied, as a RunConfig."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from configs import tiny  # noqa: PLC0415
    from llm.config import from_config_dict  # noqa: PLC0415

    c = tiny.get_config(arg)
    c.train.progress = False
    for path, value in (overrides or {}).items():
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_config_dict(c)


def tiny_run(overrides: dict | None = None, arg: str | None = None, quiet: bool = True) -> str:
    """Workdir of a finished tiny run (DEMO_DEFAULTS + overrides); trains it in this process if needed."""
    overrides = {**DEMO_DEFAULTS, **(overrides or {})}
    key = dict(overrides, **({"_arg": arg} if arg else {}))
    workdir = os.path.join(
        cache_dir(), "runs", _slug({k: v for k, v in key.items() if k not in DEMO_DEFAULTS}, key)
    )
    if os.path.exists(os.path.join(workdir, DONE)):
        return workdir
    from llm.registry import ConfigError  # noqa: PLC0415
    from llm.train.loop import train  # noqa: PLC0415

    cfg = tiny_config(overrides, arg)
    print(f"training a tiny demo run into {workdir} (once; cached) ...", flush=True)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
            result = train(cfg, workdir)
    except ConfigError as e:
        if "another run" not in str(e):
            raise
        # Another notebook is training this very run (the workdir lock): wait for it instead.
        print("another process is training it; waiting ...", flush=True)
        deadline = time.time() + WAIT_S
        while not os.path.exists(os.path.join(workdir, DONE)):
            if time.time() > deadline:
                raise
            time.sleep(1.0)
        return workdir
    with open(os.path.join(workdir, DONE), "w") as f:
        json.dump({"overrides": key, "result": result}, f)
    print(
        f"done: held-out loss {result['eval_loss']:.3f}, bits per byte {result['eval_bpb']:.3f}", flush=True
    )
    return workdir


def tiny_sweep(axes: dict[str, list], fixed: dict | None = None, in_process: bool = True) -> str:
    """Root of a finished sweep of configs/tiny.py over `axes`, laid out as launch.sweep does; cached.

    in_process=True trains the runs in this process (no interpreter start-up per run: faster for
    a notebook); False runs `python -m llm.train` per run exactly as the sweep CLI does.
    """
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from launch import sweep  # noqa: PLC0415

    fixed = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (fixed or {}).items()}
    axes_s = {k: [str(v).lower() if isinstance(v, bool) else str(v) for v in vs] for k, vs in axes.items()}
    root = os.path.join(
        cache_dir(), "sweeps", _slug({**{k: ",".join(v) for k, v in axes_s.items()}, **fixed})
    )
    runs = [r for r in sweep.expand(axes_s, root, fixed) if not sweep.is_finished(r)]
    config = os.path.join(ROOT, "configs", "tiny.py")
    if runs:
        print(f"running a {len(runs)}-run demo sweep into {root} (once; cached) ...", flush=True)
    if not in_process:
        codes = sweep.run_local(runs, config, out=io.StringIO())
        if any(codes.values()):
            raise RuntimeError(f"demo sweep failed: {codes}; see the train.log files under {root}")
        return root
    from llm.train.loop import train  # noqa: PLC0415

    for run in runs:
        sweep.write_record(run, config, sweep.train_command(run, config))
        flags = {k: sweep.parse_value(v) for k, v in {**run.set, **run.overrides}.items()}
        t0 = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            train(tiny_config(flags), run.workdir)
        sweep.write_result(run, 0, time.time() - t0)
    return root
