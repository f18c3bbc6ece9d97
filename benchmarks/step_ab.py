"""In-process A/B of the train step: every variant compiled in one process, timed in alternating blocks.

Separate worker processes (train_throughput.py) differ by up to ±10% from run to run on a 2-core
host even for identical code; one process that builds each variant's step and alternates timed
blocks between them (order reversed every round) compares code changes within a few percent.

Run (idle machine):
  .venv/bin/python benchmarks/step_ab.py 'base' 'set:model.attention.query_block=0'
  .venv/bin/python benchmarks/step_ab.py 'base' 'patch:ab_patches:rope_direct_sine'
  .venv/bin/python benchmarks/step_ab.py --config=gpt12m 'base' 'opt:xla_cpu_enable_fast_math=true'
  .venv/bin/python benchmarks/step_ab.py --config=gpt100m --set model.matmul_dtype=bfloat16 --rounds=4 --steps=2 \
      'base' 'patch:ab_patches:dense_narrow_grad_plain'
Variants: `base` (the code as is), `set:key=value+key=value` (config paths), `opt:option=value+...`
(XLA compiler options of that variant's compile), `patch:module:function` (a function in
benchmarks/ that monkeypatches the library; patches stay applied, so list them last), `dev:N` (the
step on the first N CPU devices of this process, e.g. `dev:1` against the default 2). Steps are
built as `llm.train` builds them (benchmarks/train_throughput.py's shapes and layouts, synthetic
batches). Writes results/step_ab_<out>.json with every block's tokens/s.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llm import runtime  # noqa: E402

runtime.configure_cpu()

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402


def build(config: str, sets: dict[str, str], options: dict[str, str], n_devices: int | None = None):
    from train_throughput import synthetic_batch  # noqa: PLC0415

    from llm.config import from_config_dict  # noqa: PLC0415
    from llm.train import loop  # noqa: PLC0415
    from llm.train import state as state_lib  # noqa: PLC0415

    shape = common.CONFIGS[config]
    c = common.step_config(config)
    for key, value in sets.items():
        common.set_path(c, key, value)
    devices = jax.devices()[:n_devices] if n_devices else None
    exp = loop.build(from_config_dict(c), tempfile.mkdtemp(prefix="step_ab_"), devices)
    state = state_lib.create_state(exp.model, exp.tx, shape.seq_len, exp.mesh, exp.rules, 0)
    train_fn, _ = loop.compile_steps(exp)
    rng = np.random.default_rng(0)
    batches = [loop.to_global(exp, synthetic_batch(rng, shape)) for _ in range(4)]
    fn = train_fn.lower(state, batches[0]).compile(compiler_options=options or None)
    for i in range(3):  # warm-up
        state, metrics = fn(state, batches[i % 4])
    jax.block_until_ready(state)
    return {"fn": fn, "state": state, "batches": batches, "tokens": shape.batch * shape.seq_len}


def parse(variant: str) -> tuple[dict, dict]:
    """(config sets, compiler options) of a variant; applies a patch variant's function. `dev:N`
    (the step on the first N CPU devices) is read by `devices_of`."""
    kind, _, rest = variant.partition(":")
    pairs = lambda s: dict(kv.split("=", 1) for kv in s.split("+"))  # noqa: E731
    if kind == "dev":
        return {}, {}
    if kind == "set":
        return pairs(rest), {}
    if kind == "opt":
        return {}, pairs(rest)
    if kind == "patch":
        module, func = rest.split(":")
        getattr(importlib.import_module(module), func)()
        return {}, {}
    if variant != "base":
        raise SystemExit(
            f"unknown variant {variant!r}: base | set:k=v | opt:k=v | patch:module:function | dev:N"
        )
    return {}, {}


def devices_of(variant: str) -> int | None:
    """`dev:N`: build the step on the first N of this process's CPU devices (the others stay idle),
    e.g. one device with the whole 2-thread pool against the default two, in one process."""
    kind, _, rest = variant.partition(":")
    return int(rest) if kind == "dev" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--config", default="shakespeare", choices=sorted(common.CONFIGS))
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="steps per timed block")
    ap.add_argument("--out", default=None, help="results/step_ab_<out>.json (default: the config name)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides of every variant (e.g. model.matmul_dtype=bfloat16)")  # fmt: skip
    args = ap.parse_args()
    common_sets = dict(kv.split("=", 1) for kv in args.set)
    runtime.setup()
    jax.config.update("jax_enable_compilation_cache", False)
    runs = {}
    for v in args.variants:
        sets, options = parse(v)
        runs[v] = build(args.config, {**common_sets, **sets}, options, devices_of(v))
        print(f"built {v}", flush=True)
    blocks = {v: [] for v in runs}
    for r in range(args.rounds):
        for v in runs if r % 2 == 0 else list(runs)[::-1]:
            run = runs[v]
            state, t0 = run["state"], time.perf_counter()
            for i in range(args.steps):
                state, _ = run["fn"](state, run["batches"][i % 4])
            jax.block_until_ready(state)
            run["state"] = state
            blocks[v].append(args.steps * run["tokens"] / (time.perf_counter() - t0))
    base = common.median(blocks[args.variants[0]])
    # Paired ratio: each block against the base block of the same round (the two ran back to back),
    # so load that drifts over minutes cancels; its median is the figure to quote.
    paired = {
        v: common.median([x / b for x, b in zip(xs, blocks[args.variants[0]])]) for v, xs in blocks.items()
    }
    print(f"\n{args.config}, {common.host()}: median tokens/s of {args.rounds} blocks of {args.steps} steps")
    for v, xs in blocks.items():
        print(f"  {v:50s} {common.median(xs):9,.0f}  ({common.median(xs) / base:.3f}x, paired {paired[v]:.3f}x; "
              f"min {min(xs):,.0f}, max {max(xs):,.0f})")  # fmt: skip
    out = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"step_ab_{args.out or args.config}.json"
    )
    with open(out, "w") as f:
        json.dump({"config": args.config, "host": common.host(), "rounds": args.rounds, "steps": args.steps,
                   "date": time.strftime("%Y-%m-%d %H:%M"), "sets": args.set, "tokens_per_s": blocks, "paired_ratio": paired,
                   "median": {v: common.median(xs) for v, xs in blocks.items()}}, f, indent=1)  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
