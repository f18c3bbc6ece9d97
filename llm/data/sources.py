"""Text sources: files and globs of .txt (one document per file) or .jsonl (one per line)."""

from __future__ import annotations

import glob
import json
import os

from llm.registry import ConfigError

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


def read_documents(spec: str, text_field: str = "text") -> list[str]:
    """All documents of the corpus, in a fixed order. Undecodable bytes are an error."""
    docs: list[str] = []
    for path in resolve_paths(spec):
        try:
            with open(path, encoding="utf-8") as f:
                if path.endswith(".jsonl"):
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            rec = json.loads(line)
                            if text_field not in rec:
                                raise ConfigError(f"{path}:{n} has no field {text_field!r}; "
                                                  f"set data.text_field")  # fmt: skip
                            docs.append(str(rec[text_field]))
                else:
                    docs.append(f.read())
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
