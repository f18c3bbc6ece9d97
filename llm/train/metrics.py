"""Metric sinks: <workdir>/metrics.jsonl (one object per logged step) and TensorBoard events."""

from __future__ import annotations

import json
import os
import time

import jax


class MetricWriter:
    """Writes only on process 0; other processes get a silent writer."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            self.f = open(self.path, "a")
            if tensorboard:
                from tensorboardX import SummaryWriter  # noqa: PLC0415

                self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), "time": time.time(), **{k: _py(v) for k, v in metrics.items()}}
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.active:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def _py(v):
    try:
        return v.item()
    except AttributeError:
        return v


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
