"""Ablation sweeps: a grid of config overrides, one run (and one workdir) per point.

  python -m launch.sweep --config=configs/tiny.py --workdir=runs/sweep \\
      --sweep='model.positional=[learned,rope,alibi]' --sweep='model.attention.n_kv_heads=[1,2,4]' \\
      [--set train.steps=100 ...] [--dry_run] [--emit=local|pod]
  python -m launch.sweep --sweep_file=configs/sweeps/positional_heads.py --workdir=runs/sweep

Each point of the grid trains in <workdir>/<name>, the name built from its overrides
(`positional=rope,n_kv_heads=2`), with <run>/overrides.json recording the config, the overrides
and the exact command. `--emit=local` (default) runs the grid here one run after another
(`python -m llm.train` per run, output in <run>/train.log); re-running resumes unfinished runs and
skips finished ones. `--emit=pod` prints one Cloud TPU pod command per run instead.
Compare the runs afterwards with `python -m llm.compare <workdir>`.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES_FILE = "overrides.json"
RESULT_FILE = "sweep_result.json"
# Sweep runs log to a file: tqdm's carriage returns would garble it.
DEFAULT_SET = {"train.progress": "false"}
# One command per run for a Cloud TPU VM pod: every worker runs the same llm.train command and
# they join one jax.distributed job (train.distributed=true). The workdir should be a gs:// path.
POD_TEMPLATE = "gcloud compute tpus tpu-vm ssh {tpu} --zone={zone} --worker=all --command={remote}"


@dataclass(frozen=True)
class Run:
    """One point of the grid: its name, overrides (flag path -> value string) and workdir."""

    name: str
    overrides: dict[str, str]
    workdir: str
    set: dict[str, str] = field(default_factory=dict)

    def train_args(self, config: str) -> list[str]:
        flags = {**self.set, **self.overrides}
        return [f"--config={config}", f"--workdir={self.workdir}",
                *(f"--config.{k}={v}" for k, v in flags.items())]  # fmt: skip


def parse_value(text: str):
    """A flag string as the Python value it stands for (for overrides.json): 2, 0.1, True, 'rope'."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_axis(spec: str) -> tuple[str, list[str]]:
    """'model.positional=[learned,rope]' (brackets optional) -> ('model.positional', ['learned', 'rope'])."""
    key, sep, values = spec.partition("=")
    key, values = key.strip().removeprefix("--").removeprefix("config."), values.strip()
    if not sep or not key or not values:
        raise ValueError(
            f"bad --sweep {spec!r}; expected key=[v1,v2,...], e.g. model.positional=[learned,rope]"
        )
    if values.startswith("[") != values.endswith("]"):
        raise ValueError(f"bad --sweep {spec!r}: unbalanced brackets")
    items = [v.strip() for v in values.strip("[]").split(",")]
    if not all(items):
        raise ValueError(f"bad --sweep {spec!r}: empty value in the list")
    if len(set(items)) != len(items):
        raise ValueError(f"bad --sweep {spec!r}: repeated value")
    return key, items


def parse_set(spec: str) -> tuple[str, str]:
    key, sep, value = spec.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep or not key:
        raise ValueError(f"bad --set {spec!r}; expected key=value, e.g. train.steps=100")
    return key, value.strip()


def run_name(overrides: dict[str, str]) -> str:
    """`positional=rope,n_kv_heads=2`: the last key component unless two keys share it."""
    leaves = [k.split(".")[-1] for k in overrides]
    parts = []
    for (k, v), leaf in zip(overrides.items(), leaves):
        key = leaf if leaves.count(leaf) == 1 else k
        parts.append(f"{key}={re.sub(r'[^A-Za-z0-9_.+-]', '_', v)}")
    return ",".join(parts) or "base"


