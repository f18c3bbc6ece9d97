"""Does the data pipeline keep up? The real `llm.train` loop on real grain data vs synthetic batches.

Run (idle machine):
  .venv/bin/python benchmarks/data_pipeline.py                 # configs/shakespeare.py, 3 x 2 runs
  .venv/bin/python benchmarks/data_pipeline.py --steps=30 --runs=1   # quicker check

Each run is a fresh `python` process calling `llm.train.loop.train` (the CLI's loop: grain
iterator, to_global, the jitted step, metric logging) on configs/shakespeare.py. The synthetic
run replaces only `pipeline.train_iterator` with a grain iterator over 8 batches taken from the
real pipeline beforehand (same tokens, same step, no per-step tokenization/packing/stacking).
tokens/s is the loop's own `tokens_per_sec` metric, median over log windows after the first
(which holds the compile). Runs alternate real/synthetic; the foreign CPU load is recorded.
Writes benchmarks/results/data_pipeline.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def child(mode: str, workdir: str, overrides: list[str]) -> None:
    """One training run in this process; `mode` is 'real' or 'synthetic'."""
    from llm import runtime  # noqa: PLC0415

    runtime.configure_cpu()
    runtime.setup()
    import grain  # noqa: PLC0415

    from configs import shakespeare  # noqa: PLC0415
    from llm.config import from_config_dict  # noqa: PLC0415
    from llm.data import pipeline  # noqa: PLC0415
    from llm.train import loop  # noqa: PLC0415

    c = shakespeare.get_config()
    for item in overrides:
        key, _, value = item.partition("=")
        common.set_path(c, key, value)
    if mode == "synthetic":
        real = pipeline.train_iterator

        def synthetic_iterator(ds, threads):
            it = real(ds, threads)
            batches = [next(it) for _ in range(8)]
            return iter(grain.MapDataset.source(batches).repeat(None).to_iter_dataset())

        pipeline.train_iterator = synthetic_iterator
    loop.train(from_config_dict(c), workdir)


def run_once(mode: str, args, tokenizer: str | None) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"pipe_{mode}_")
    overrides = [
        f"train.steps={args.steps}", f"train.log_every={args.log_every}", "train.eval_every=0",
        "train.eval_batches=1", "train.progress=False", "checkpoint.every=0",
    ]  # fmt: skip
    if tokenizer:
        overrides.append(f"data.tokenizer.path={tokenizer}")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env["PYTHONPATH"] = common.ROOT + os.pathsep + env.get("PYTHONPATH", "")
    meter = common.LoadMeter([os.getpid()])
    before = meter.wait_idle(args.max_load, args.max_wait)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, f"--child={mode}", f"--workdir={workdir}", *overrides],
                            env=env, cwd=common.ROOT, stdout=subprocess.DEVNULL)  # fmt: skip
    meter.own = [os.getpid(), proc.pid]
    meter.start()
    if proc.wait():
        raise RuntimeError(f"{mode} run failed (exit {proc.returncode}); workdir {workdir}")
    during = meter.stop()
    from llm.train.metrics import read_metrics  # noqa: PLC0415

    rows = [r for r in read_metrics(workdir) if "tokens_per_sec" in r]
    windows = [r["tokens_per_sec"] for r in rows[1:]]  # the first window holds the compile
    return {
        "mode": mode, "workdir": workdir, "tokens_per_s": common.median(windows), "windows": windows,
        "wall_s": round(time.perf_counter() - t0, 1), "load_before": before, "load_during": during,
    }  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3, help="alternating real/synthetic pairs")
    ap.add_argument("--max-load", type=float, default=0.15)
    ap.add_argument("--max-wait", type=float, default=900.0)
    ap.add_argument("--child", choices=("real", "synthetic"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child:
        return child(args.child, args.workdir, rest)

    runs, tokenizer = [], None
    for i in range(args.runs):
        for mode in ("real", "synthetic") if i % 2 == 0 else ("synthetic", "real"):
            r = run_once(mode, args, tokenizer)
            # Later runs reuse the first run's tokenizer instead of training it again.
            tokenizer = tokenizer or os.path.join(r["workdir"], "tokenizer.model")
            runs.append(r)
            print(f"{mode}: {r['tokens_per_s']:,.0f} tokens/s (windows {[round(w) for w in r['windows']]}; "
                  f"foreign load during {r['load_during']['foreign_cores']:.2f} cores)", flush=True)  # fmt: skip
    med = {
        m: common.median([r["tokens_per_s"] for r in runs if r["mode"] == m]) for m in ("real", "synthetic")
    }
    result = {
        "config": "configs/shakespeare.py", "steps": args.steps, "runs": runs, "median_tokens_per_s": med,
        "real_vs_synthetic": med["real"] / med["synthetic"], "date": time.strftime("%Y-%m-%d %H:%M"),
        "max_foreign_during": max(r["load_during"]["foreign_cores"] for r in runs), "host": common.host(),
    }  # fmt: skip
    md = (
        "| data | tokens/s (median) |\n|---|---|\n"
        f"| real grain pipeline | {med['real']:,.0f} |\n| synthetic batches | {med['synthetic']:,.0f} |\n\n"
        f"real / synthetic = {result['real_vs_synthetic']:.3f} (configs/shakespeare.py, {args.steps} steps x "
        f"{args.runs} runs each; max foreign CPU load during runs {result['max_foreign_during']:.2f} cores)\n"
    )
    common.write_results("data_pipeline", result, md)


if __name__ == "__main__":
    main()
