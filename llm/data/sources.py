"""Data sources (`data.kind`) and corpus file readers (by extension).

`DATA_SOURCES` maps `data.kind` to a class that gives the training and held-out documents (what
a tokenizer is trained on) and, given the tokenizer, the packed windows the pipeline batches.
`text` (the default) reads files and globs: `READERS` maps an extension to a reader of documents,
`.txt` (one document per file; also any unknown extension) and `.jsonl` (one per line).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

from llm.registry import ConfigError, Registry

DATA_SOURCES: Registry = Registry("data source kind")
READERS: Registry = Registry("corpus file format")

CORPORA_DIR = os.path.join(os.path.dirname(__file__), "corpora")


def resolve_paths(spec: str) -> list[str]:
    """Comma-separated paths or globs; `builtin:<name>` is a corpus shipped in llm/data/corpora."""
    paths: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part.startswith("builtin:"):
            part = os.path.join(CORPORA_DIR, part[len("builtin:") :])
        matches = sorted(glob.glob(part)) if any(ch in part for ch in "*?[") else [part]
        for m in matches:
            if not os.path.isfile(m):
                raise FileNotFoundError(
                    f"data corpus path {m!r} does not exist; set --config.data.corpus to "
                    f"existing .txt/.jsonl files (comma-separated, globs allowed)"
                )
        if not matches:
            raise FileNotFoundError(f"data corpus glob {part!r} matched no files")
        paths.extend(matches)
    if not paths:
        raise ConfigError("data.corpus is empty; give at least one .txt or .jsonl path")
    return paths


@READERS.register(".txt")
def read_txt(path: str, text_field: str) -> Iterator[str]:
    """The whole file is one document."""
    with open(path, encoding="utf-8") as f:
        yield f.read()


@READERS.register(".jsonl")
def read_jsonl(path: str, text_field: str) -> Iterator[str]:
    """One JSON object per line; the document is its `text_field`."""
    with open(path, encoding="utf-8") as f:
        yield from _jsonl_lines(f, path, text_field)


def _jsonl_lines(lines, path: str, text_field: str) -> Iterator[str]:
    for n, line in enumerate(lines, 1):
        if line.strip():
            rec = json.loads(line)
            if text_field not in rec:
                raise ConfigError(f"{path}:{n} has no field {text_field!r}; set data.text_field")
            yield str(rec[text_field])


@READERS.register(".jsonl.gz")
def read_jsonl_gz(path: str, text_field: str) -> Iterator[str]:
    import gzip  # noqa: PLC0415

    with gzip.open(path, "rt", encoding="utf-8") as f:
        yield from _jsonl_lines(f, path, text_field)


@READERS.register(".jsonl.zst")
def read_jsonl_zst(path: str, text_field: str) -> Iterator[str]:
    import io  # noqa: PLC0415

    import zstandard  # noqa: PLC0415

    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as z:
        yield from _jsonl_lines(io.TextIOWrapper(z, encoding="utf-8"), path, text_field)


@READERS.register(".parquet")
def read_parquet(path: str, text_field: str) -> Iterator[str]:
    """Column `text_field`, read a row group batch at a time (never the whole file)."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    f = pq.ParquetFile(path)
    if text_field not in f.schema_arrow.names:
        raise ConfigError(
            f"{path} has no column {text_field!r} (it has {f.schema_arrow.names}); set the text field"
        )
    for batch in f.iter_batches(columns=[text_field], batch_size=1024):
        yield from (str(t) for t in batch.column(0).to_pylist() if t is not None)


def reader_for(path: str):
    """The reader of the longest registered extension `path` ends with; `.txt` for any other."""
    name = os.path.basename(path)
    ext = max((e for e in READERS.names() if name.endswith(e)), key=len, default=".txt")
    return READERS.get(ext)


