"""The matmul ceiling of a model's own shapes: how fast XLA:CPU runs the step's matmuls alone.

    .venv/bin/python benchmarks/matmul_shapes.py                       # shakespeare and gpt12m
    .venv/bin/python benchmarks/matmul_shapes.py --configs=gpt100m

A train step's "% of matmul peak" (train_throughput.py) compares against a 2048² `jnp.dot`. This
separates the two reasons a step falls short of it: (1) its matmuls are smaller than 2048² and run
slower, (2) time outside the matmuls (elementwise work, layout copies, the gradient all-reduce).
For every weight matrix [k, n] of the block (q/k/v, out, MLP in, MLP out) and the output head, with
the step's tokens split over the project's CPU devices exactly as in training (data parallel, the
weight replicated), it times the forward x·W, the input gradient dy·Wᵀ and the per-device weight
gradient xᵀ·dy (without the all-reduce) as jitted ops, median of `--reps`, and reports each rate and
the FLOP-weighted rate over the whole step (layers counted) against the same-run 2048² peak.
Attention's T×T matmuls are not included. Writes results/matmul_shapes.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from llm import runtime  # noqa: E402

runtime.configure_cpu()  # the devices, threads and malloc setting of `python -m llm.train`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402


def matrices(shape: common.Shape) -> list[tuple[str, int, int, int]]:
    """(name, k, n, count per step) of every weight matmul of the model."""
    cfg = common.model_config(shape)
    d, f = shape.d_model, cfg.ffn_dim
    mlp_in = 2 * f if cfg.mlp == "swiglu" else f  # gate and up as one [d, 2f] matmul
    return [
        ("qkv", d, 3 * d, shape.n_layers),
        ("attn out", d, d, shape.n_layers),
        ("mlp in", d, mlp_in, shape.n_layers),
        ("mlp out", f, d, shape.n_layers),
        ("head", d, shape.vocab, 1),
    ]


def median_seconds(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return common.median(times)


def measure(shape: common.Shape, mesh: Mesh, reps: int) -> dict:
    tokens = shape.batch * shape.seq_len
    rows_sharded, replicated = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P())
    fwd = jax.jit(lambda x, w: x @ w)
    dx = jax.jit(lambda dy, w: dy @ w.T)
    dw = jax.jit(jax.shard_map(lambda x, dy: x.T @ dy, mesh=mesh, in_specs=(P("data"), P("data")),
                               out_specs=P("data")))  # fmt: skip
    rows, flops_total, seconds_total = [], 0.0, 0.0
    for name, k, n, count in matrices(shape):
        x = jax.device_put(jnp.ones((tokens, k), jnp.float32), rows_sharded)
        dy = jax.device_put(jnp.ones((tokens, n), jnp.float32), rows_sharded)
        w = jax.device_put(jnp.ones((k, n), jnp.float32), replicated)
        secs = [median_seconds(fwd, x, w, reps=reps), median_seconds(dx, dy, w, reps=reps),
                median_seconds(dw, x, dy, reps=reps)]  # fmt: skip
        flops = 2.0 * tokens * k * n
        rows.append({"name": name, "m": tokens, "k": k, "n": n, "count": count,
                     "gflops": [round(flops / s / 1e9, 1) for s in secs]})  # fmt: skip
        flops_total += 3 * flops * count
        seconds_total += sum(secs) * count
    return {"rows": rows, "weighted_gflops": flops_total / seconds_total / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="shakespeare,gpt12m", help=f"from {sorted(common.CONFIGS)}")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="matmul_shapes")
    a = ap.parse_args()
    meter = common.LoadMeter([os.getpid()])
    load_before = meter.wait_idle(0.15, 600)
    meter.start()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    square = jnp.ones((2048, 2048), jnp.float32)
    peak = 2 * 2048**3 / median_seconds(jax.jit(lambda a: a @ a), square, reps=a.reps) / 1e9
    result = {"host": common.host(), "devices": jax.device_count(), "peak_gflops": round(peak, 1),
              "load_before": load_before, "configs": {}}  # fmt: skip
    lines = [f"2048² f32 `jnp.dot` peak {peak:.0f} GFLOP/s; {jax.device_count()} CPU devices, "
             f"{result['host']['cpu']} ({result['host']['isa']}, {result['host']['cores']} cores)", "",
             "| config | matmul [m,k]×[k,n] | per step | forward | input grad | weight grad (per device) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name in a.configs.split(","):
        r = measure(common.CONFIGS[name], mesh, a.reps)
        result["configs"][name] = r
        for row in r["rows"]:
            g = row["gflops"]
            lines.append(f"| {name} | {row['name']} [{row['m']},{row['k']}]×[{row['k']},{row['n']}] | "
                         f"×{row['count']} | {g[0]:.0f} | {g[1]:.0f} | {g[2]:.0f} |")  # fmt: skip
        w = r["weighted_gflops"]
        lines.append(f"| {name} | **FLOP-weighted, whole step** | | **{w:.0f} GFLOP/s = {100 * w / peak:.0f}% "
                     "of the peak** | | |")  # fmt: skip
    lines.append(
        "\nGFLOP/s, median of the jitted op; tokens of one step split over the devices as in training."
    )
    result["load_during"] = meter.stop()  # foreign load over the whole measurement
    common.write_results(a.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
