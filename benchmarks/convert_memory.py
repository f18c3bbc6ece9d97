"""Peak memory of a Hugging Face import and export (llm/convert) against the size of the model.

    .venv/bin/python benchmarks/convert_memory.py [--preset=gpt2] [--out=benchmarks/results/convert_memory]

Builds a randomly initialised `transformers` model of a published shape (GPT-2 124M by default,
498 MB of fp32 parameters), saves it with `save_pretrained`, then runs the import and the export
each in a fresh process and reads its peak resident memory (`ru_maxrss`) and its resident memory
after the imports but before converting (the interpreter, jax, flax, orbax). What the conversion
adds = peak - baseline; the goal is < 1.5x one copy of the parameters. Writes <out>.json/.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r"""
import json, os, resource, sys
sys.path.insert(0, {root!r})
import psutil
from llm import convert
import llm.api, llm.checkpoint, orbax.checkpoint  # noqa: F401  (imported before the baseline)
base = psutil.Process().memory_info().rss
what, src, dst = sys.argv[1:4]
if what == "import":
    convert.import_hf(src, dst, tokenizer="gpt2", progress=False)
else:
    convert.export_hf(src, dst, progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"baseline_rss": base, "peak_rss": peak}}))
"""


def run_child(what: str, src: str, dst: str) -> dict:
    code = CHILD.format(root=ROOT)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code, what, src, dst], capture_output=True, text=True, env=env,
                         check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "convert_memory"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, run_dir, out_dir = (os.path.join(tmp, x) for x in ("hf", "run", "exported"))
        # The HF model is made in its own process: Linux keeps a parent's peak RSS in a forked
        # child's ru_maxrss, so this process stays small (no torch) for the measured children.
        make = (
            "import sys, torch, transformers; torch.manual_seed(0); m = transformers.GPT2LMHeadModel("
            "transformers.GPT2Config()); m.save_pretrained(sys.argv[1]); print(sum(p.numel() for p in m.parameters()))"
        )
        made = subprocess.run(
            [sys.executable, "-c", make, hf_dir], capture_output=True, text=True, check=True
        )
        n_params = int(made.stdout.strip().splitlines()[-1])
        model_bytes = 4 * n_params
        rows = {}
        for what, src, dst in (("import", hf_dir, run_dir), ("export", run_dir, out_dir)):
            r = run_child(what, src, dst)
            r["added"] = r["peak_rss"] - r["baseline_rss"]
            r["added_per_copy"] = r["added"] / model_bytes
            rows[what] = r
            print(f"{what}: baseline {r['baseline_rss'] / 2**20:,.0f} MiB, peak {r['peak_rss'] / 2**20:,.0f} MiB, "
                  f"added {r['added'] / 2**20:,.0f} MiB = {r['added_per_copy']:.2f}x the parameters", flush=True)  # fmt: skip
    result = {"model": "gpt2-124m (random init)", "n_params": n_params, "param_bytes": model_bytes, **rows}
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = [
        "| step | baseline RSS MiB | peak RSS MiB | added MiB | added / one fp32 copy |",
        "|---|---|---|---|---|",
    ]
    for what, r in rows.items():
        lines.append(f"| {what} | {r['baseline_rss'] / 2**20:,.0f} | {r['peak_rss'] / 2**20:,.0f} | "
                     f"{r['added'] / 2**20:,.0f} | {r['added_per_copy']:.2f}× |")  # fmt: skip
    md = (
        "\n".join(lines)
        + f"\n\nGPT-2 124M, {n_params:,} parameters = {model_bytes / 2**20:,.0f} MiB in fp32; fresh process each\n"
    )
    with open(a.out + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
