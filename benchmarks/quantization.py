"""int8 weight-only quantization: weight bytes and held-out loss, fp32 vs int8, on a trained checkpoint.

    python benchmarks/quantization.py --workdir=runs/shakespeare      # an existing run's checkpoint
    python benchmarks/quantization.py --config=configs/shakespeare.py  # train it first (README "Quick start" times)
    python benchmarks/quantization.py                                  # configs/tiny.py, seconds

Without a checkpoint in --workdir (default: a temporary directory) the config is trained there
first. The held-out split is the run's own (same tokenizer, same windows as its eval). int8 uses
one fp32 scale per output channel for every weight matrix (embeddings per token row); biases and
norm gains stay fp32. Results go to benchmarks/results/quantization.json and a table is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def load_config(spec: str, overrides: list[str]):
    """configs/<file>.py[:arg] -> RunConfig, with `a.b=v` overrides."""
    from llm.config import from_config_dict  # noqa: PLC0415

    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("bench_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    c = mod.get_config(arg) if arg else mod.get_config()
    for o in overrides:
        key, _, value = o.partition("=")
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
    return from_config_dict(c)


def matrix_bytes(params) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params) if x.ndim >= 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None, help="run directory (trained into if it has no checkpoint)")
    ap.add_argument("--config", default="configs/tiny.py", help="config to train when there is no checkpoint")
    ap.add_argument("--set", action="append", default=[], help="config override a.b=v (repeatable)")
    ap.add_argument("--eval_batches", type=int, default=0, help="0 = the whole held-out split")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "quantization.json"))  # fmt: skip
    args = ap.parse_args()

    import llm  # noqa: PLC0415
    from llm import runtime  # noqa: PLC0415
    from llm.data import pipeline  # noqa: PLC0415
    from llm.model import quant  # noqa: PLC0415
    from llm.train import loop  # noqa: PLC0415

    runtime.setup()
    workdir = args.workdir or tempfile.mkdtemp(prefix="quant_bench_")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not (os.path.isdir(ckpt_dir) and any(s.isdigit() for s in os.listdir(ckpt_dir))):
        cfg = load_config(args.config, args.set)
        print(f"no checkpoint in {workdir}: training {args.config} for {cfg.train.steps} steps", flush=True)
        loop.train(cfg, workdir)
    run = llm.load(workdir)
    cfg = run.config
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_batches=args.eval_batches))

    # Rebuild the run's held-out windows in a scratch directory (loop.build saves the tokenizer
    # there: the run directory itself is only read).
    scratch = tempfile.mkdtemp(prefix="quant_eval_")
    run.tokenizer.save(scratch)
    exp = loop.build(cfg, scratch)
    _, eval_fn = loop.compile_steps(exp)

    qparams = jax.block_until_ready(quant.quantize_params(run.params))
    deq = jax.block_until_ready(quant.dequantize(qparams))
    fp = loop.evaluate(exp, eval_fn, run.params)
    q8 = loop.evaluate(exp, eval_fn, deq)

    # Top-1 agreement of the two models on the first held-out batch (how often greedy would differ).
    first = next(iter(pipeline.eval_batches(exp.eval_windows, 8, 0, 1, 1)))
    apply = jax.jit(lambda p, t, pos, seg: run.model.apply({"params": p}, t, pos, seg))
    a = np.asarray(
        jnp.argmax(apply(run.params, first["tokens"], first["positions"], first["segment_ids"]), -1)
    )
    b = np.asarray(jnp.argmax(apply(deq, first["tokens"], first["positions"], first["segment_ids"]), -1))
    mask = first["loss_mask"].astype(bool)
    agree = float((a == b)[mask].mean())

    report = {
        "workdir": workdir, "step": run.step, "model": dataclasses.asdict(cfg.model),
        "eval_tokens": fp["eval_tokens"],
        "fp32": {"eval_loss": fp["eval_loss"], "eval_bpb": fp["eval_bpb"], "param_bytes": quant.param_bytes(run.params),
                 "matrix_bytes": matrix_bytes(run.params)},
        "int8": {"eval_loss": q8["eval_loss"], "eval_bpb": q8["eval_bpb"], "param_bytes": quant.param_bytes(qparams),
                 "matrix_bytes": matrix_bytes(qparams)},
        "top1_agreement_first_batch": agree,
    }  # fmt: skip
    report["loss_delta"] = q8["eval_loss"] - fp["eval_loss"]
    report["bytes_ratio"] = report["int8"]["param_bytes"] / report["fp32"]["param_bytes"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)

    mb = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    print(f"\nwrote {args.out} (step {run.step}, {int(fp['eval_tokens'])} held-out tokens)\n")
    print("| weights | param bytes | matrix bytes | held-out loss | bits/byte |")
    print("|---|---|---|---|---|")
    for name in ("fp32", "int8"):
        r = report[name]
        print(f"| {name} | {mb(r['param_bytes'])} | {mb(r['matrix_bytes'])} | {r['eval_loss']:.4f} | "
              f"{r['eval_bpb']:.4f} |")  # fmt: skip
    print(f"\nint8/fp32 bytes: {report['bytes_ratio']:.3f}; loss change: {report['loss_delta']:+.4f} nats; "
          f"top-1 agreement: {agree:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
