"""Peak memory of a compiled training step vs sequence length: Infini-attention against full causal.

    .venv/bin/python benchmarks/infini_memory.py [--lengths=1024,4096,16384,65536] [--segment=256]

Compiles (never runs) the gradient of the training loss (llm/train/step.py's `_loss`) for batch 1
at each length and reads XLA's buffer assignment (`compiled.memory_analysis()` on CPU: arguments +
outputs + temporaries - aliased). Model: d 128, 2 layers, 4 heads, vocab 512, RoPE, fp32. Three
modes: `infini-chunked` (`infini.chunk_segments=1`: the whole stack one segment at a time,
llm/train/recurrent.py), `infini` (each layer scans its segments, the rest of the model sees the
whole sequence) and `causal` (the fused attention core over the full T x T square); segments of
`--segment` tokens. Writes benchmarks/results/infini_memory.{json,md,png}.
Compile-only, so the numbers do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

MODES = {"infini-chunked": ("infini", 1), "infini": ("infini", 0), "causal": ("causal", 0)}


def peak_bytes(mode: str, t: int, segment: int) -> dict:
    from llm.model import Transformer  # noqa: PLC0415
    from llm.model.config import AttentionConfig, InfiniConfig, ModelConfig  # noqa: PLC0415
    from llm.train.step import _loss  # noqa: PLC0415

    kind, chunk = MODES[mode]
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=2, max_seq_len=t, positional="rope", norm="rmsnorm",
                      mlp="swiglu", use_bias=False,
                      attention=AttentionConfig(n_heads=4, kind=kind, infini=InfiniConfig(segment_len=segment, chunk_segments=chunk)))  # fmt: skip
    model = Transformer(cfg)
    tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
    params = jax.eval_shape(
        lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    )
    batch = {k: tokens for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
    grad = jax.jit(jax.grad(lambda p, b: _loss(p, model, b, jax.random.PRNGKey(0), 1.0, 1.0)[0]))
    m = grad.lower(params, batch).compile().memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"kind": mode, "seq_len": t, "peak_bytes": int(peak), "temp_bytes": int(m.temp_size_in_bytes)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="1024,4096,16384,65536")
    ap.add_argument("--segment", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "infini_memory"))
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    rows = []
    for kind in MODES:
        for t in lengths:
            r = peak_bytes(kind, t, a.segment)
            rows.append(r)
            print(f"{kind:14s} T={t:6d}: peak {r['peak_bytes'] / 2**20:9.1f} MiB", flush=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"segment": a.segment, "backend": jax.default_backend(), "jax": jax.__version__, "rows": rows}, f,
                  indent=1)  # fmt: skip
    base = {
        k: next(r["peak_bytes"] for r in rows if r["kind"] == k and r["seq_len"] == lengths[0]) for k in MODES
    }
    head = " | ".join(f"{k} peak MiB | × its {lengths[0]:,}" for k in MODES)
    lines = [f"| seq len | {head} |", "|---|" + "---|---|" * len(MODES)]
    for t in lengths:
        cells = []
        for k in MODES:
            p = next(r["peak_bytes"] for r in rows if r["kind"] == k and r["seq_len"] == t)
            cells.append(f"{p / 2**20:,.1f} | {p / base[k]:.2f}")
        lines.append(f"| {t:,} | " + " | ".join(cells) + " |")
    md = (
        "\n".join(lines)
        + f"\n\nsegment {a.segment}; d 128, 2 layers, 4 heads, fp32, batch 1; compiled gradient step, XLA:CPU buffer assignment"
    )
    with open(a.out + ".md", "w") as f:
        f.write(md + "\n")
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind in MODES:
        ax.plot(lengths, [r["peak_bytes"] / 2**20 for r in rows if r["kind"] == kind], "o-", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak MiB (compiled train step)")
    ax.set_title(f"Infini-attention (segment {a.segment}) vs full causal")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=120)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
