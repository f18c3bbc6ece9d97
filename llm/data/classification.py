"""Labelled texts for sequence classification (`data.kind=classification`, `train.task=classify`).

The corpus is TSV (`label<TAB>text` per line, the SMS Spam Collection's format) or JSONL (fields
`data.text_field` and `data.classification.label_field`). Splits are deterministic and stratified:
per class, the examples are shuffled with `data.seed` and cut by `data.classification.split`
(train / validation / test), so every split keeps the class proportions. Training evaluates on
validation; `llm.evaluate` reports the test split.

An example is one text, tokenized, cut to `data.seq_len` tokens (the end is kept: the classifier
reads the last real token) and right-padded: fields tokens / positions / segment_ids [T] (segment
0 = padding), label [] (int) and weight [] (1 for a real example, 0 for the padding rows of the
last eval batch). With `data.classification.balanced` the training split repeats examples of the
smaller classes until every class has as many as the largest.
"""

from __future__ import annotations

import csv
import json

import numpy as np

from llm.data.sources import DATA_SOURCES, DataSource, resolve_paths
from llm.registry import ConfigError

SPLITS = ("train", "validation", "test")


def read_labelled(spec: str, text_field: str, label_field: str) -> list[tuple[str, str]]:
    """(label, text) pairs of every file in `spec`, in file order."""
    out: list[tuple[str, str]] = []
    for path in resolve_paths(spec):
        with open(path, encoding="utf-8", newline="") as f:
            if path.endswith((".jsonl", ".json")):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        rec = json.loads(line)
                        if text_field not in rec or label_field not in rec:
                            raise ConfigError(f"{path}:{n} needs fields {text_field!r} and {label_field!r}")
                        out.append((str(rec[label_field]), str(rec[text_field])))
            else:
                for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                    if not row:
                        continue
                    if len(row) < 2:
                        raise ConfigError(f"{path}:{n} is not 'label<TAB>text'")
                    out.append((row[0], "\t".join(row[1:])))
    if not out:
        raise ValueError(f"data corpus {spec!r} has no labelled examples")
    return out


def stratified_split(labels: np.ndarray, fractions, seed: int) -> dict[str, np.ndarray]:
    """Example indices per split: each class shuffled with `seed` and cut by `fractions`."""
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.round(np.cumsum(fractions) / np.sum(fractions) * len(idx)).astype(int)
        for s, lo, hi in zip(SPLITS, np.r_[0, bounds[:-1]], bounds, strict=True):
            parts[s].append(idx[lo:hi])
    return {s: np.sort(np.concatenate(v)) for s, v in parts.items()}


class LabelledExamples:
    """Random access to padded classification examples (a grain data source)."""

    shiftable = False  # whole examples: no stream to tile from another offset

    def __init__(
        self, ids: list[np.ndarray], labels: np.ndarray, seq_len: int, order: np.ndarray | None = None
    ):
        self.ids, self.labels, self.seq_len = ids, labels, seq_len
        self.order = np.arange(len(ids)) if order is None else order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int, offset: int = 0) -> dict[str, np.ndarray]:
        j = int(self.order[i])
        return self.example(self.ids[j][-self.seq_len :], int(self.labels[j]), 1.0)

    def example(self, ids: np.ndarray, label: int, weight: float) -> dict[str, np.ndarray]:
        t = self.seq_len
        tokens = np.zeros(t, np.int32)
        tokens[: len(ids)] = ids
        seg = (np.arange(t) < len(ids)).astype(np.int32)
        return {"tokens": tokens, "positions": np.arange(t, dtype=np.int32) * seg, "segment_ids": seg,
                "label": np.int32(label), "weight": np.float32(weight)}  # fmt: skip

    def empty(self) -> dict[str, np.ndarray]:
        """A padding row (weight 0) for the last eval batch."""
        return self.example(np.zeros(0, np.int32), 0, 0.0)


@DATA_SOURCES.register("classification")
class ClassificationSource(DataSource):
    """`data.corpus` of labelled texts -> stratified train / validation / test examples."""

    def _load(self):
        if not hasattr(self, "_pairs"):
            c = self.cfg
            pairs = read_labelled(c.corpus, c.text_field, c.classification.label_field)
            names = list(c.classification.labels) or sorted({lab for lab, _ in pairs})
            unknown = sorted({lab for lab, _ in pairs} - set(names))
            if unknown:
                raise ConfigError(f"labels {unknown} are not in data.classification.labels={names}")
            self.label_names = names
            self._labels = np.asarray([names.index(lab) for lab, _ in pairs], np.int32)
            self._texts = [t for _, t in pairs]
            self.split_index = stratified_split(self._labels, c.classification.split, c.seed)
        return self._texts, self._labels

    def documents(self) -> tuple[list[str], list[str]]:
        texts, _ = self._load()
        return [texts[i] for i in self.split_index["train"]], [
            texts[i] for i in self.split_index["validation"]
        ]

    def examples(self, tok, split: str) -> LabelledExamples:
        texts, labels = self._load()
        from llm.data.pause import append_pauses, pause_id  # noqa: PLC0415

        idx = self.split_index[split]
        pid, k = pause_id(tok, self.cfg), self.cfg.pause.k  # the classifier reads the last pause's state
        ids = [np.asarray(append_pauses(tok.encode(texts[i]), k, pid), np.int32) for i in idx]
        order = None
        if split == "train" and self.cfg.classification.balanced:
            order = balanced_order(labels[idx], self.cfg.seed)
        return LabelledExamples(ids, labels[idx], self.cfg.seq_len, order)

    def windows(self, tok):
        return self.examples(tok, "train"), self.examples(tok, "validation")


def balanced_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices where every class appears as often as the largest (smaller ones repeated, cycling
    through a seeded shuffle so each of their examples is used as evenly as possible)."""
    rng = np.random.default_rng([seed, 1])
    most = int(np.max(np.bincount(labels)))
    out = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        out.append(np.resize(idx, most))
    return np.sort(np.concatenate(out))
