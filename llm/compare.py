"""Compare runs: `python -m llm.compare <workdir or sweep root>... [--out=DIR] [--sort=final_eval_loss]`.

Prints one row per run (final and best held-out loss and bits per byte, tokens/s, parameters,
wall_s: the seconds spent training, from the run's runs.jsonl (summed over launches; start-up,
evals and pauses between launches left out), and the config values that differ between the runs) and writes <out>/comparison.png
(train and held-out loss against step) and <out>/comparison.json. A directory without
metrics.jsonl is read as a sweep root: every sub-directory with one is a run.

`--metrics=model/attn_logit_max,model/moe_max_load` adds columns: the mean of each logged metric
over the last 10% of the run's logged steps (its value at the end of training, less noisy than one
step). `--seeds=train.seed` also prints one row per arm (runs equal in every differing key but
that one): mean over seeds and the spread (max - min) of held-out bits/byte, and the means of the
other columns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from llm.train import history

METRICS_FILE = "metrics.jsonl"
# Keys that differ between runs without changing what is trained.
IGNORED_KEYS = ("train.progress",)


@dataclass
class RunSummary:
    """What one run's files say about it (NaN where it never evaluated)."""

    name: str
    workdir: str
    final_eval_loss: float = math.nan
    best_eval_loss: float = math.nan
    final_eval_bpb: float = math.nan
    best_eval_bpb: float = math.nan
    final_train_loss: float = math.nan
    tokens_per_sec: float = math.nan
    n_params: int | None = None
    wall_s: float = math.nan
    last_step: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # flattened resolved config
    extra: dict[str, float] = field(default_factory=dict)  # --metrics: end-of-training values
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> (step, value)


def unfinished_runs(root: str) -> list[str]:
    """Sub-directories of a sweep root that a sweep set up but that logged no metrics (failed early)."""
    if not os.path.isdir(root) or os.path.isfile(os.path.join(root, METRICS_FILE)):
        return []
    return sorted(
        d
        for d in os.listdir(root)
        if os.path.isfile(os.path.join(root, d, "overrides.json"))
        and not os.path.isfile(os.path.join(root, d, METRICS_FILE))
    )


