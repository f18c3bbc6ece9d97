"""Where one train step's time goes, op by op, measured on ONE thread so every op's time is its own.

In a normal 2-core trace the ops of both CPU devices share one 2-thread pool: an op's duration then
includes the time its sub-tasks waited behind the other device's work (the same attention matmul
read 40 GF/s there and 227 GF/s standalone), so per-op times cannot be compared or summed. This
script re-executes itself with one CPU device, a one-thread pool (PJRT_NPROC=1) and affinity to one
core; then the trace is a plain sequence and the per-op times add up to the step.

It traces `--steps` steps of the step `llm.train` builds (synthetic batches, as step_ab.py), joins
each trace op to the compiled HLO (its shapes, FLOPs and the model code it came from) and prints:
time per category (dense matmuls, the attention core's matmuls, layout copies, elementwise work by
origin, other), the slowest ops, each matmul's GFLOP/s against the one-core peak, and any dot XLA
left outside YNNPACK (those run on the slow fallback kernel: there should be none).

  .venv/bin/python benchmarks/step_breakdown.py                  # the default model
  .venv/bin/python benchmarks/step_breakdown.py --config=gpt12m --set model.attention.query_block=0
  .venv/bin/python benchmarks/step_breakdown.py --variant=patch:ab_patches:rope_direct_sine

Writes results/step_breakdown_<config>.json (and .md). Needs an idle core.
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import sys
import tempfile
import time

_CHILD = "LLM_STEP_BREAKDOWN_CHILD"


def _reexec_single_threaded() -> None:
    """Run this script again with one device, one pool thread, one core (before JAX is imported)."""
    env = dict(os.environ, PJRT_NPROC="1", LLM_CPU_DEVICES="1", JAX_PLATFORMS="cpu", **{_CHILD: "1"})
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


if os.environ.get(_CHILD) != "1":
    _reexec_single_threaded()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llm import runtime  # noqa: E402

runtime.configure_cpu()

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.profiler import ProfileData  # noqa: E402

_OP = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([a-z][\w-]*)\((.*)")
_DOT = re.compile(r"= f32\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\).*?lhs_contracting_dims=\{([\d,]*)\}")


def parse_hlo(text: str) -> dict[str, dict]:
    """Per top-level op name: shape, kind, model-code origin (op_name), FLOPs of the dots it holds."""
    bodies = {m.group(1): m.group(0) for m in re.finditer(r"^%([\w.\-]+) \(.*?\n}", text, re.S | re.M)}
    ops, comp = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            comp = line.split(" ")[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = _OP.match(line)
        if not m or (comp or "").startswith("fused_computation"):
            continue
        origin = re.search(r'op_name="([^"]*)"', line)
        called = re.search(r"calls=%([\w.\-]+)", line)
        body = bodies.get(called.group(1), "") if called else line
        ops[m.group(1)] = {"shape": m.group(2), "opcode": m.group(3), "origin": origin.group(1) if origin else "",
                           "flops": _dot_flops(body), "unfused_dot": m.group(3) == "dot"}  # fmt: skip
    return ops


def _dot_flops(body: str) -> int:
    flops = 0
    for d in _DOT.finditer(body):
        out = [int(x) for x in d.group(1).split(",") if x]
        lhs = re.search(r"%" + re.escape(d.group(2)) + r" = f32\[([\d,]*)\]", body)
        if lhs is None:
            continue
        dims = [int(x) for x in lhs.group(1).split(",") if x]
        k = math.prod(dims[int(i)] for i in d.group(4).split(",") if i)
        flops += 2 * math.prod(out) * k
    return flops


def category(name: str, op: dict) -> str:
    o = op["origin"]
    if op["flops"]:
        return "attention core matmuls" if re.search(r"/attn/(bk|reduce_sum)", o) else "dense matmuls"
    if name.startswith("ynn_fusion"):
        return "reductions (YNNPACK)"
    if any(k in name for k in ("copy", "transpose")):
        return "layout copies / transposes"
    where = ("attention" if "/attn/" in o else "mlp" if "/mlp/" in o else "norms" if "norm" in o
             else "loss / embedding / optimizer")  # fmt: skip
    return f"elementwise: {where}"


def one_core_peak() -> float:
    """GFLOP/s of a 2048^2 f32 jnp.dot on this one thread (best of 10)."""
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(f, a) for _ in range(10))
    return 2 * 2048**3 / best / 1e9


def _timed(f, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="shakespeare", choices=sorted(common.CONFIGS))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--steps", type=int, default=5, help="traced steps")
    ap.add_argument("--top", type=int, default=15, help="slowest ops to list")
    ap.add_argument("--out", default=None, help="results file stem (default step_breakdown_<config>)")
    ap.add_argument(
        "--variant", default="base", help="a step_ab.py variant (set:k=v, opt:k=v, patch:module:function)"
    )
    args = ap.parse_args()
    runtime.setup()
    jax.config.update("jax_enable_compilation_cache", False)
    import step_ab  # noqa: PLC0415  (builds the step as llm.train does, warmed up)

    sets, options = step_ab.parse(args.variant)
    run = step_ab.build(args.config, {**dict(kv.split("=", 1) for kv in args.set), **sets}, options)
    fn, state, batch, shape = run["fn"], run["state"], run["batches"][0], common.CONFIGS[args.config]
    ops = parse_hlo(fn.as_text())
    trace_dir = tempfile.mkdtemp(prefix="step_breakdown_trace_")
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0
    jax.profiler.start_trace(trace_dir, profiler_options=opts)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, _ = fn(state, batch)
    jax.block_until_ready(state)
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    jax.profiler.stop_trace()
    ms, calls = collections.Counter(), collections.Counter()
    for plane in ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]).planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in ops:
                    ms[ev.name] += ev.duration_ns / 1e6 / args.steps
                    calls[ev.name] += 1
    peak = one_core_peak()
    per_cat, flops_cat = collections.Counter(), collections.Counter()
    for name, t in ms.items():
        per_cat[category(name, ops[name])] += t
        flops_cat[category(name, ops[name])] += ops[name]["flops"] * calls[name] / args.steps
    total = sum(per_cat.values())
    model_gflop = common.train_flops_per_token(shape) * shape.batch * shape.seq_len / 1e9
    lines = [
        f"# One train step of `{args.config}` on one thread ({common.host()['cpu']}, {common.host()['isa']})",
        "",
        f"{args.steps} traced steps, {wall_ms:.0f} ms per step ({shape.batch * shape.seq_len / wall_ms * 1e3:,.0f} "
        f"tokens/s on one core); ops sum to {total:.0f} ms. One-core 2048² f32 matmul peak: {peak:.0f} GFLOP/s; "
        f"the step's model FLOPs ({model_gflop:.1f} GFLOP, the benchmarks' count) run at "
        f"{model_gflop / wall_ms * 1e3:.0f} GFLOP/s = **{model_gflop / wall_ms * 1e3 / peak:.0%} of that peak**.",
        "",
        "| where | ms per step | share | GFLOP/s of its matmuls |",
        "|---|---|---|---|",
    ]
    for cat, t in per_cat.most_common():
        rate = f"{flops_cat[cat] / t / 1e6:.0f}" if flops_cat[cat] else ""
        lines.append(f"| {cat} | {t:.1f} | {t / total:.0%} | {rate} |")
    lines += [
        "",
        f"Slowest {args.top} ops:",
        "",
        "| op | ms per step | GFLOP/s | shape | model code |",
        "|---|---|---|---|---|",
    ]
    for name, t in ms.most_common(args.top):
        op = ops[name]
        rate = f"{op['flops'] * calls[name] / args.steps / t / 1e6:.0f}" if op["flops"] else ""
        lines.append(f"| {name} | {t:.2f} | {rate} | `{op['shape']}` | `{op['origin'][-70:]}` |")
    unfused = [n for n, op in ops.items() if op["unfused_dot"]]
    lines += ["", f"Dots outside YNNPACK (slow fallback kernel): {', '.join(unfused) if unfused else 'none'}"]
    md = "\n".join(lines) + "\n"
    common.write_results(
        args.out or f"step_breakdown_{args.config}",
        {"config": args.config, "host": common.host(), "sets": args.set, "variant": args.variant, "steps": args.steps, "wall_ms": wall_ms,
         "one_core_peak_gflops": peak, "model_gflop_per_step": model_gflop, "ms_per_category": dict(per_cat),
         "unfused_dots": unfused, "date": time.strftime("%Y-%m-%d %H:%M"),
         "ops": [{"name": n, "ms": round(t, 3), "category": category(n, ops[n]), "shape": ops[n]["shape"],
                  "gflop": ops[n]["flops"] * calls[n] / args.steps / 1e9, "origin": ops[n]["origin"]}
                 for n, t in ms.most_common()]},
        md,
    )  # fmt: skip


if __name__ == "__main__":
    main()