def expand(axes: dict[str, list[str]], root: str, fixed: dict[str, str] | None = None,
           arms: dict[str, dict[str, str]] | None = None) -> list[Run]:  # fmt: skip
    """The Cartesian product of the axes, in order (the last axis varies fastest); with named
    `arms` (each a set of overrides, e.g. dense vs MoE variants) the product arms x axes, runs
    named `arm=<name>,<axes>`."""
    fixed = {**DEFAULT_SET, **(fixed or {})}
    arms = arms or {"": {}}
    arm_keys = {k for ov in arms.values() for k in ov}
    clash = sorted((set(axes) | arm_keys) & set(fixed) - set(DEFAULT_SET))
    if clash:
        raise ValueError(f"{clash} are both swept and --set; drop one")
    clash = sorted(set(axes) & arm_keys)
    if clash:
        raise ValueError(f"{clash} are set twice, by an arm and by an axis; drop one")
    runs = []
    for arm, arm_ov in arms.items():
        for combo in itertools.product(*axes.values()):
            ov = {**arm_ov, **dict(zip(axes, combo))}
            name = ",".join(filter(None, [f"arm={arm}" if arm else "", run_name(dict(zip(axes, combo)))]))
            name = name.replace(",base", "") if arm else name
            runs.append(
                Run(name, ov, os.path.join(root, name), {k: v for k, v in fixed.items() if k not in ov})
            )
    return runs


def load_sweep_file(path: str) -> dict:
    """A sweep file defines get_sweep() -> {'config': str, 'axes': {key: [values]}, 'set': {key: value},
    'arms': {name: {key: value}}} (arms optional: named variants crossed with the axes)."""
    spec = importlib.util.spec_from_file_location("_sweep_file", path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"sweep file {path!r} not found")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sweep = mod.get_sweep()
    unknown = set(sweep) - {"config", "axes", "set", "arms"}
    if unknown:
        raise ValueError(
            f"{path}: get_sweep() has unknown keys {sorted(unknown)}; use config, axes, set, arms"
        )
    flag = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
    return {
        "config": sweep.get("config"),
        "arms": {a: {k: flag(v) for k, v in ov.items()} for a, ov in sweep.get("arms", {}).items()} or None,
        "axes": {
            k: [str(v).lower() if isinstance(v, bool) else str(v) for v in vs]
            for k, vs in sweep.get("axes", {}).items()
        },
        "set": {
            k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in sweep.get("set", {}).items()
        },
    }


def train_command(run: Run, config: str, python: str = sys.executable) -> list[str]:
    return [python, "-m", "llm.train", *run.train_args(config)]


def pod_command(run: Run, config: str, tpu: str, zone: str, repo_dir: str) -> str:
    args = [*run.train_args(config), "--config.train.distributed=true"]
    remote = f"cd {repo_dir} && python -m llm.train {shlex.join(args)}"
    return POD_TEMPLATE.format(tpu=tpu, zone=zone, remote=shlex.quote(remote))


def is_finished(run: Run) -> bool:
    """A previous sweep finished this run (exit 0 recorded for the same overrides)."""
    try:
        with open(os.path.join(run.workdir, RESULT_FILE)) as f:
            res = json.load(f)
        with open(os.path.join(run.workdir, OVERRIDES_FILE)) as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return res.get("returncode") == 0 and rec.get("flags") == {**run.set, **run.overrides}


def write_record(run: Run, config: str, cmd: list[str]) -> None:
    os.makedirs(run.workdir, exist_ok=True)
    rec = {
        "name": run.name,
        "config": config,
        "overrides": {k: parse_value(v) for k, v in run.overrides.items()},
        "set": {k: parse_value(v) for k, v in run.set.items()},
        "flags": {**run.set, **run.overrides},
        "command": shlex.join(cmd),
    }
    with open(os.path.join(run.workdir, OVERRIDES_FILE), "w") as f:
        json.dump(rec, f, indent=2)


def write_result(run: Run, returncode: int, wall_s: float) -> None:
    with open(os.path.join(run.workdir, RESULT_FILE), "w") as f:
        json.dump({"returncode": returncode, "wall_s": wall_s, "finished": time.time()}, f)


