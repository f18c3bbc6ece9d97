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


def uncommitted(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        p = os.path.join(ckpt_dir, name)
        if (
            os.path.isdir(p)
            and not os.path.exists(os.path.join(p, "commit_success.txt"))
            and "corrupt" not in name
        ):
            out.append(name)
    return out


def final_params(workdir: str):
    sys.path.insert(0, ROOT)
    import jax  # noqa: PLC0415

    import llm  # noqa: PLC0415

    run = llm.load(workdir)
    return run.step, [np.asarray(x) for x in jax.tree.leaves(run.params)]


def soak_one(workdir: str, rng: random.Random, max_kills: int = 6) -> dict:
    kills, mid_save, resumed_from = 0, 0, []
    while True:
        proc = subprocess.Popen(command(workdir), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        if kills < max_kills:
            time.sleep(rng.uniform(2.0, 9.0))  # start-up is ~3-5 s; training ~1-3 s
        if proc.poll() is None and kills < max_kills:
            pending = uncommitted(os.path.join(workdir, "checkpoints"))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            mid_save += bool(pending)
            continue
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"run failed after {kills} kills:\n{out}")
        for line in out.splitlines():
            if "resuming at step" in line:
                resumed_from.append(int(line.rsplit("resuming at step", 1)[1].split()[0]))
        return {"kills": kills, "kills_mid_save": mid_save, "final_resumed_from": resumed_from}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="kill9-")
    ref_dir = os.path.join(tmp, "reference")
    subprocess.run(command(ref_dir), cwd=ROOT, env=env(), check=True, capture_output=True)
    ref_step, ref = final_params(ref_dir)
    results = []
    for i in range(args.runs):
        wd = os.path.join(tmp, f"run{i}")
        r = soak_one(wd, rng)
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
        "all_equal_to_uninterrupted": all(r["equal_to_uninterrupted"] for r in results),
        "results": results,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    shutil.rmtree(tmp, ignore_errors=True)
    if not summary["all_equal_to_uninterrupted"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
