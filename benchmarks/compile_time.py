"""First-step compile time of the default config, cold and from the persistent compilation cache.

Run:  .venv/bin/python benchmarks/compile_time.py

Two fresh processes share one new, empty cache directory (llm.runtime.setup(cache_dir=...), which
sets `jax_compilation_cache_dir` as `llm.train` does): the first compiles the train and eval steps
of configs/shakespeare.py and writes the cache, the second loads them from it. Each reports
the first train step's wall time (trace + compile or cache load + one step), a second step's, their
difference (the compile), and the first eval call (trace + compile + one batch).
Writes benchmarks/results/compile_time.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def child(cache_dir: str) -> None:
    t_start = time.perf_counter()
    from llm import runtime  # noqa: PLC0415

    runtime.configure_cpu()
    runtime.setup(cache_dir)
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from benchmarks.train_throughput import synthetic_batch  # noqa: PLC0415
    from configs import shakespeare  # noqa: PLC0415
    from llm.config import from_config_dict  # noqa: PLC0415
    from llm.train import loop  # noqa: PLC0415
    from llm.train import state as state_lib  # noqa: PLC0415

    c = shakespeare.get_config()
    # Same program as the default run (its tokenizer has 2048 ids), without training a tokenizer.
    c.model.vocab_size = c.data.tokenizer.vocab_size
    c.data.tokenizer.kind = "byte"
    cfg = from_config_dict(c)
    exp = loop.build(cfg, tempfile.mkdtemp(prefix="compile_"))
    state = state_lib.create_state(exp.model, exp.tx, cfg.data.seq_len, exp.mesh, exp.rules, 0)
    train_fn, eval_fn = loop.compile_steps(exp)
    shape = common.Shape(cfg.model.d_model, cfg.model.n_layers, cfg.model.attention.n_heads, cfg.data.seq_len,
                         cfg.model.vocab_size, cfg.train.batch_size, 1)  # fmt: skip
    batch = loop.to_global(exp, synthetic_batch(np.random.default_rng(0), shape))
    t0 = time.perf_counter()
    state, _ = train_fn(state, batch)  # traces, compiles (or loads from the cache) and runs one step
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    state, _ = train_fn(state, batch)
    jax.block_until_ready(state)
    t2 = time.perf_counter()
    jax.block_until_ready(eval_fn(state.params, batch))
    t3 = time.perf_counter()
    n_files = sum(len(files) for _, _, files in os.walk(cache_dir))
    print(json.dumps({
        "first_step_s": round(t1 - t0, 2), "step_s": round(t2 - t1, 2),
        "compile_s": round((t1 - t0) - (t2 - t1), 2), "first_eval_s": round(t3 - t2, 2),
        "process_s": round(t3 - t_start, 2), "cache_files": n_files,
    }))  # fmt: skip


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2])
    cache = tempfile.mkdtemp(prefix="llm_jax_cache_")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env["PYTHONPATH"] = common.ROOT + os.pathsep + env.get("PYTHONPATH", "")
    meter = common.LoadMeter([os.getpid()])
    runs = {}
    for label in ("cold", "cached"):
        load = meter.wait_idle(0.15, 600)
        out = subprocess.run([sys.executable, __file__, "--child", cache], env=env, cwd=common.ROOT,
                             capture_output=True, text=True, check=True)  # fmt: skip
        runs[label] = json.loads(out.stdout.strip().splitlines()[-1]) | {"load_before": load}
        print(label, runs[label], flush=True)
    md = (
        "| configs/shakespeare.py | first train step s | later step s | compile s (difference) | "
        "first eval call s |\n|---|---|---|---|---|\n"
        + "".join(
            f"| {k} | {r['first_step_s']} | {r['step_s']} | {r['compile_s']} | {r['first_eval_s']} |\n"
            for k, r in runs.items()
        )  # fmt: skip
        + f"\nCache entries written by the cold run: {runs['cold']['cache_files']} "
        f"(jax_compilation_cache_dir set by llm.runtime.setup()).\n"
    )
    common.write_results("compile_time", runs | {"host": common.host()}, md)


if __name__ == "__main__":
    main()
