"""MoE dispatch on this CPU: `dropless` (sort + ragged_dot) vs `dense` (one-hot einsums), side by side.

  .venv/bin/python benchmarks/moe.py [--configs=shakespeare] [--repeats=5]

Times the project's real train step (benchmarks/train_throughput.py, interleaved blocks on an idle
machine) for the config's dense model ("project") and the same model with MoE feed-forward layers
at equal active parameters: 4 experts of d_ff 2*D, top-2 (each token passes through 4*D FFN
columns, as in the dense model), with impl=dropless, impl=dense with capacity factor 1.25
(GShard) and impl=dense with room for every token (capacity 2.0 = nothing dropped).
Writes benchmarks/results/moe.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402


def variants(d_model: int) -> list[str]:
    moe = f"model.ffn.kind=moe;model.ffn.moe.num_experts=4;model.ffn.moe.top_k=2;model.ffn.moe.expert_d_ff={2 * d_model}"
    return [
        f"moe_dropless:{moe};model.ffn.moe.impl=dropless",
        f"moe_dense_cf1.25:{moe};model.ffn.moe.impl=dense;model.ffn.moe.capacity_factor=1.25",
        f"moe_dense_cf2:{moe};model.ffn.moe.impl=dense;model.ffn.moe.capacity_factor=2.0",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="shakespeare")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()
    for name in args.configs.split(","):
        cmd = [sys.executable, os.path.join(HERE, "train_throughput.py"), f"--configs={name}", f"--repeats={args.repeats}",
               f"--precision={args.precision}", "--no-torch", f"--out=moe_{name}_{args.precision}"]  # fmt: skip
        for v in variants(common.CONFIGS[name].d_model):
            cmd.append(f"--variant={v}")
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=ROOT)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
