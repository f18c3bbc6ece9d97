"""Preference pairs for DPO (`data.kind=preferences`, `train.task=dpo`; llm/train/dpo.py).

Records are JSON or JSONL, either `{prompt, chosen, rejected}` or the instruction shape with a
model's answer, `{instruction, input, output, model_response}` (instruction-data-with-response.json):
there the gold `output` is chosen, the `model_response` rejected and the prompt is the instruction
template (`data.instructions.template`). Split in file order by `data.preference_split`
(train, validation). An example holds both completions with the language-modelling fields under
`chosen_*` / `rejected_*` (loss_mask on the response tokens and EOS: the log-probability DPO
compares), the reference model's log-probabilities `ref_chosen` / `ref_rejected` (filled by the
task before training) and `weight` (0 on padding rows).
"""

from __future__ import annotations

import json

import numpy as np

from llm.data.instructions import TEMPLATES, InstructionExamples
from llm.data.sources import DATA_SOURCES, DataSource, resolve_paths
from llm.registry import ConfigError

SIDES = ("chosen", "rejected")


def read_pairs(spec: str, template) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) per record."""
    out = []
    for path in resolve_paths(spec):
        with open(path, encoding="utf-8") as f:
            recs = [json.loads(x) for x in f if x.strip()] if path.endswith(".jsonl") else json.load(f)
        for n, r in enumerate(recs):
            if {"prompt", "chosen", "rejected"} <= set(r):
                out.append((r["prompt"], r["chosen"], r["rejected"]))
            elif {"instruction", "output", "model_response"} <= set(r):
                out.append((template(r), r["output"], r["model_response"]))
            else:
                raise ConfigError(
                    f"{path} record {n}: need prompt/chosen/rejected or instruction/output/model_response"
                )
    if not out:
        raise ValueError(f"data corpus {spec!r} has no preference pairs")
    return out


class PreferenceExamples:
    """Random access to padded preference pairs (a grain data source)."""

    shiftable = False

    def __init__(self, encoded: list[tuple[list[int], list[int], list[int]]], seq_len: int, eos: int):
        self.encoded = encoded
        self.one = InstructionExamples([], seq_len, eos, prompt_loss=False)
        self.seq_len = seq_len
        self.ref = np.zeros((len(encoded), 2), np.float32)  # reference log-probs (chosen, rejected)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int, offset: int = 0) -> dict[str, np.ndarray]:
        prompt, chosen, rejected = self.encoded[i]
        out = {f"chosen_{k}": v for k, v in self.one.example(prompt, chosen).items()}
        out.update({f"rejected_{k}": v for k, v in self.one.example(prompt, rejected).items()})
        out.update(ref_chosen=self.ref[i, 0], ref_rejected=self.ref[i, 1], weight=np.float32(1.0))
        return out

    def empty(self) -> dict[str, np.ndarray]:
        e = self.one.empty()
        out = {f"{side}_{k}": v for side in SIDES for k, v in e.items()}
        return {**out, "ref_chosen": np.float32(0), "ref_rejected": np.float32(0), "weight": np.float32(0)}


@DATA_SOURCES.register("preferences")
class PreferenceSource(DataSource):
    def pairs(self) -> dict[str, list]:
        if not hasattr(self, "_pairs"):
            template = TEMPLATES.get(self.cfg.instructions.template, "data.instructions.template")
            pairs = read_pairs(self.cfg.corpus, template)
            frac = np.asarray(self.cfg.preference_split, float)
            n_train = int(round(frac[0] / frac.sum() * len(pairs)))
            self._pairs = {"train": pairs[:n_train], "validation": pairs[n_train:]}
        return self._pairs

    def documents(self) -> tuple[list[str], list[str]]:
        p = self.pairs()
        return [a + b for a, b, _ in p["train"]], [a + b for a, b, _ in p["validation"]]

    def examples(self, tok, split: str) -> PreferenceExamples:
        enc = [(tok.encode(a), tok.encode(b), tok.encode(c)) for a, b, c in self.pairs()[split]]
        return PreferenceExamples(enc, self.cfg.seq_len, tok.eos_id)

    def windows(self, tok):
        return self.examples(tok, "train"), self.examples(tok, "validation")
