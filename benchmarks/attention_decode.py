"""Decode cache bytes per token and decode tokens/s for MHA, GQA, MQA and MLA, side by side.

    .venv/bin/python benchmarks/attention_decode.py            # GPT-2-124M shape, ~10 minutes idle
    .venv/bin/python benchmarks/attention_decode.py --preset=tiny --new_tokens=8 --repeats=1 \\
        --max_wait=0 --out=/tmp/attn_decode_tiny     # smoke run

Shape: GPT-2-124M (d 768, 12 layers, 12 heads of 64, vocab 50257) with RoPE (MLA needs rotary
positions for its shared key; the other layouts get the same, so only the attention differs),
fp32, random weights, greedy. Layouts: MHA (12 KV heads), GQA (4), MQA (1), MLA (kv latent 128,
query/key channels 64 + 32 rotary, v 64; DeepSeek-V2's ratios scaled down) decoded naively
(latent expanded to per-head keys/values every step) and with the absorbed weights, and MHA with
every layer a sliding window of 256 (ring-buffer cache).

Cache bytes per token are read from the engine's real cache (`engine.init_cache`): every cache
array with a slot axis, summed over layers, per slot and row. Tokens/s is the on-device
generate loop, decode steps only (the time of prompt + N new tokens minus prompt + 1, over N - 1
steps), at two context lengths: a short prompt, where the weights dominate a step, and a long one,
where reading the cache weighs more.
Timing as benchmarks/decode.py (median of repeats after a warm-up, waiting for an idle machine,
contended runs retried). Writes <out>.json and <out>.md (default benchmarks/results/attention_decode).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.decode import SHAPES, cached_fn, timed  # noqa: E402

MLA = dict(kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
LAYOUTS = {  # name: AttentionConfig overrides (n_heads from the shape)
    "MHA": dict(n_kv_heads=None),
    "GQA-4": dict(n_kv_heads=4),
    "MQA": dict(n_kv_heads=1),
    "MLA": dict(kind="mla", mla=MLA),
    "MLA-absorb": dict(kind="mla", mla={**MLA, "absorb": True}),
    "local-256": dict(kind="local", local={"window": 256}),  # MHA heads, a ring of 256 slots
}


def build(preset: str, layout: dict, max_len: int):
    from llm.model import Transformer  # noqa: PLC0415
    from llm.model.config import AttentionConfig, LocalConfig, MLAConfig, ModelConfig  # noqa: PLC0415

    vocab, d, layers, heads, _ = SHAPES[preset]
    att = dict(layout)
    mla = MLAConfig(**att.pop("mla", {}))
    att["local"] = LocalConfig(**att.pop("local", {}))
    if preset == "tiny":  # head_dim 16 there: MLA's dims shrink by 4
        mla = MLAConfig(
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, absorb=mla.absorb
        )
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, max_seq_len=max_len, positional="rope",
                      norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True,
                      attention=AttentionConfig(n_heads=heads, mla=mla, **att))  # fmt: skip
    model = Transformer(cfg)
    init = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]))
    return model, init(jax.random.PRNGKey(0))


def cache_bytes_per_token(model, max_len: int) -> int:
    """Bytes of the attention layers' cache arrays (keys/values, latent + rotary key, or a local
    layer's ring) for one row of `max_len` slots, all layers, divided by the slots (a ring's bytes
    do not grow with max_len, so its per-token figure falls with length)."""
    from llm.infer import engine  # noqa: PLC0415

    shapes = jax.eval_shape(lambda: engine.init_cache(model, 1, max_len))
    total = sum(int(np.prod(s.shape)) * s.dtype.itemsize for path, s in jax.tree_util.tree_leaves_with_path(shapes)
                if "cached_" in jax.tree_util.keystr(path) or "ring_" in jax.tree_util.keystr(path))  # fmt: skip
    return total // max_len


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt2-124m", choices=sorted(SHAPES))
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt_lens", default="16,512")
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max_foreign", type=float, default=0.25)
    ap.add_argument("--max_wait", type=float, default=600.0)
    ap.add_argument("--retries", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "attention_decode"))
    a = ap.parse_args()
    timing = dict(repeats=a.repeats, max_foreign=a.max_foreign, max_wait=a.max_wait, retries=a.retries)
    prompts = [int(p) for p in a.prompt_lens.split(",")]
    max_len = max(prompts) + a.new_tokens
    meta = {"preset": a.preset, "batch": a.batch, "new_tokens": a.new_tokens, "prompt_lens": prompts,
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
            "backend": jax.default_backend(), "dtype": "float32", "mla": MLA,
            "cpu_isa": common.host()["isa"]}  # fmt: skip
    print(f"attention decode benchmark: {meta}", flush=True)
    results = []
    for name in a.layouts.split(","):
        model, params = build(a.preset, LAYOUTS[name], max_len)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        row = {
            "layout": name,
            "params": int(n_params),
            "cache_bytes_per_token": cache_bytes_per_token(model, max_len),
        }
        for p in prompts:
            tokens = np.random.RandomState(p).randint(0, SHAPES[a.preset][0], (a.batch, p)).astype(np.int32)
            # Decode only: the same prompt with N new tokens and with 1; the difference is N - 1
            # cached decode steps (prefill and dispatch cancel out).
            t = {}
            for n in (a.new_tokens, 1):
                fn = cached_fn(model, n)
                t0 = time.perf_counter()
                fn(params, tokens)
                row[f"warmup_s@{p}/{n}"] = round(time.perf_counter() - t0, 1)
                t[n] = timed(fn, (params, tokens), **timing)
            steps_s = t[a.new_tokens]["seconds"] - t[1]["seconds"]
            row[f"tokens_per_s@{p}"] = (a.new_tokens - 1) * a.batch / steps_s
            row[f"prefill_s@{p}"] = t[1]["seconds"]
            row[f"contended@{p}"] = t[a.new_tokens]["contended"] or t[1]["contended"]
            print(f"{name} prompt {p}: {row[f'tokens_per_s@{p}']:.1f} decode tokens/s "
                  f"(contended={row[f'contended@{p}']})", flush=True)  # fmt: skip
        results.append(row)
        print(f"{name}: {row['cache_bytes_per_token']:,} cache bytes per token", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    md = table(results, prompts, meta)
    with open(a.out + ".md", "w") as f:
        f.write(md + "\n")
    print(f"\nwrote {a.out}.json/.md\n\n{md}")
    return 0


def table(results, prompts, meta) -> str:
    mha = next((r for r in results if r["layout"] == "MHA"), results[0])
    head = (["layout", "params", f"cache bytes / token ({meta['prompt_lens'][-1] + meta['new_tokens']} slots)", "vs MHA"]
            + [f"decode tok/s after a {p}-token prompt" for p in prompts])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["layout"], f"{r['params'] / 1e6:.1f}M", f"{r['cache_bytes_per_token']:,}",
                 f"{r['cache_bytes_per_token'] / mha['cache_bytes_per_token']:.3f}"]  # fmt: skip
        cells += [f"{r[f'tokens_per_s@{p}']:.1f}" + (" *" if r[f"contended@{p}"] else "") for p in prompts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\nbatch {meta['batch']}, fp32, {meta['cpu_count']} CPU cores ({meta['cpu_isa']}); "
                               "* = foreign CPU load overlapped the run")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
