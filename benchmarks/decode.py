"""Decode throughput: the KV-cached engine vs recomputing the forward pass vs Hugging Face generate().

Final measurement (GPT-2-124M shape, random weights, greedy, batch 1 and 8, 256 new tokens; run it
on an otherwise idle machine, it takes about 10-20 minutes on 2 CPU cores):

    python benchmarks/decode.py

Quick check that everything runs (tiny model, a few tokens, writes to /tmp):

    python benchmarks/decode.py --preset=tiny --new_tokens=16 --recompute_steps=4 --repeats=1 \
        --max_wait=0 --out=/tmp/decode_tiny.json

Engines, all greedy from the same random prompt of `--prompt_len` tokens:
- cached: llm.infer's on-device loop (one prefill, then one KV-cached decode step per token);
- cached-int8: the same with int8 weights (dequantised inside each step; on CPU this costs time);
- recompute: no cache, every step runs the full forward pass over a fixed window of
  prompt_len + new_tokens tokens (what the previous windowed sampler did, there with max_seq_len).
  Its per-step cost is constant, so it is timed over `--recompute_steps` steps;
- hf: transformers GPT2LMHeadModel.generate(use_cache=True) in torch on CPU, same shape;
- hf-compile: the same with the forward under torch.compile (inductor) and a static KV cache.

Timing is wall clock after a warm-up call (compilation excluded). Before each timed block the
script waits until other processes use less than `--max_foreign` cores, and it measures the CPU
that other processes used during the block; a contended block is retried. Results go to
benchmarks/results/decode.json and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from benchmarks import common  # noqa: E402

SHAPES = {
    # name: (vocab, d_model, layers, heads, max_seq_len)
    "gpt2-124m": (50257, 768, 12, 12, 1024),
    "tiny": (512, 64, 2, 4, 128),
}


# ---- foreign-load detection ---------------------------------------------------------------------


def _busy_and_own():
    t = psutil.cpu_times()
    busy = (
        t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
    )
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system + getattr(own, "children_user", 0) + getattr(own, "children_system", 0)


def foreign_cores(window: float = 1.0) -> float:
    """Cores used by other processes over `window` seconds while this one idles."""
    b0, o0 = _busy_and_own()
    time.sleep(window)
    b1, o1 = _busy_and_own()
    return max(0.0, (b1 - b0) - (o1 - o0)) / window


def wait_for_quiet(max_foreign: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until other processes use < max_foreign cores; return the last reading."""
    deadline = time.time() + max_wait
    while True:
        f = foreign_cores()
        if f < max_foreign or time.time() >= deadline:
            if f >= max_foreign:
                print(f"  ! still {f:.2f} foreign cores busy (load avg {os.getloadavg()[0]:.1f}); measuring anyway",
                      flush=True)  # fmt: skip
            return f
        print(
            f"  waiting: {f:.2f} cores busy in other processes (load avg {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        time.sleep(5)


def timed(fn, args, *, repeats: int, max_foreign: float, max_wait: float, retries: int) -> dict:
    """Median wall time of `repeats` uncontended runs of fn(*args) (a contended run is retried)."""
    runs = []
    for _ in range(repeats):
        for attempt in range(retries + 1):
            before = wait_for_quiet(max_foreign, max_wait)
            b0, o0 = _busy_and_own()
            t0 = time.perf_counter()
            fn(*args)
            wall = time.perf_counter() - t0
            b1, o1 = _busy_and_own()
            during = max(0.0, (b1 - b0) - (o1 - o0)) / wall
            run = {"seconds": wall, "foreign_cores_before": round(before, 3), "foreign_cores_during": round(during, 3),
                   "loadavg_1m": round(os.getloadavg()[0], 2), "contended": during >= max_foreign}  # fmt: skip
            if not run["contended"] or attempt == retries:
                break
            print(f"  retry: {during:.2f} foreign cores during the run", flush=True)
        runs.append(run)
    return {"seconds": statistics.median(r["seconds"] for r in runs), "runs": runs,
            "contended": any(r["contended"] for r in runs)}  # fmt: skip


# ---- engines ------------------------------------------------------------------------------------


def jax_model(preset: str):
    from llm.model import AttentionConfig, ModelConfig, Transformer  # noqa: PLC0415

    vocab, d, layers, heads, ctx = SHAPES[preset]
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, max_seq_len=ctx, positional="learned",
                      norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True,
                      attention=AttentionConfig(n_heads=heads))  # fmt: skip
    model = Transformer(cfg)
    import flax.linen as nn  # noqa: PLC0415

    init = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]))
    return model, init(jax.random.PRNGKey(0))


