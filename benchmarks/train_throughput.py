"""Training throughput: the project's jitted train step vs an identical PyTorch model, interleaved.

Run (idle machine):
  .venv/bin/python benchmarks/train_throughput.py --precision=fp32
  .venv/bin/python benchmarks/train_throughput.py --precision=bf16
  .venv/bin/python benchmarks/train_throughput.py --quick              # seconds: checks it works
Options: --configs=gpt12m,shakespeare,gpt100m --repeats=5 --variant 'NAME:SETTINGS' (extra JAX
variants to compare, e.g. 'dev1:devices=1', 'nokeep:keepmem=0', 'einsum:model.attention.impl=einsum'
or 'old:repo=/path/to/another/checkout' for a commit A/B; see --help). --no-torch-keepmem skips timing
PyTorch with the project's malloc setting (llm/hostmem.py); --no-torch-compile skips the
torch.compile (inductor) column; --no-torch skips PyTorch altogether. Each config has a layout
(benchmarks/common.py): gpt12m and gpt100m are GPT-2 style, shakespeare is the default recipe's
llama layout; both sides build the same one.

Each framework runs in its own worker process: the JAX one builds the step exactly as `llm.train`
does (configs/shakespeare.py with the model shape overridden -> llm.train.loop.build ->
state.create_state -> loop.compile_steps, fed through loop.to_global), with the project's CPU
runtime defaults (llm.runtime.configure_cpu). After compile and warm-up, timed blocks of a few
steps alternate between frameworks (order flipped every repeat); before each block the parent
waits until no foreign process uses the CPU, and records the foreign load it saw before and
during the block. Writes benchmarks/results/train_throughput_<precision>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from llm.train.history import cpu_isa, native_bf16  # noqa: E402

SCRIPT = os.path.abspath(__file__)
# A CPU benchmark: skip probing for TPU/GPU runtimes that may be installed but absent.
WORKER_ENV = {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}


# ---- JAX worker (the project's code path) -----------------------------------------------------------


def jax_worker(config: str, precision: str, settings: str, cache: bool) -> None:
    opts = parse_settings(settings)
    if "repo" in opts:  # A/B across commits: import llm/ and configs/ from another checkout
        sys.path.insert(0, os.path.abspath(opts.pop("repo")))
    if "devices" in opts:
        os.environ["LLM_CPU_DEVICES"] = opts.pop("devices")
    if "keepmem" in opts:  # A/B of llm/hostmem.py: keepmem=0 runs with glibc's default malloc settings
        os.environ["LLM_KEEP_FREED_MEMORY"] = opts.pop("keepmem")
    if "xla" in opts:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + opts.pop("xla")).strip()
    for key in [k for k in opts if k.startswith("env.")]:  # any environment variable, e.g. env.PJRT_NPROC=3
        os.environ[key[4:]] = opts.pop(key)
    from llm import runtime  # noqa: PLC0415

    runtime.configure_cpu()  # the project's CPU defaults, as the CLI applies them
    if opts.pop("dots", "on") == "off":  # A/B: plain lax.dot_general instead of llm/model/dots.py
        from llm.model import dots  # noqa: PLC0415

        dots._on_cpu = lambda: False
    if opts.pop("attn_dots", "on") == "off":  # A/B: attention einsums as plain jnp.einsum (autodiff VJP)
        import jax.numpy as jnp  # noqa: PLC0415

        from llm.model import dots  # noqa: PLC0415

        def plain(spec, a, b, out_dtype=None):
            out_dtype = jnp.dtype(out_dtype or a.dtype)
            pref = jnp.float32 if out_dtype == jnp.float32 else None
            return jnp.einsum(spec, a, b, preferred_element_type=pref).astype(out_dtype)

        dots.einsum = plain
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    runtime.setup()
    if not cache:  # time a real compile, not a persistent-cache hit
        jax.config.update("jax_enable_compilation_cache", False)
    from llm.config import from_config_dict  # noqa: PLC0415
    from llm.train import loop  # noqa: PLC0415
    from llm.train import state as state_lib  # noqa: PLC0415

    shape = common.CONFIGS[config]
    c = common.step_config(config, precision)
    for key, value in opts.items():
        common.set_path(c, key, value)
    cfg = from_config_dict(c)
    ctx = {}

    def setup():
        t0 = time.perf_counter()
        exp = loop.build(cfg, tempfile.mkdtemp(prefix="bench_"))
        state = state_lib.create_state(exp.model, exp.tx, shape.seq_len, exp.mesh, exp.rules, 0)
        train_fn, _ = loop.compile_steps(exp)
        rng = np.random.default_rng(0)
        batches = [synthetic_batch(rng, shape) for _ in range(4)]
        t1 = time.perf_counter()
        compiled = train_fn.lower(state, loop.to_global(exp, batches[0])).compile()
        t2 = time.perf_counter()
        ctx.update(exp=exp, state=state, fn=compiled, batches=batches, i=0, losses=[])
        return {
            "compile_s": round(t2 - t1, 2), "build_s": round(t1 - t0, 2),
            "n_params": state_lib.count_params(state.params), "devices": len(jax.devices()),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
            "attention_impl": cfg.model.attention.impl, "remat": cfg.model.remat,
            "code": os.path.dirname(os.path.dirname(os.path.abspath(loop.__file__))),
        }  # fmt: skip

    def steps(n: int):
        exp, fn, state = ctx["exp"], ctx["fn"], ctx["state"]
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            batch = loop.to_global(exp, ctx["batches"][ctx["i"] % len(ctx["batches"])])
            state, metrics = fn(state, batch)
            ctx["i"] += 1
        jax.block_until_ready(state)
        dt = time.perf_counter() - t0
        ctx["state"] = state
        ctx["losses"].append(float(metrics["loss"]))
        return {"seconds": dt, "cpu_s": time.process_time() - c0, "loss": ctx["losses"][-1]}

    def matmul(n: int, dtype: str, reps: int):
        import jax.numpy as jnp  # noqa: PLC0415

        a = jnp.ones((n, n), dtype)
        # bf16 with an f32 result: the form XLA:CPU runs on its bf16 kernels (llm/model/dots.py).
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        f(a, a).block_until_ready()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(a, a).block_until_ready()
            times.append(time.perf_counter() - t0)
        return {"gflops": 2 * n**3 / common.median(times) / 1e9}

    common.serve({"setup": setup, "steps": steps, "matmul": matmul, "stats": common.rss_mb})


def synthetic_batch(rng, shape):
    """Random tokens, one document per row: the step's cost does not depend on token values."""
    import numpy as np  # noqa: PLC0415

    b, t = shape.batch, shape.seq_len
    toks = rng.integers(0, shape.vocab, (b, t + 1), dtype=np.int32)
    return {
        "tokens": toks[:, :-1].copy(), "targets": toks[:, 1:].copy(),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.int32),
    }  # fmt: skip


