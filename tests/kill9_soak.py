"""Kill -9 soak: interrupt short training runs at random moments and check every restart.

    .venv/bin/python tests/kill9_soak.py --runs=20 --out=benchmarks/results/kill9.json

Each run trains configs/tiny.py for STEPS steps with a checkpoint every 2 steps. It is killed
with SIGKILL at a random moment, restarted with the same command, killed again, ... until it
finishes. Then its final parameters must equal (bitwise) those of one uninterrupted run, and every
restart must have resumed from a committed checkpoint. Kills that landed while a checkpoint was
being written are counted (a step directory without its commit marker at the moment of the kill).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24


def command(workdir: str) -> list[str]:
    return [sys.executable, "-m", "llm.train", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.train.steps={STEPS}", "--config.checkpoint.every=2", "--config.checkpoint.keep=2",
            "--config.train.eval_every=0", "--config.train.log_every=1", "--config.train.progress=false"]  # fmt: skip


def env() -> dict:
    e = dict(os.environ, JAX_PLATFORMS="cpu", LLM_CPU_DEVICES="1")
    return e


def step_dirs(ckpt_dir: str) -> tuple[list[int], list[str]]:
    """(committed steps, uncommitted step directories) in a checkpoint directory right now."""
    if not os.path.isdir(ckpt_dir):
        return [], []
    committed, pending = [], []
    for name in os.listdir(ckpt_dir):
        p = os.path.join(ckpt_dir, name)
        if not os.path.isdir(p) or "corrupt" in name:
            continue
        if os.path.exists(os.path.join(p, "commit_success.txt")):
            if name.isdigit():
                committed.append(int(name))
        else:
            pending.append(name)
    return sorted(committed), pending


def resumed_step(output: str) -> int | None:
    """The step a process reported starting from (0 = from scratch); None if it was killed
    before it got that far (then it never trained and its start cannot be checked)."""
    for line in output.splitlines():
        if "resuming at step" in line:
            return int(line.rsplit("resuming at step", 1)[1].split()[0])
        if line.startswith("model:") and "from scratch" in line:
            return 0
    return None


def final_params(workdir: str):
    sys.path.insert(0, ROOT)
    import jax  # noqa: PLC0415

    import llm  # noqa: PLC0415

    run = llm.load(workdir)
    return run.step, [np.asarray(x) for x in jax.tree.leaves(run.params)]


def soak_one(workdir: str, rng: random.Random, run_s: float, max_kills: int = 4) -> dict:
    """Kill one run at random moments until it finishes; check every restart's starting point.

    The first kill lands uniformly within the uninterrupted run's wall time `run_s` (start-up
    included), so every run is interrupted at least once unless it finishes early; each later
    restart is killed again with probability 1/2, within the same window.
    """
    ckpt_dir = os.path.join(workdir, "checkpoints")
    kills, mid_save, restarts = 0, 0, []
    expect_from: list[int] | None = None  # committed steps when the last kill landed
    while True:
        proc = subprocess.Popen(command(workdir), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        kill = kills < max_kills and (kills == 0 or rng.random() < 0.5)
        killed = False
        if kill:
            deadline = time.time() + rng.uniform(0.5, run_s)
            while time.time() < deadline and proc.poll() is None:
                time.sleep(0.01)
            if proc.poll() is None:
                committed, pending = step_dirs(ckpt_dir)
                proc.send_signal(signal.SIGKILL)
                killed = True
        out, _ = proc.communicate()
        start = resumed_step(out)
        if expect_from is not None and start is not None:
            # A restart must begin at the newest checkpoint that was committed when the previous
            # process was killed (or one committed in the instant between listing and the kill).
            ok = start >= (expect_from[-1] if expect_from else 0)
            restarts.append({"resumed_from": start, "committed_at_kill": expect_from, "ok": ok})
        if killed:
            kills += 1
            mid_save += bool(pending)
            expect_from = committed
            continue
        if proc.returncode != 0:
            raise RuntimeError(f"run failed after {kills} kills:\n{out}")
        return {"kills": kills, "kills_mid_save": mid_save, "restarts": restarts,
                "restarts_ok": all(r["ok"] for r in restarts)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="kill9-")
    ref_dir = os.path.join(tmp, "reference")
    t0 = time.time()
    subprocess.run(command(ref_dir), cwd=ROOT, env=env(), check=True, capture_output=True)
    run_s = time.time() - t0
    print(f"uninterrupted run: {run_s:.1f} s wall", flush=True)
    ref_step, ref = final_params(ref_dir)
    results = []
    for i in range(args.runs):
        wd = os.path.join(tmp, f"run{i}")
        r = soak_one(wd, rng, run_s)
        step, params = final_params(wd)
        r["equal_to_uninterrupted"] = step == ref_step and all(
            np.array_equal(a, b) for a, b in zip(params, ref)
        )
        results.append(r)
        print(json.dumps({"run": i, **r}), flush=True)
        shutil.rmtree(wd, ignore_errors=True)
    summary = {
        "runs": args.runs,
        "total_kills": sum(r["kills"] for r in results),
        "kills_mid_save": sum(r["kills_mid_save"] for r in results),
        "runs_killed_at_least_once": sum(r["kills"] > 0 for r in results),
        "restarts_checked": sum(len(r["restarts"]) for r in results),
        "all_restarts_from_newest_committed": all(r["restarts_ok"] for r in results),
        "all_equal_to_uninterrupted": all(r["equal_to_uninterrupted"] for r in results),
        "results": results,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    shutil.rmtree(tmp, ignore_errors=True)
    if not (summary["all_equal_to_uninterrupted"] and summary["all_restarts_from_newest_committed"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