def cached_fn(model, new_tokens: int):
    from llm.infer import engine  # noqa: PLC0415

    fn = engine.compiled_generate(model, new_tokens, engine.Sampling(temperature=0.0), (), 0)
    rng = jax.random.PRNGKey(0)

    def run(params, tokens_BP):
        lengths_B = np.full((tokens_BP.shape[0],), tokens_BP.shape[1], np.int32)
        out_BN, _ = fn(params, tokens_BP, lengths_B, rng)
        return np.asarray(out_BN)

    return run


def recompute_fn(model, new_tokens: int, steps: int):
    """No cache: each step runs the whole forward over a fixed window of prompt + new tokens."""

    @functools.partial(jax.jit, static_argnums=2)
    def loop(params, buf_BW, p):
        def body(i, buf_BW):
            logits_BWV = model.apply({"params": params}, buf_BW)
            last_BV = jax.lax.dynamic_index_in_dim(logits_BWV, p + i - 1, axis=1, keepdims=False)
            tok_B = jnp.argmax(last_BV, -1).astype(jnp.int32)
            return jax.lax.dynamic_update_slice(buf_BW, tok_B[:, None], (0, p + i))

        return jax.lax.fori_loop(0, steps, body, buf_BW)

    def run(params, tokens_BP):
        b, p = tokens_BP.shape
        buf_BW = np.zeros((b, p + new_tokens), np.int32)
        buf_BW[:, :p] = tokens_BP
        return np.asarray(loop(params, buf_BW, p))

    return run


