"""Memory of fine-tuning a published shape three ways: all parameters (AdamW), LoRA, and LoRA on
an int8 base (QLoRA-style, `model.lora.base_quant=int8`).

  .venv/bin/python benchmarks/lora_memory.py [--presets=gpt2-124m,llama2-7b] [--compile=gpt2-124m]

Per preset: the train state (parameters + optimizer state) from abstract shapes, nothing
allocated. For the presets in --compile, also the compiled train step's peak per-device memory
from XLA's memory analysis (`launch.aot_check`, fake CPU devices; one device, batch 8 x 1024,
bf16 compute; remat dots_no_batch, the preset's, and full): an indication of the step's
temporaries on top of the state.
LoRA: rank 16 on every attention and MLP projection (`all_linear`). Writes
benchmarks/results/lora_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks import common  # noqa: E402

MODES = {
    "full": {},
    "lora": {"rank": 16, "targets": ("all_linear",)},
    "qlora": {"rank": 16, "targets": ("all_linear",), "base_quant": "int8"},
}
GiB = 2**30
REMATS = ("dots_no_batch", "full")  # the pretrain presets' policy, and full recomputation


def config(preset: str, mode: str, remat: str | None = None):
    from configs import pretrain  # noqa: PLC0415
    from llm.config import from_config_dict  # noqa: PLC0415

    c = pretrain.get_config(preset)
    c.model.vocab_size = c.model.vocab_size or 32_000
    c.train.batch_size, c.mesh.fsdp = 8, 1
    c.model.remat = remat or c.model.remat
    for k, v in MODES[mode].items():
        setattr(c.model.lora, k, v)
    if mode != "full":
        c.train.init_from = "/nonexistent/base"  # (only read when training starts)
    return from_config_dict(c)


def state_bytes(cfg) -> dict:
    import jax  # noqa: PLC0415

    from llm import sharding  # noqa: PLC0415
    from llm.train import state as state_lib  # noqa: PLC0415
    from llm.train.builder import build_trainer  # noqa: PLC0415

    abstract = build_trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1])).abstract_state
    nbytes = lambda t: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(t))  # noqa: E731
    return {"params": state_lib.count_params(abstract.params), "param_bytes": nbytes(abstract.params),
            "opt_bytes": nbytes(abstract.opt_state)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="gpt2-124m,llama2-7b")
    ap.add_argument("--compile", default="gpt2-124m", help="presets whose train step is compiled too")
    a = ap.parse_args()
    from launch import aot_check  # noqa: PLC0415

    rows = []
    for preset in a.presets.split(","):
        for mode in MODES:
            cfg = config(preset, mode)
            row = {"preset": preset, "mode": mode, **state_bytes(cfg)}
            row["state_gib"] = (row["param_bytes"] + row["opt_bytes"]) / GiB
            if preset in a.compile.split(","):
                for remat in REMATS:
                    report = aot_check.check(config(preset, mode, remat), aot_check.parse_topology("v5p:1x1x1"),
                                             force_cpu=True, log=lambda *_: None)  # fmt: skip
                    row[f"step_peak_gib_{remat}"] = report["peak_gib"]
            rows.append(row)
            print(row, flush=True)
    md = ["# Fine-tuning memory: full vs LoRA vs LoRA on an int8 base (`benchmarks/lora_memory.py`)", "",
          "LoRA rank 16 on all attention and MLP projections. State = parameters + AdamW state (fp32). Step",
          "peak: XLA's memory analysis of the compiled train step on one fake CPU device, batch 8 x 1024, bf16",
          "compute (indicative; a TPU/GPU compiler plans differently).", "",
          "| preset | mode | params | param bytes | optimizer state | state | step peak, remat dots_no_batch | "
          "step peak, remat full |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        peaks = [f"{r[f'step_peak_gib_{m}']:.2f} GiB" if f"step_peak_gib_{m}" in r else "—" for m in REMATS]
        md.append(f"| {r['preset']} | {r['mode']} | {r['params'] / 1e6:,.1f}M | {r['param_bytes'] / GiB:.2f} GiB | "
                  f"{r['opt_bytes'] / GiB:.3f} GiB | {r['state_gib']:.2f} GiB | " + " | ".join(peaks) + " |")  # fmt: skip
    common.write_results("lora_memory", {"host": common.host(), "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
