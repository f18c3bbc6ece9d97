"""Metric sinks: <workdir>/metrics.jsonl (one object per logged step) and TensorBoard events."""

from __future__ import annotations

import json
import time

import jax

from llm import fs


class MetricWriter:
    """Writes only on process 0; other processes get a silent writer. With a gs:// workdir both
    sinks are written locally and uploaded every `sync_every_s` and at close (llm/fs.py)."""

    def __init__(self, workdir: str, tensorboard: bool = True, sync_every_s: float = 60.0):
        self.active = jax.process_index() == 0
        self.tb = None
        if self.active:
            self.mirror = fs.Mirror(workdir, ("metrics.jsonl", "tb"), every_s=sync_every_s)
            self.path = self.mirror.path("metrics.jsonl")
            self.f = open(self.path, "a")
            if tensorboard:
                from tensorboardX import SummaryWriter  # noqa: PLC0415

                self.tb = SummaryWriter(self.mirror.path("tb"))

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
        if self.mirror.remote is not None:
            if self.tb is not None:
                self.tb.flush()
            self.mirror.sync()

    def close(self) -> None:
        if self.active:
            self.f.close()
            if self.tb is not None:
                self.tb.close()
            self.mirror.close()


def _py(v):
    try:
        return v.item()
    except AttributeError:
        return v


def read_metrics(workdir: str) -> list[dict]:
    text = fs.read_text(fs.join(workdir, "metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines() if line.strip()]