def hf_setup(preset: str, threads: int, compiled: bool = False):
    """transformers' generate(); `compiled`: its forward under torch.compile (inductor) with a
    static KV cache, the way Hugging Face documents compiled generation (fixed shapes: one compile
    for the prefill, one for the decode step, both in the warm-up call)."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vocab, d, layers, heads, ctx = SHAPES[preset]
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=d, n_layer=layers, n_head=heads,
                                  bos_token_id=vocab - 1, eos_token_id=vocab - 1)  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).eval()
    extra = {}
    if compiled:
        model.forward = torch.compile(model.forward, dynamic=False)
        extra = {"cache_implementation": "static"}

    def run(tokens_BP, new_tokens):
        with torch.inference_mode():
            ids = torch.as_tensor(tokens_BP, dtype=torch.long)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=0, **extra)  # fmt: skip
        assert out.shape[1] == ids.shape[1] + new_tokens
        return out

    return run, {"torch": torch.__version__, "transformers": transformers.__version__,
                 "torch_threads": torch.get_num_threads()}  # fmt: skip


# ---- main ---------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt2-124m", choices=sorted(SHAPES))
    ap.add_argument("--batch_sizes", default="1,8")
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--recompute_steps", type=int, default=16, help="steps timed for the no-cache engine")
    ap.add_argument("--engines", default="cached,cached-int8,recompute,hf,hf-compile")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--max_foreign", type=float, default=0.25, help="cores other processes may use")
    ap.add_argument("--max_wait", type=float, default=600.0, help="seconds to wait for a quiet machine")
    ap.add_argument("--retries", type=int, default=3)
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "decode.json")
    )
    args = ap.parse_args()
    engines = args.engines.split(",")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    vocab = SHAPES[args.preset][0]
    timing = dict(
        repeats=args.repeats, max_foreign=args.max_foreign, max_wait=args.max_wait, retries=args.retries
    )

    meta = {"preset": args.preset, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
            "recompute_steps": args.recompute_steps, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "dtype": "float32", "weights": "random", "decoding": "greedy", "host": common.host()}  # fmt: skip
    print(f"decode benchmark: {meta}", flush=True)
    results = []
    jm = params = qparams = hf = hf_compiled = None
    if any(e in engines for e in ("cached", "cached-int8", "recompute")):
        jm, params = jax_model(args.preset)
    if "cached-int8" in engines:
        from llm.infer import engine  # noqa: PLC0415

        qparams = jax.block_until_ready(engine.quantize_jit(params, "int8"))
    if "hf" in engines:
        hf, versions = hf_setup(args.preset, args.threads)
        meta.update(versions)
    if "hf-compile" in engines:
        hf_compiled, versions = hf_setup(args.preset, args.threads, compiled=True)
        meta.update(versions)

    for b in batches:
        tokens_BP = np.random.RandomState(b).randint(0, vocab, (b, args.prompt_len)).astype(np.int32)
        for name in engines:
            if name == "cached":
                fn, fargs, n = cached_fn(jm, args.new_tokens), (params, tokens_BP), args.new_tokens
            elif name == "cached-int8":
                fn, fargs, n = cached_fn(jm, args.new_tokens), (qparams, tokens_BP), args.new_tokens
            elif name == "recompute":
                fn = recompute_fn(jm, args.new_tokens, args.recompute_steps)
                fargs, n = (params, tokens_BP), args.recompute_steps
            elif name in ("hf", "hf-compile"):
                fn = hf if name == "hf" else hf_compiled
                fargs, n = (tokens_BP, args.new_tokens), args.new_tokens
            else:
                raise SystemExit(
                    f"unknown engine {name!r}; choose from cached, cached-int8, recompute, hf, hf-compile"
                )
            print(f"[batch {b}] {name}: warm-up (compile)", flush=True)
            t0 = time.perf_counter()
            fn(*fargs)
            warm = time.perf_counter() - t0
            r = timed(fn, fargs, **timing)
            r.update(engine=name, batch=b, tokens=n * b, warmup_seconds=round(warm, 2),
                     tokens_per_s=n * b / r["seconds"])  # fmt: skip
            print(f"[batch {b}] {name}: {r['tokens_per_s']:.1f} tokens/s ({r['seconds']:.2f} s, "
                  f"contended={r['contended']})", flush=True)  # fmt: skip
            results.append(r)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\nwrote {args.out}\n")
    print(table(results, batches, engines))
    if any(r["contended"] for r in results):
        print(
            "\nWARNING: some runs overlapped foreign CPU load (see 'contended' in the JSON); re-run when idle."
        )


def table(results, batches, engines) -> str:
    """Markdown: tokens/s per engine and batch, and the cached engine's speed-up over each."""
    by = {(r["engine"], r["batch"]): r for r in results}
    head = "| engine | " + " | ".join(f"batch {b} tok/s" for b in batches) + " | " + " | ".join(
        f"cached speed-up (b={b})" for b in batches) + " |"  # fmt: skip
    lines = [head, "|" + "---|" * (1 + 2 * len(batches))]
    for e in engines:
        cells = [
            f"{by[(e, b)]['tokens_per_s']:.1f}" + (" *" if by[(e, b)]["contended"] else "") for b in batches
        ]
        ups = []
        for b in batches:
            c = by.get(("cached", b))
            ups.append(f"{c['tokens_per_s'] / by[(e, b)]['tokens_per_s']:.2f}x" if c else "-")
        lines.append(f"| {e} | " + " | ".join(cells) + " | " + " | ".join(ups) + " |")
    return "\n".join(lines) + "\n(* = foreign CPU load overlapped the run)"


if __name__ == "__main__":
    main()