def find_runs(paths: list[str]) -> list[str]:
    """Workdirs named directly, or the runs (sub-directories with metrics) under a sweep root."""
    found: list[str] = []
    for p in paths:
        if os.path.isfile(os.path.join(p, METRICS_FILE)):
            found.append(p)
            continue
        if not os.path.isdir(p):
            raise FileNotFoundError(f"{p!r} is not a directory")
        subs = sorted(
            os.path.join(p, d) for d in os.listdir(p) if os.path.isfile(os.path.join(p, d, METRICS_FILE))
        )
        if not subs:
            raise FileNotFoundError(
                f"{p!r} has no {METRICS_FILE} and no run directories with one; train first"
            )
        found.extend(subs)
    return found


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "rules":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def end_value(rows: list[dict], key: str) -> float:
    """Mean of `key` over the last 10% (at least one) of the rows that log it; NaN if none do."""
    values = [r[key] for r in sorted(rows, key=lambda r: r["step"]) if key in r]
    if not values:
        return math.nan
    tail = values[-max(1, len(values) // 10) :]
    return sum(tail) / len(tail)


def summarize(workdir: str, name: str | None = None, metrics: tuple[str, ...] = ()) -> RunSummary:
    """Read <workdir>/metrics.jsonl (+ config.json, sweep_result.json) into a RunSummary."""
    from llm.train.metrics import read_metrics  # noqa: PLC0415

    rows = read_metrics(workdir)
    s = RunSummary(name=name or os.path.basename(os.path.normpath(workdir)), workdir=workdir)
    s.extra = {k: end_value(rows, k) for k in metrics}
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    # The final row (written once training ends) repeats the last step with only eval keys; a
    # resumed run re-logs steps, so keep the latest value per step.
    evals = sorted({r["step"]: r for r in rows if "eval_loss" in r}.values(), key=lambda r: r["step"])
    s.curves = {
        "loss": sorted(dict(train).items()),
        "eval_loss": [(r["step"], r["eval_loss"]) for r in evals],
        "eval_bpb": [(r["step"], r["eval_bpb"]) for r in evals if "eval_bpb" in r],
    }
    if train:
        s.final_train_loss = s.curves["loss"][-1][1]
    if evals:
        s.final_eval_loss, s.best_eval_loss = evals[-1]["eval_loss"], min(r["eval_loss"] for r in evals)
        bpb = [r["eval_bpb"] for r in evals if "eval_bpb" in r]
        if bpb:
            s.final_eval_bpb, s.best_eval_bpb = bpb[-1], min(bpb)
    # The first logged window includes compilation; the median of the rest is the steady rate.
    tps = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r]
    tps = tps[1:] if len(tps) > 1 else tps
    if tps:
        s.tokens_per_sec = sorted(tps)[len(tps) // 2]
    s.n_params = next((r["n_params"] for r in reversed(rows) if "n_params" in r), None)
    s.last_step = max((r["step"] for r in rows), default=0)
    result = _read_json(os.path.join(workdir, "sweep_result.json"))
    trained = history.training_seconds(workdir)
    if trained is not None:  # the loop's own clock, summed over launches: no pauses, no evals
        s.wall_s = trained
    elif "wall_s" in result:
        s.wall_s = float(result["wall_s"])
    else:
        times = [r["time"] for r in rows if "time" in r]
        if times:  # a lower bound: misses start-up and the first step's compilation
            s.wall_s = max(times) - min(times)
    cfg = _read_json(os.path.join(workdir, "config.json"))
    if cfg:
        s.config = _flatten(cfg)
    else:  # a run that never got as far as writing its config: fall back to the sweep's overrides
        s.config = dict(_read_json(os.path.join(workdir, "overrides.json")).get("overrides", {}))
    return s


def differing_keys(runs: list[RunSummary]) -> list[str]:
    """Config keys whose values are not all equal across the runs (in config order)."""
    keys: list[str] = []
    for r in runs:
        keys.extend(k for k in r.config if k not in keys)
    diff = []
    for k in keys:
        values = {json.dumps(r.config[k], sort_keys=True) if k in r.config else "<unset>" for r in runs}
        if len(values) > 1 and k not in IGNORED_KEYS:
            diff.append(k)
    return diff


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _fixed_width(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _mean(xs) -> float:
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else math.nan


def arms(runs: list[RunSummary], seed_key: str) -> list[dict[str, Any]]:
    """Runs grouped by every differing config key except `seed_key`: per arm the seeds, mean and
    spread (max - min) of final held-out bits/byte, mean tokens/s and mean of each extra metric.
    An arm is named by its runs' name without the seed part (sweep names: `arm=x,seed=0` -> `arm=x`)."""
    keys = [k for k in differing_keys(runs) if k != seed_key]
    short = seed_key.split(".")[-1] + "="
    groups: dict[tuple, list[RunSummary]] = {}
    names: dict[tuple, str] = {}
    for r in runs:
        key = tuple(json.dumps(r.config.get(k), sort_keys=True) for k in keys)
        groups.setdefault(key, []).append(r)
        names.setdefault(key, ",".join(p for p in r.name.split(",") if not p.startswith(short)) or "all")
    out = []
    for key, rs in groups.items():
        name = names[key]
        bpb = [r.final_eval_bpb for r in rs if not math.isnan(r.final_eval_bpb)]
        out.append({
            "arm": name, "seeds": [r.config.get(seed_key) for r in rs],
            "eval_bpb": _mean(bpb), "bpb_spread": (max(bpb) - min(bpb)) if bpb else math.nan,
            "tokens_per_sec": _mean([r.tokens_per_sec for r in rs]),
            **{k: _mean([r.extra.get(k, math.nan) for r in rs]) for k in (rs[0].extra or {})},
        })  # fmt: skip
    return sorted(out, key=lambda a: (math.isnan(a["eval_bpb"]), a["eval_bpb"]))


def arms_table(rows: list[dict[str, Any]]) -> str:
    extra = [k for k in rows[0] if k not in ("arm", "seeds", "eval_bpb", "bpb_spread", "tokens_per_sec")]
    head = ["arm", "seeds", "eval_bpb", "spread", "tok/s", *extra]
    body = [[a["arm"], str(len(a["seeds"])), _fmt(a["eval_bpb"]), _fmt(a["bpb_spread"]),
             _fmt(a["tokens_per_sec"], 0), *(_fmt(a[k], 3) for k in extra)] for a in rows]  # fmt: skip
    return _fixed_width(head, body)


def table(runs: list[RunSummary]) -> str:
    """A fixed-width text table, one row per run, plus one column per differing config key (and
    per --metrics key)."""
    diff = differing_keys(runs)
    extra = list(runs[0].extra) if runs else []
    head = [
        "run",
        "eval_loss",
        "best_loss",
        "eval_bpb",
        "best_bpb",
        "tok/s",
        "params",
        "wall_s",
        "step",
        *extra,
    ]
    head += [
        k.split(".")[-1] if [d.split(".")[-1] for d in diff].count(k.split(".")[-1]) == 1 else k for k in diff
    ]
    rows = []
    for r in runs:
        row = [r.name, _fmt(r.final_eval_loss), _fmt(r.best_eval_loss), _fmt(r.final_eval_bpb),
               _fmt(r.best_eval_bpb), _fmt(r.tokens_per_sec, 0), _fmt_params(r.n_params), _fmt(r.wall_s, 1),
               str(r.last_step), *(_fmt(r.extra[k], 3) for k in extra)]  # fmt: skip
        row += [_fmt(r.config.get(k)) for k in diff]
        rows.append(row)
    return _fixed_width(head, rows)


def plot_curves(runs: list[RunSummary], path: str | None = None, log_y: bool = False):
    """Train and held-out loss against step, one line per run; saved to `path` (PNG) if given.

    Uses matplotlib's object API (no pyplot), so it never changes a notebook's backend.
    """
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_train, ax_eval = fig.subplots(1, 2, sharey=True)
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        if r.curves.get("loss"):
            s, v = zip(*r.curves["loss"])
            ax_train.plot(s, v, color=color, label=r.name, lw=1.2)
        if r.curves.get("eval_loss"):
            s, v = zip(*r.curves["eval_loss"])
            ax_eval.plot(s, v, color=color, label=r.name, marker="o", ms=3, lw=1.2)
    for ax, title in ((ax_train, "train loss"), (ax_eval, "held-out loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log_y:
            ax.set_yscale("log")
    ax_train.set_ylabel("loss (nats/token)")
    ax_eval.legend(fontsize=7, loc="upper right")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def compare(paths: list[str], out: str | None = None, sort: str | None = "final_eval_loss",
            plot: bool = True, metrics: tuple[str, ...] = (), seeds: str | None = None
            ) -> tuple[list[RunSummary], str]:  # fmt: skip
    """Summaries of the runs under `paths`, the printed table (and the per-arm table with `seeds`),
    and (if out) PNG + JSON written there."""
    workdirs = find_runs(paths)
    roots = [os.path.abspath(p) for p in paths]
    names = []
    for w in workdirs:
        parent = next((r for r in roots if os.path.abspath(w).startswith(r + os.sep)), None)
        names.append(os.path.relpath(w, parent) if parent else os.path.basename(os.path.normpath(w)))
    runs = [summarize(w, n, tuple(metrics)) for w, n in zip(workdirs, names)]
    if sort == "name":
        runs.sort(key=lambda r: r.name)
    elif sort:  # NaN (never evaluated) last; tokens/s best first
        sign = -1 if sort == "tokens_per_sec" else 1
        runs.sort(key=lambda r: (math.isnan(getattr(r, sort)), sign * getattr(r, sort)))
    text = table(runs)
    arm_rows = arms(runs, seeds) if seeds and runs else None
    if arm_rows:
        text += f"\n\nper arm (mean over {seeds}; spread = max - min of eval_bpb):\n" + arms_table(arm_rows)
    if out:
        os.makedirs(out, exist_ok=True)
        if plot:
            plot_curves(runs, os.path.join(out, "comparison.png"))
        diff = differing_keys(runs)
        with open(os.path.join(out, "comparison.json"), "w") as f:
            rows = []
            for r in runs:
                d = {k: v for k, v in asdict(r).items() if k not in ("config", "curves")}
                d["differs"] = {k: r.config.get(k) for k in diff}
                rows.append(
                    {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
                )
            json.dump(rows, f, indent=2)
        if arm_rows:
            with open(os.path.join(out, "arms.json"), "w") as f:
                json.dump([{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in a.items()}
                           for a in arm_rows], f, indent=2)  # fmt: skip
    return runs, text


def default_out(paths: list[str]) -> str:
    """The one directory given (a sweep root or a run: never its parent), else the paths' common parent."""
    if len(paths) == 1:
        return paths[0]
    return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llm.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="run workdirs and/or sweep roots")
    p.add_argument(
        "--out",
        help="where comparison.png/json go (default: the one directory given, else the "
        "common parent of the paths)",
    )
    p.add_argument(
        "--sort",
        default="final_eval_loss",
        choices=("final_eval_loss", "best_eval_loss", "final_eval_bpb", "tokens_per_sec", "name"),
    )
    p.add_argument("--no_plot", action="store_true")
    p.add_argument("--metrics", default="", help="comma-separated logged metrics to add as columns "
                   "(end-of-training values), e.g. model/attn_logit_max,model/moe_max_load")  # fmt: skip
    p.add_argument("--seeds", default=None, help="config key that only changes the seed (e.g. train.seed): "
                   "also print mean and spread per arm")  # fmt: skip
    a = p.parse_args(argv)
    out = a.out or default_out(a.paths)
    metrics = tuple(m for m in a.metrics.split(",") if m)
    try:
        runs, text = compare(a.paths, out, a.sort, plot=not a.no_plot, metrics=metrics, seeds=a.seeds)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    for p in a.paths:
        missing = unfinished_runs(p)
        if missing:
            print(f"\nnot shown (no metrics.jsonl; see their train.log): {', '.join(missing)}")
    written = [os.path.join(out, "comparison.json")] + (
        [] if a.no_plot else [os.path.join(out, "comparison.png")]
    )
    print(f"\n{len(runs)} runs; wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
