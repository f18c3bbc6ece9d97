"""Held-out bits/byte against training wall time: the project's default recipe vs the nanoGPT
character-level reference (benchmarks/nanogpt_char.py), both run on this host in one session.

  # on an idle machine, one after the other:
  .venv/bin/python -m llm.train --config=configs/shakespeare.py --workdir=/tmp/curve \\
      --config.train.eval_every=25 --config.train.progress=false
  .venv/bin/python benchmarks/nanogpt_char.py
  .venv/bin/python benchmarks/recipe_curve.py --workdir=/tmp/curve

The project's training time at step s is the sum over its log windows of the window's tokens /
tokens_per_sec (the loop's own clock: compilation in, evaluation out); nanoGPT's is its own
perf_counter sum, evaluation out. At each checkpoint time the table gives each curve's last
evaluation at or before it (no interpolation), so both are sampled about as often: every 25 steps
here (~17 s), every 250 iterations there (~20 s). Writes benchmarks/results/recipe_curve.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

CHECKPOINTS_S = (68, 300, 570)  # ~68 s, ~5 min, ~9.5 min: the reference points


def project_curve(workdir: str) -> list[dict]:
    from llm.train.metrics import read_metrics  # noqa: PLC0415

    cfg = json.load(open(os.path.join(workdir, "config.json")))
    tokens_per_step = cfg["train"]["batch_size"] * cfg["data"]["seq_len"]
    rows = sorted((r for r in read_metrics(workdir) if "step" in r), key=lambda r: r["step"])
    out, t, last_step = [], 0.0, 0
    for r in rows:
        if "tokens_per_sec" in r:
            t += (r["step"] - last_step) * tokens_per_step / r["tokens_per_sec"]
            last_step = r["step"]
        if "eval_bpb" in r:
            out.append({"step": r["step"], "train_s": t, "eval_bpb": r["eval_bpb"]})
    return out


def at(curve: list[dict], t: float) -> float | None:
    done = [p["eval_bpb"] for p in curve if p["train_s"] <= t]
    return done[-1] if done else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True, help="the project's default-recipe run (eval_every=25)")
    ap.add_argument("--nanogpt", default=os.path.join(common.RESULTS, "nanogpt_char.json"))
    a = ap.parse_args()
    ours = project_curve(a.workdir)
    ref = json.load(open(a.nanogpt))
    theirs = [{"step": p["iter"], "train_s": p["train_s"], "eval_bpb": p["eval_bpb"]} for p in ref["curve"]]
    table = [{"t_s": t, "project": at(ours, t), "nanogpt": at(theirs, t)} for t in CHECKPOINTS_S]
    result = {"host": common.host(), "nanogpt_host": ref.get("host"), "project": ours, "nanogpt": theirs,
              "at": table, "project_final": ours[-1], "nanogpt_final": theirs[-1]}  # fmt: skip

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve, marker, label in (
        (ours, "o-", "project default recipe"),
        (theirs, "s-", "nanoGPT char (PyTorch)"),
    ):
        ax.plot([p["train_s"] for p in curve], [p["eval_bpb"] for p in curve], marker, ms=3, label=label)
    for t in CHECKPOINTS_S:
        ax.axvline(t, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("training wall time (s), evaluation excluded")
    ax.set_ylabel("held-out bits per byte")
    ax.set_ylim(1.9, 3.2)
    ax.set_title(f"Shakespeare, same host ({result['host']['isa']}, {result['host']['cores']} cores)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(common.RESULTS, "recipe_curve.png"), dpi=110)

    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    md = ["# Held-out bits/byte at equal training time (`benchmarks/recipe_curve.py`)", "",
          f"Host: {result['host']['cpu']}, {result['host']['cores']} cores, {result['host']['isa']}.", "",
          "| training time | project default | nanoGPT char |", "|---|---|---|"]  # fmt: skip
    md += [f"| {r['t_s']} s | {fmt(r['project'])} | {fmt(r['nanogpt'])} |" for r in table]
    md += ["", f"Final: project {ours[-1]['eval_bpb']:.3f} at {ours[-1]['train_s']:.0f} s (step {ours[-1]['step']}); "
           f"nanoGPT {theirs[-1]['eval_bpb']:.3f} at {theirs[-1]['train_s']:.0f} s (iter {theirs[-1]['step']})."]  # fmt: skip
    common.write_results("recipe_curve", result, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
