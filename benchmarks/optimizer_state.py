"""Optimizer state per parameter for each `optim.name` on real model presets (abstract shapes
only: nothing is allocated or compiled, so 7B models take seconds on a laptop).

  .venv/bin/python benchmarks/optimizer_state.py [--presets=gpt2-124m,llama2-7b,mixtral-8x7b]

The same figure `python -m launch.aot_check` prints for one config. Writes
benchmarks/results/optimizer_state.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks import common  # noqa: E402

OPTIMIZERS = ("adamw", "muon", "lion", "adafactor")


def bytes_per_param(preset: str, name: str) -> tuple[int, float]:
    import jax  # noqa: PLC0415

    from configs import pretrain  # noqa: PLC0415
    from llm import sharding  # noqa: PLC0415
    from llm.config import from_config_dict  # noqa: PLC0415
    from llm.train import state as state_lib  # noqa: PLC0415
    from llm.train.builder import build_trainer  # noqa: PLC0415

    c = pretrain.get_config(preset)
    c.optim.name = name
    if c.model.vocab_size is None:
        c.model.vocab_size = 32_000
    cfg = from_config_dict(c)
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    abstract = trainer.abstract_state
    n = state_lib.count_params(abstract.params)
    opt = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract.opt_state))
    return n, opt / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="gpt2-124m,llama2-7b,mixtral-8x7b")
    a = ap.parse_args()
    rows = []
    for preset in a.presets.split(","):
        for name in OPTIMIZERS:
            n, b = bytes_per_param(preset, name)
            rows.append({"preset": preset, "optimizer": name, "params": n, "bytes_per_param": b,
                         "gib": b * n / 2**30})  # fmt: skip
            print(rows[-1], flush=True)
    md = ["# Optimizer state per parameter (fp32 moments; abstract shapes, `benchmarks/optimizer_state.py`)", "",
          "| preset | params | " + " | ".join(OPTIMIZERS) + " |", "|---|---|" + "---|" * len(OPTIMIZERS)]  # fmt: skip
    for preset in dict.fromkeys(r["preset"] for r in rows):
        rs = {r["optimizer"]: r for r in rows if r["preset"] == preset}
        cells = [f"{rs[o]['bytes_per_param']:.2f} B ({rs[o]['gib']:.1f} GiB)" for o in OPTIMIZERS]
        md.append(f"| {preset} | {rs['adamw']['params'] / 1e9:.2f}B | " + " | ".join(cells) + " |")
    common.write_results("optimizer_state", {"host": common.host(), "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