def read_documents(spec: str, text_field: str = "text") -> list[str]:
    """All documents of the corpus, in a fixed order. Undecodable bytes are an error."""
    docs: list[str] = []
    for path in resolve_paths(spec):
        try:
            docs.extend(reader_for(path)(path, text_field))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not valid UTF-8 ({e}); re-encode the file as UTF-8") from e
    docs = [d for d in docs if d]
    if not docs or not any(d.strip() for d in docs):
        raise ValueError(f"data corpus {spec!r} is empty: no text found")
    return docs


def split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last `eval_fraction`: of the documents if there are many, else of each text.

    A single long text (tiny Shakespeare) is cut at a line boundary, so both halves are whole lines.
    """
    if len(docs) * eval_fraction >= 1:
        n_eval = max(1, round(len(docs) * eval_fraction))
        return docs[:-n_eval], docs[-n_eval:]
    train, held = [], []
    for d in docs:
        cut = int(len(d) * (1 - eval_fraction))
        nl = d.rfind("\n", 0, cut)
        cut = nl + 1 if nl > 0 else cut
        train.append(d[:cut])
        held.append(d[cut:])
    return train, held


def split_corpus(spec: str, eval_fraction: float, text_field: str = "text") -> tuple[list[str], list[str]]:
    """(train, held-out) documents of a corpus spec, each comma-separated entry split on its own
    (`split_documents`): in `passkeys.jsonl,builtin:tinyshakespeare.txt` the 8,000 passkey
    documents hold out their last tenth and Shakespeare, one long text, its own tail (split as
    one list, the held-out tenth of 8,001 documents would be Shakespeare whole)."""
    train, held = [], []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        t, h = split_documents(read_documents(part, text_field), eval_fraction)
        train += t
        held += h
    return train, held


class DataSource:
    """Interface: `documents()` -> (train, held-out) texts; `windows(tok)` -> (train, held-out)
    `pipeline.PackedWindows`-like random-access sources of examples."""

    def __init__(self, cfg):
        self.cfg = cfg  # the DataConfig

    def documents(self) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def windows(self, tok):
        raise NotImplementedError


@DATA_SOURCES.register("text")
class TextSource(DataSource):
    """Files and globs of text (`data.corpus`); the held-out split is `data.eval_corpus` or the
    last `data.eval_fraction` of each comma-separated entry of the corpus (`split_corpus`). Documents are tokenized, joined with EOS and packed
    into windows of `data.seq_len` + 1 tokens."""

    def documents(self) -> tuple[list[str], list[str]]:
        if not hasattr(self, "_docs"):
            c = self.cfg
            if c.eval_corpus:
                self._docs = (
                    read_documents(c.corpus, c.text_field),
                    read_documents(c.eval_corpus, c.text_field),
                )
            else:
                self._docs = split_corpus(c.corpus, c.eval_fraction, c.text_field)
        return self._docs

    def windows(self, tok):
        from llm.data import pipeline  # noqa: PLC0415
        from llm.data.pause import pause_id  # noqa: PLC0415

        train_docs, eval_docs = self.documents()
        t, pid, rate = self.cfg.seq_len, pause_id(tok, self.cfg), self.cfg.pause.rate
        train_w = pipeline.PackedWindows(*pipeline.tokenize(train_docs, tok, rate, pid, self.cfg.seed), t,
                                         include_partial=False, pause_id=pid)  # fmt: skip
        # Held out without inserted pauses: the loss of the text itself (pauses are never scored).
        eval_w = pipeline.PackedWindows(
            *pipeline.tokenize(eval_docs, tok), t, include_partial=True, pause_id=pid
        )
        if len(eval_w) == 0:
            raise ValueError("the held-out split is empty; raise data.eval_fraction or set data.eval_corpus")
        return train_w, eval_w


def _load_all() -> None:
    """Import the modules that register further data sources."""
    from llm.data import classification, instructions, preferences, prepared  # noqa: F401, PLC0415  (register kinds)


def source_for(cfg) -> DataSource:
    """The data source of a DataConfig."""
    _load_all()
    return DATA_SOURCES.get(cfg.kind, "data.kind")(cfg)
