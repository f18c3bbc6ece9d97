"""Instruction tuning data (`data.kind=instructions`): Alpaca-style records, a prompt template,
and a loss on the response alone.

Records are JSON (a list) or JSONL with `instruction`, optional `input` and `output`. The split is
in file order by `data.instructions.split` (train, validation, test; 0.85/0.05/0.10 gives the
customary 935/55/110 of `instruction-data.json`). The template (registry TEMPLATES,
`data.instructions.template`) turns a record into a prompt; the response follows it, then EOS.
An example is one record per row (right-padded to `data.seq_len`, longer ones cut at the end) with
the language-modelling fields: tokens, targets, positions, segment_ids and loss_mask, where
loss_mask is 1 on the response's tokens and the EOS only (`data.instructions.prompt_loss` also
scores the prompt). So the ordinary `lm` task and its evaluation train and score it unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from llm.data.sources import DATA_SOURCES, DataSource, resolve_paths
from llm.registry import ConfigError, Registry

TEMPLATES: Registry = Registry("instruction template")
SPLITS = ("train", "validation", "test")


@TEMPLATES.register("alpaca")
def alpaca(rec: dict) -> str:
    """Stanford Alpaca's prompt (the one the instruction data was written for)."""
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{rec['instruction']}")  # fmt: skip
    if rec.get("input"):
        text += f"\n\n### Input:\n{rec['input']}"
    return text + "\n\n### Response:\n"


@TEMPLATES.register("phi3")
def phi3(rec: dict) -> str:
    """Phi-3's chat turns (shorter: fewer prompt tokens per example)."""
    body = rec["instruction"] + (f"\n{rec['input']}" if rec.get("input") else "")
    return f"<|user|>\n{body}\n<|assistant|>\n"


def read_records(spec: str) -> list[dict]:
    out: list[dict] = []
    for path in resolve_paths(spec):
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                recs = [json.loads(line) for line in f if line.strip()]
            else:
                recs = json.load(f)
        for n, r in enumerate(recs):
            if "instruction" not in r or "output" not in r:
                raise ConfigError(
                    f"{path} record {n} needs 'instruction' and 'output' (and optionally 'input')"
                )
            out.append(r)
    if not out:
        raise ValueError(f"data corpus {spec!r} has no instruction records")
    return out


def split_records(recs: list, fractions) -> dict[str, list]:
    bounds = np.round(np.cumsum(fractions) / np.sum(fractions) * len(recs)).astype(int)
    return {s: recs[lo:hi] for s, lo, hi in zip(SPLITS, np.r_[0, bounds[:-1]], bounds, strict=True)}


class InstructionExamples:
    """Random access to padded instruction examples with LM fields (a grain data source)."""

    shiftable = False

    def __init__(self, encoded: list[tuple[list[int], list[int]]], seq_len: int, eos: int, prompt_loss: bool,
                 pause_id: int | None = None):  # fmt: skip
        self.encoded, self.seq_len, self.eos, self.prompt_loss = encoded, seq_len, eos, prompt_loss
        self.pause_id = pause_id

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int, offset: int = 0) -> dict[str, np.ndarray]:
        prompt, response = self.encoded[i]
        return self.example(prompt, response)

    def example(self, prompt: list[int], response: list[int]) -> dict[str, np.ndarray]:
        t = self.seq_len
        ids = (prompt + response + [self.eos])[: t + 1]
        scored = np.zeros(t + 1, bool)  # scored[j]: token j is a target that counts
        scored[len(prompt) : len(ids)] = True
        if self.prompt_loss:
            scored[1 : len(ids)] = True
        chunk = np.zeros(t + 1, np.int32)
        chunk[: len(ids)] = ids
        real = np.arange(t) < len(ids) - 1  # input positions whose target is a real token
        if self.pause_id is not None:  # a pause is never a scored target (prompt_loss or not)
            scored &= chunk != self.pause_id
        return {"tokens": chunk[:-1], "targets": chunk[1:], "positions": np.arange(t, dtype=np.int32) * real,
                "segment_ids": real.astype(np.int32), "loss_mask": (scored[1:] & real).astype(np.float32)}  # fmt: skip

    def empty(self) -> dict[str, np.ndarray]:
        t = self.seq_len
        z = np.zeros(t, np.int32)
        return {
            "tokens": z,
            "targets": z,
            "positions": z,
            "segment_ids": z,
            "loss_mask": np.zeros(t, np.float32),
        }


@DATA_SOURCES.register("instructions")
class InstructionSource(DataSource):
    """`data.corpus` of instruction records -> train / validation / test examples."""

    def splits(self) -> dict[str, list[dict]]:
        if not hasattr(self, "_splits"):
            self._splits = split_records(read_records(self.cfg.corpus), self.cfg.instructions.split)
        return self._splits

    def template(self) -> Callable[[dict], str]:
        return TEMPLATES.get(self.cfg.instructions.template, "data.instructions.template")

    def documents(self) -> tuple[list[str], list[str]]:
        fmt, sp = self.template(), self.splits()
        return [fmt(r) + r["output"] for r in sp["train"]], [fmt(r) + r["output"] for r in sp["validation"]]

    def prompt_ids(self, tok, rec: dict) -> list[int]:
        """The prompt's ids: the template, then `data.pause.k` pause tokens (llm/data/pause.py)."""
        from llm.data.pause import append_pauses, pause_id  # noqa: PLC0415

        return append_pauses(tok.encode(self.template()(rec)), self.cfg.pause.k, pause_id(tok, self.cfg))

    def examples(self, tok, split: str) -> InstructionExamples:
        from llm.data.pause import pause_id  # noqa: PLC0415

        enc = [(self.prompt_ids(tok, r), tok.encode(r["output"])) for r in self.splits()[split]]
        return InstructionExamples(enc, self.cfg.seq_len, tok.eos_id, self.cfg.instructions.prompt_loss,
                                   pause_id(tok, self.cfg))  # fmt: skip

    def windows(self, tok):
        return self.examples(tok, "train"), self.examples(tok, "validation")