def run_local(runs: list[Run], config: str, out=None, env: dict | None = None) -> dict[str, int]:
    """Train each run in turn (a subprocess each); returns name -> exit code. Failures don't stop the grid."""
    out = out or sys.stdout
    env = dict(os.environ if env is None else env)
    # `python -m llm.train` must import this checkout from any working directory.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    codes: dict[str, int] = {}
    for i, run in enumerate(runs, 1):
        if is_finished(run):
            print(f"[sweep {i}/{len(runs)}] {run.name}: already finished, skipped", file=out, flush=True)
            codes[run.name] = 0
            continue
        cmd = train_command(run, config)
        write_record(run, config, cmd)
        print(f"[sweep {i}/{len(runs)}] {run.name}: {shlex.join(cmd[1:])}", file=out, flush=True)
        t0 = time.time()
        with open(os.path.join(run.workdir, "train.log"), "a") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                log.write(line)
                print(f"[{run.name}] {line}", end="", file=out, flush=True)
            code = proc.wait()
        wall = time.time() - t0
        write_result(run, code, wall)
        codes[run.name] = code
        status = "ok" if code == 0 else f"FAILED (exit {code}, log {run.workdir}/train.log)"
        print(f"[sweep {i}/{len(runs)}] {run.name}: {status} in {wall:.1f}s", file=out, flush=True)
    return codes


def invalid_runs(runs: list[Run], config: str) -> list[tuple[str, str]]:
    """(name, one-line reason) for every grid point whose config llm.train would refuse: unknown
    keys, bad values, shapes that do not divide (checked in this process, before anything runs)."""
    from llm import cli  # noqa: PLC0415

    bad = []
    for run in runs:
        try:
            cli.build_config(config, {**run.set, **run.overrides})
        except Exception as e:  # noqa: BLE001 (ml_collections, absl and the config raise many types)
            bad.append((run.name, cli.explain_flag_error(e, [])))
    return bad


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", help="config file[:arg] (default: the sweep file's, else configs/tiny.py)")
    p.add_argument("--workdir", required=True, help="sweep root; each run trains in <workdir>/<name>")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=[V1,V2]", help="one axis of the grid")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every run"
    )
    p.add_argument(
        "--sweep_file", help="a file defining get_sweep() (e.g. configs/sweeps/positional_heads.py)"
    )
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--emit", choices=("local", "pod"), default="local",
                   help="local: run here one after another; pod: print Cloud TPU pod commands")  # fmt: skip
    p.add_argument("--tpu", default="$TPU_NAME", help="--emit=pod: TPU VM name")
    p.add_argument("--zone", default="$ZONE", help="--emit=pod: TPU zone")
    p.add_argument("--repo_dir", default="~/llm", help="--emit=pod: checkout path on the TPU VMs")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        base = (
            load_sweep_file(a.sweep_file)
            if a.sweep_file
            else {"config": None, "axes": {}, "set": {}, "arms": None}
        )
        axes = dict(base["axes"])
        axes.update(parse_axis(s) for s in a.sweep)
        fixed = dict(base["set"])
        fixed.update(parse_set(s) for s in a.set)
        config = a.config or base["config"] or "configs/tiny.py"
        if not axes and not base["arms"]:
            raise ValueError("nothing to sweep: give --sweep key=[v1,v2,...] or --sweep_file")
        root = a.workdir if a.emit == "pod" or "://" in a.workdir else os.path.abspath(a.workdir)
        runs = expand(axes, root, fixed, base["arms"])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = invalid_runs(runs, config)
    if bad:  # nothing is launched (nor printed as a command) unless every point builds
        for name, msg in bad:
            print(f"error: grid point {name}: {msg}", file=sys.stderr)
        print(f"error: {len(bad)} of {len(runs)} grid points are invalid; nothing launched", file=sys.stderr)
        return 2
    dims = ([f"arms[{len(base['arms'])}]"] if base["arms"] else []) + [
        f"{k}[{len(v)}]" for k, v in axes.items()
    ]
    print(f"sweep: {len(runs)} runs of {config} in {a.workdir} ({' x '.join(dims)})", flush=True)
    if a.emit == "pod":
        for run in runs:
            print(pod_command(run, config, a.tpu, a.zone, a.repo_dir))
        return 0
    if a.dry_run:
        for run in runs:
            print(shlex.join(train_command(run, config, python="python")))
        return 0
    codes = run_local(runs, config)
    failed = {n: c for n, c in codes.items() if c}
    print(f"sweep done: {len(runs) - len(failed)}/{len(runs)} runs ok"
          + (f"; failed: {', '.join(f'{n} (exit {c})' for n, c in failed.items())}" if failed else "")
          + (f"\ncompare:  python -m llm.compare {a.workdir}" if len(failed) < len(runs) else ""),
          flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