def parse_settings(settings: str) -> dict[str, str]:
    """'a=1;b=2' -> {'a': '1', 'b': '2'} (';' separates: XLA flag values may hold commas)."""
    out = {}
    for item in filter(None, (s.strip() for s in settings.split(";"))):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


# ---- PyTorch worker -----------------------------------------------------------------------------------


def torch_worker(config: str, precision: str, settings: str = "") -> None:
    if parse_settings(settings).get("keepmem") == "1":
        # The project's host-memory setting (llm/hostmem.py) applied to PyTorch too, before torch
        # starts its threads: shows how much of the gap is the allocator rather than the kernels.
        from llm import hostmem  # noqa: PLC0415

        assert hostmem.keep_freed_memory(), "glibc mallopt failed"
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from benchmarks.torch_reference import Trainer  # noqa: PLC0415

    shape = common.CONFIGS[config]
    ctx = {}

    def setup():
        t0 = time.perf_counter()
        compiled = parse_settings(settings).get("compile") == "1"
        tr = Trainer(shape.vocab, shape.seq_len, shape.d_model, shape.n_layers, shape.n_heads,
                     bf16=precision == "bf16", lr=2e-3, layout=shape.layout,
                     d_ff=common.model_config(shape).ffn_dim, compile=compiled)  # fmt: skip
        rng = np.random.default_rng(0)
        batches = [synthetic_batch(rng, shape) for _ in range(4)]
        ctx.update(tr=tr, batches=batches, i=0)
        t1 = time.perf_counter()
        if compiled:  # torch.compile builds its kernels at the first call: that step is the compile time
            b = batches[0]
            tr.step(torch.from_numpy(b["tokens"]).long(), torch.from_numpy(b["targets"]).long())
        return {
            "compile_s": round(time.perf_counter() - t1, 2), "build_s": round(t1 - t0, 2),
            "n_params": sum(p.numel() for p in tr.model.parameters()), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }  # fmt: skip

    def steps(n: int):
        tr = ctx["tr"]
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            b = ctx["batches"][ctx["i"] % len(ctx["batches"])]
            loss = tr.step(torch.from_numpy(b["tokens"]).long(), torch.from_numpy(b["targets"]).long())
            ctx["i"] += 1
        loss = float(loss)
        return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "loss": loss}

    def matmul(n: int, dtype: str, reps: int):
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        a = torch.ones((n, n), dtype=dt)
        torch.mm(a, a)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, a)
            times.append(time.perf_counter() - t0)
        return {"gflops": 2 * n**3 / common.median(times) / 1e9}

    common.serve({"setup": setup, "steps": steps, "matmul": matmul, "stats": common.rss_mb})


# ---- parent -----------------------------------------------------------------------------------------


def run_config(name: str, args, meter_pids: list[int]) -> dict:
    shape = common.CONFIGS[name]
    n_steps = args.steps_per_block or shape.steps_per_block
    variants = [("project", "")] + [tuple(v.split(":", 1)) if ":" in v else (v, "") for v in args.variant]
    workers: dict[str, common.Worker] = {}
    for label, settings in variants:
        extra = ["--cache"] if args.cache else []
        # `exec.VAR=value`: set in the worker's environment at exec, for what is read at process start
        # (e.g. exec.GLIBC_TUNABLES=glibc.malloc.hugetlb=1: glibc reads its tunables before main).
        opts = parse_settings(settings)
        exec_env = {k[5:]: opts.pop(k) for k in [k for k in opts if k.startswith("exec.")]}
        settings = ";".join(f"{k}={v}" for k, v in opts.items())
        workers[label] = common.Worker(SCRIPT, ["--worker=jax", f"--config={name}", f"--precision={args.precision}",
                                                f"--settings={settings}", *extra], {**WORKER_ENV, **exec_env})  # fmt: skip
    torch_variants = [("pytorch", "")] + ([("pytorch_keepmem", "keepmem=1")] if args.torch_keepmem else [])
    torch_variants += [("torch_compile", "compile=1")] if args.torch_compile else []
    torch_variants = torch_variants if args.torch else []
    skipped = {}
    if torch_variants and args.precision == "bf16" and not native_bf16():
        # torch.mm in bf16 ran at ~0.3 GFLOP/s on an AVX2-only host: the blocks would take hours.
        skipped["pytorch"] = (f"no native bf16 on this CPU ({cpu_isa()}): PyTorch's bf16 matmuls are "
                              f"emulated (~0.3 GFLOP/s measured on AVX2), so the torch side is skipped")  # fmt: skip
        print(f"  {name}: {skipped['pytorch']}", flush=True)
        torch_variants = []
    # torch.compile's compile s is a cold compile, like the project's (inductor's caches live in /tmp
    # and would otherwise make a second run report a cache hit: 36.7 s cold vs 5.3 s for gpt12m).
    torch_env = (
        WORKER_ENV
        if args.cache
        else {**WORKER_ENV, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor_")}
    )
    for label, settings in torch_variants:
        workers[label] = common.Worker(SCRIPT, ["--worker=torch", f"--config={name}", f"--precision={args.precision}",
                                                f"--settings={settings}"], torch_env)  # fmt: skip
    meter_pids.extend(w.pid for w in workers.values())
    meter = common.LoadMeter(meter_pids)
    info, blocks = {}, {k: [] for k in workers}
    try:
        for w in workers.values():
            w.ready()
        for label, w in workers.items():  # one at a time: compile times are not contended
            meter.wait_idle(args.max_load, args.max_wait)
            info[label] = w.call(cmd="setup")
            info[label]["settings"] = dict(variants + torch_variants).get(label, "")
            print(f"  {name}/{label}: setup {info[label]}", flush=True)
        for w in workers.values():  # warm up by steps and by time: early steps still grow the heap
            t0, done = time.perf_counter(), 0
            while done < args.warmup or time.perf_counter() - t0 < args.warmup_s:
                w.call(cmd="steps", n=1)
                done += 1
        order = list(workers)
        for r in range(args.repeats):
            for label in order if r % 2 == 0 else order[::-1]:
                before = meter.wait_idle(args.max_load, args.max_wait)
                # The idle workers of the other frameworks are our own process tree, invisible to
                # the foreign-load meter: record their CPU during the block separately.
                others = [w.pid for k, w in workers.items() if k != label]
                sib0 = common.own_cpu(others)
                meter.start()
                out = workers[label].call(cmd="steps", n=n_steps)
                during = meter.stop()
                during["sibling_cores"] = round((common.own_cpu(others) - sib0) / out["seconds"], 3)
                tok_s = shape.batch * shape.seq_len * n_steps / out["seconds"]
                # Tokens per CPU-second of the worker: less sensitive than tokens/s to CPU sharing.
                tok_cpu_s = shape.batch * shape.seq_len * n_steps / out["cpu_s"]
                # cpu_share: the fraction of all cores this worker used in the block (1.0 = all of them).
                share = out["cpu_s"] / out["seconds"] / os.cpu_count()
                blocks[label].append({"tokens_per_s": tok_s, "tokens_per_cpu_s": tok_cpu_s,
                                      "seconds": out["seconds"], "loss": out["loss"],
                                      "cpu_share": round(share, 3), "load_before": before,
                                      "load_during": during})  # fmt: skip
                print(f"  {name}/{label} repeat {r}: {tok_s:,.0f} tok/s, {tok_cpu_s:,.0f} tok/cpu-s, cpu share {share:.2f} (foreign load "
                      f"before {before['foreign_cores']:.2f}, during {during['foreign_cores']:.2f} cores; idle "
                      f"sibling workers {during['sibling_cores']:.2f} cores)", flush=True)  # fmt: skip
        for label, w in workers.items():
            info[label].update(w.call(cmd="stats"))
    finally:
        for w in workers.values():
            w.close()
        for w in workers.values():
            meter_pids.remove(w.pid)
    flops_tok = common.train_flops_per_token(shape)
    out = {"shape": shape.__dict__, "flops_per_token": flops_tok, "frameworks": {}, "skipped": skipped}
    for label in workers:
        tps = common.median([b["tokens_per_s"] for b in blocks[label]])
        out["frameworks"][label] = {
            **info[label], "tokens_per_s": tps, "tflops": tps * flops_tok / 1e12,
            "tokens_per_cpu_s": common.median([b["tokens_per_cpu_s"] for b in blocks[label]]),
            "all_tokens_per_s": [round(b["tokens_per_s"], 1) for b in blocks[label]], "blocks": blocks[label],
        }  # fmt: skip
    ref_name = "pytorch" if "pytorch" in out["frameworks"] else "project"
    ref = out["frameworks"][ref_name]["tokens_per_s"]
    for label, f in out["frameworks"].items():
        f[f"ratio_vs_{ref_name}"] = f["tokens_per_s"] / ref
        f.update(noise_check(blocks[label], blocks[ref_name]))
        if "torch_compile" in out["frameworks"]:
            f["ratio_vs_torch_compile"] = (
                f["tokens_per_s"] / out["frameworks"]["torch_compile"]["tokens_per_s"]
            )
    return out


def noise_check(own: list[dict], ref: list[dict]) -> dict:
    """Estimates that hold up when the host is contended from outside this VM (other tenants):
    that slows every framework's CPU work in some blocks (tokens per CPU-second down 20-40% at full
    CPU share) without any foreign load visible here, and hits frameworks unequally (2026-12-06,
    Zen 4: two runs of the same code gave gpt12m 1.06x and 1.40x PyTorch eager by median).

    - best_tokens_per_s: the fastest block, the closest to an uncontended host;
    - paired_ratio: the median over repeats of this block / the reference's block of the same repeat
      (they ran back to back, so contention that drifts over minutes cancels);
    - cpu_efficiency_spread: (max - min) / median of tokens per CPU-second over the blocks; above
      0.15 the run was contended and its ratios are unreliable.
    """
    eff = [b["tokens_per_cpu_s"] for b in own]
    return {
        "best_tokens_per_s": max(b["tokens_per_s"] for b in own),
        "paired_ratio": common.median([a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(own, ref)]),
        "cpu_efficiency_spread": (max(eff) - min(eff)) / common.median(eff),
    }


def matmul_peaks(args, meter_pids) -> dict:
    """jnp.dot and torch.mm of n x n, fp32 and bf16, in fresh workers with the project's settings."""
    n = 256 if args.quick else 2048
    jw = common.Worker(
        SCRIPT, ["--worker=jax", "--config=tiny", "--precision=fp32", "--settings="], WORKER_ENV
    )
    tw = (
        common.Worker(SCRIPT, ["--worker=torch", "--config=tiny", "--precision=fp32"], WORKER_ENV)
        if args.torch
        else None
    )
    pairs = [("jnp.dot", jw)] + ([("torch.mm", tw)] if tw else [])
    meter_pids.extend(w.pid for _, w in pairs)
    meter = common.LoadMeter(meter_pids)
    out = {}
    try:
        for _, w in pairs:
            w.ready()
        for dtype in ("float32", "bfloat16"):
            for label, w in pairs:
                meter.wait_idle(args.max_load, args.max_wait)
                meter.start()
                r = w.call(cmd="matmul", n=n, dtype=dtype, reps=3 if args.quick else 10)
                out[f"{label} {dtype}"] = {"gflops": round(r["gflops"], 1), "load_during": meter.stop()}
    finally:
        for _, w in pairs:
            w.close()
            meter_pids.remove(w.pid)
    return {"n": n, "results": out}


def markdown(result: dict) -> str:
    prec = result["precision"]
    peaks = result["matmul"]["results"]
    dt = "bfloat16" if prec == "bf16" else "float32"
    peak = max(v["gflops"] for k, v in peaks.items() if k.endswith(dt)) / 1e3
    ref = (
        "pytorch"
        if any("ratio_vs_pytorch" in f for r in result["configs"].values() for f in r["frameworks"].values())
        else "project"
    )
    lines = [
        f"### Training throughput, {prec} ({result['machine']['cpu']}, {result['machine']['isa']}, "
        f"{result['machine']['cores']} cores, "
        f"{result['date']})",
        "",
        f"| config | layout | params | framework | tokens/s | TFLOP/s | % of matmul peak | vs {ref} | "
        "vs torch.compile | compile s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["configs"].items():
        for label, f in r["frameworks"].items():
            vs_compile = f"{f['ratio_vs_torch_compile']:.2f}x" if "ratio_vs_torch_compile" in f else "—"
            lines.append(
                f"| {name} | {r['shape'].get('layout', 'gpt2')} | {f['n_params'] / 1e6:.1f}M | {label} | "
                f"{f['tokens_per_s']:,.0f} | {f['tflops']:.3f} | {100 * f['tflops'] / peak:.0f}% | "
                f"{f['ratio_vs_' + ref]:.2f}x | {vs_compile} | {f['compile_s']:.1f} | {f['peak_rss_mb']:,.0f} |"
            )
    lines += [
        "",
        f"Noise check (see `noise_check`): best block, paired ratio vs {ref}, spread of tokens per CPU-s:",
    ]
    contended = []
    for name, r in result["configs"].items():
        for label, f in r["frameworks"].items():
            if "cpu_efficiency_spread" not in f:
                continue
            lines.append(f"{name}/{label} {f['best_tokens_per_s']:,.0f} tok/s, {f['paired_ratio']:.2f}x, "
                         f"{100 * f['cpu_efficiency_spread']:.0f}%;")  # fmt: skip
            contended += [f"{name}/{label}"] if f["cpu_efficiency_spread"] > 0.15 else []
    if contended:
        lines.append(f"**Contended run**: tokens per CPU-second varied over 15% between blocks of {', '.join(contended)} "
                     "with no foreign load visible here (other tenants of the host): its ratios are unreliable.")  # fmt: skip
    lines += [f"\n{name}, {label} skipped: {why}" for name, r in result["configs"].items()
              for label, why in r.get("skipped", {}).items()]  # fmt: skip
    lines += [
        "",
        f"Matmul peak ({result['matmul']['n']}² {dt}, same run): "
        + ", ".join(f"{k} {v['gflops']:.0f} GFLOP/s" for k, v in peaks.items()),
        f"FLOPs per token = 6·N + 12·L·T·D from llm/flops.py (N = matmul weights incl. the tied head). Median of "
        f"{result['repeats']} interleaved blocks after {result['warmup']} warm-up steps and at least "
        f"{result.get('warmup_s', 0):.0f} s per worker. Max foreign CPU load "
        f"seen before / during timed blocks: {result['max_foreign_before']:.2f} / "
        f"{result['max_foreign_during']:.2f} cores (threshold {result['max_load']}).",
    ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--configs", default="gpt12m,shakespeare,gpt100m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per worker after compiling (at least)"
    )
    ap.add_argument(
        "--warmup-s", type=float, default=10.0, help="untimed seconds per worker after compiling (at least)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny config, 1 repeat: checks that it works")
    ap.add_argument("--variant", action="append", default=[],
                    help="extra JAX variant 'NAME:k=v;k=v' with k = devices | xla (extra XLA_FLAGS) | env.VAR (an environment variable) | exec.VAR (one set before the worker starts, e.g. glibc tunables) | keepmem=0 | dots=off | attn_dots=off "
                         "| a config path such as model.attention.impl or model.remat")  # fmt: skip
    ap.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                    help="time the PyTorch reference (--no-torch: only the JAX variants, e.g. 'old:repo=<checkout>')")  # fmt: skip
    ap.add_argument("--torch-keepmem", action=argparse.BooleanOptionalAction, default=True,
                    help="also time PyTorch with the project's host-memory setting (llm/hostmem.py)")  # fmt: skip
    ap.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the PyTorch reference under torch.compile (inductor)")  # fmt: skip
    ap.add_argument("--max-load", type=float, default=0.15, help="foreign CPU cores tolerated before a block")
    ap.add_argument("--max-wait", type=float, default=900.0, help="seconds to wait for an idle CPU")
    ap.add_argument("--cache", action="store_true", help="allow the persistent compilation cache")
    ap.add_argument("--out", default=None, help="results file stem (default train_throughput_<precision>)")
    ap.add_argument("--no-matmul", action="store_true")
    ap.add_argument("--steps-per-block", type=int, default=0, help="override the config's steps per block")
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--settings", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "jax":
        return jax_worker(args.config, args.precision, args.settings, args.cache)
    if args.worker == "torch":
        return torch_worker(args.config, args.precision, args.settings)

    if args.quick:
        args.configs, args.repeats, args.warmup, args.warmup_s, args.max_wait = "tiny", 1, 1, 0.0, 0.0
    own = [os.getpid()]
    meter = common.LoadMeter(own)
    start_load = meter.sample(2.0)
    print(f"foreign CPU load at start: {start_load['foreign_cores']:.2f} cores "
          f"{common.top_foreign_processes(own)}", flush=True)  # fmt: skip
    result = {
        "precision": args.precision, "repeats": args.repeats, "warmup": args.warmup, "warmup_s": args.warmup_s, "max_load": args.max_load,
        "date": time.strftime("%Y-%m-%d %H:%M"), "start_load": start_load,
        "machine": common.host() | {"python": platform.python_version()},
        "configs": {},
    }  # fmt: skip
    if not args.no_matmul:
        result["matmul"] = matmul_peaks(args, own)
        print(
            f"matmul: {json.dumps({k: v['gflops'] for k, v in result['matmul']['results'].items()})}",
            flush=True,
        )
    for name in args.configs.split(","):
        result["configs"][name] = run_config(name, args, own)
    all_blocks = [
        b for r in result["configs"].values() for f in r["frameworks"].values() for b in f["blocks"]
    ]
    result["max_foreign_before"] = max(b["load_before"]["foreign_cores"] for b in all_blocks)
    result["max_foreign_during"] = max(b["load_during"]["foreign_cores"] for b in all_blocks)
    result["blocks_not_idle"] = sum(not b["load_before"]["idle"] for b in all_blocks)
    stem = args.out or f"train_throughput_{args.precision}" + ("_quick" if args.quick else "")
    common.write_results(stem, result, None if args.no_matmul else markdown(result))
    if result["blocks_not_idle"]:
        print(f"WARNING: {result['blocks_not_idle']} timed blocks started while other processes used the "
              f"CPU (> {args.max_load} cores): these numbers are not clean.", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
