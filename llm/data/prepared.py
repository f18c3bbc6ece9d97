"""Prepared datasets (`python -m llm.data.prepare` output) and how training reads them.

On disk, a directory (local or `gs://`, through etils.epath):

    manifest.json                          what is here, from what, how; written last (the commit)
    tokenizer/                             the tokenizer the ids come from (a run directory's files)
    tokens-00000-of-00004.arrayrecord ...  the token stream in records of `record_tokens` ids

The token stream is every kept document's ids followed by EOS, concatenated in input order: the
same stream the `text` source builds in memory. Record r holds ids [r*C, (r+1)*C) (C =
`record_tokens`; the last record may be shorter) and lives in shard r % n_shards at position
r // n_shards, so reading any token range touches one or two records whatever the shard count.
Records are raw little-endian ids (uint16 when the vocabulary fits, else uint32), one per
ArrayRecord chunk (group_size 1): a random read decodes only what it returns.

Training (`data.kind=arrayrecord`) cuts windows of `data.seq_len`+1 tokens from the stream on the
fly (`StreamWindows`): document boundaries come back from the EOS ids, so segment ids, positions
and loss masks equal the text path's. Start-up reads the manifest and opens the shards; nothing
grows with the corpus. Each process reads only the windows of its rows of each global batch
(llm/data/pipeline.py), the same global batches for any process count.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property

import numpy as np
from etils import epath

from llm import fs
from llm.data.pipeline import make_example
from llm.data.sources import DATA_SOURCES, DataSource
from llm.registry import ConfigError

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "llm.prepared/1"
WRITER_OPTIONS = "group_size:1"


def shard_name(i: int, n: int) -> str:
    return f"tokens-{i:05d}-of-{n:05d}.arrayrecord"


def read_manifest(path: str) -> dict:
    p = epath.Path(path) / MANIFEST
    if not p.exists():
        hint = "" if epath.Path(path).exists() else " (the directory does not exist)"
        raise FileNotFoundError(
            f"{path} is not a prepared dataset: no {MANIFEST}{hint}; make one with "
            f"python -m llm.data.prepare --input=<files> --output={path} --tokenizer=<run dir>"
        )
    m = json.loads(p.read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"{p}: format {m.get('format')!r}, this code reads {FORMAT!r}; prepare it again")
    return m


class TokenStream:
    """Random access to the token stream of a prepared dataset: `read(a, b)` -> ids [a, b)."""

    def __init__(self, path: str):
        import grain  # noqa: PLC0415

        self.path = path
        self.manifest = m = read_manifest(path)
        self.record_tokens, self.total = m["record_tokens"], m["total_tokens"]
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
        shards = m["shards"]
        self.n_shards = len(shards)
        files = [str(epath.Path(path) / s["file"]) for s in shards]
        missing = [f for f in files if not epath.Path(f).exists()]
        if missing:
            raise FileNotFoundError(
                f"{path}: shard {missing[0]} listed in {MANIFEST} is missing; prepare again"
            )
        # One data source over all shards: index = offset of the shard + position in it.
        self.offsets = np.concatenate([[0], np.cumsum([s["records"] for s in shards])])
        self.source = grain.sources.ArrayRecordDataSource(files)

    def __len__(self) -> int:
        return self.total

    def read(self, a: int, b: int) -> np.ndarray:
        c = self.record_tokens
        first, last = a // c, (b - 1) // c
        idx = [int(self.offsets[r % self.n_shards] + r // self.n_shards) for r in range(first, last + 1)]
        recs = self.source.__getitems__(idx) if len(idx) > 1 else [self.source[idx[0]]]
        ids = np.concatenate([np.frombuffer(r, self.dtype) for r in recs])
        return ids[a - first * c : b - first * c].astype(np.int32)


class StreamWindows:
    """Windows of seq_len+1 tokens over stream tokens [lo, hi): a grain random-access source with
    the `pipeline.PackedWindows` interface (`__getitem__(i, offset)`, `seq_len`, `shiftable`)."""

    shiftable = True

    def __init__(self, stream: TokenStream, lo: int, hi: int, seq_len: int, eos_id: int,
                 include_partial: bool):  # fmt: skip
        self.stream, self.lo, self.hi, self.seq_len, self.eos_id = stream, lo, hi, seq_len, eos_id
        n = hi - lo - 1
        self.n = max(0, n // seq_len) + int(include_partial and n > 0 and n % seq_len > 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int, offset: int = 0) -> dict[str, np.ndarray]:
        t = self.seq_len
        a = self.lo + i * t + offset
        chunk = self.stream.read(a, min(a + t + 1, self.hi))
        # A document's EOS belongs to it; the next id starts the next segment (as in the text path).
        seg = 1 + np.concatenate([[0], np.cumsum(chunk[:-1] == self.eos_id)]).astype(np.int32)
        if len(chunk) < t + 1:  # the last, partial window (held-out only): segment 0 is padding
            pad = t + 1 - len(chunk)
            chunk, seg = np.pad(chunk, (0, pad)), np.pad(seg, (0, pad))
        return make_example(chunk, seg)

    def decode_documents(self, tok) -> list[str]:
        """The texts of this range (for `llm.evaluate heldout`)."""
        ids = self.stream.read(self.lo, self.hi)
        cuts = np.flatnonzero(ids == self.eos_id) + 1
        return [tok.decode(d[d != self.eos_id].tolist()) for d in np.split(ids, cuts) if len(d)]


class ConcatWindows:
    """Several window sources one after another (the held-out sets of a mixture, together)."""

    shiftable = False

    def __init__(self, parts: list):
        self.parts, self.seq_len = parts, parts[0].seq_len
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        k = int(np.searchsorted(self.starts, i, side="right") - 1)
        return self.parts[k][i - int(self.starts[k])]


@dataclasses.dataclass
class Mixture:
    """Training windows of several datasets, drawn in proportion to `weights` (pipeline.train_dataset)."""

    names: list[str]
    components: list
    weights: list[float]

    @property
    def seq_len(self) -> int:
        return self.components[0].seq_len

    def __len__(self) -> int:
        return sum(len(c) for c in self.components)


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    path: str
    weight: float


def parse_mixture(entries) -> list[Component]:
    """data.mixture entries "name=path@weight" -> components (names unique, weights > 0)."""
    out: list[Component] = []
    for e in entries:
        name, sep, rest = e.partition("=")
        path, at, weight = rest.rpartition("@")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not (sep and at and name.strip() and path.strip()) or w <= 0:
            raise ConfigError(f"data.mixture entry {e!r}: expected 'name=<prepared dir>@<weight > 0>', "
                              f"e.g. 'web=/data/web@0.8'")  # fmt: skip
        if not name.replace("_", "").isalnum():
            raise ConfigError(f"data.mixture name {name!r}: letters, digits and _ only (it names metrics)")
        out.append(Component(name.strip(), path.strip(), w))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.mixture names must be unique; got {names}")
    return out


class PreparedDataset:
    """One prepared directory as a training and a held-out split of windows."""

    def __init__(self, path: str):
        self.path = path
        self.manifest = read_manifest(path)

    @cached_property
    def stream(self) -> TokenStream:
        return TokenStream(self.path)

    def split(self, seq_len: int, eos_id: int, eval_fraction: float | None):
        """(train, held-out) windows: the held-out split is the last `eval_fraction` of the stream's
        windows (None: no held-out split, all of it trains)."""
        total = self.manifest["total_tokens"]
        n = (total - 1) // seq_len
        if eval_fraction is None:
            return StreamWindows(self.stream, 0, total, seq_len, eos_id, include_partial=False), None
        n_eval = max(1, round(n * eval_fraction))
        if n - n_eval < 1:
            raise ValueError(f"{self.path}: {total} tokens are too few for a train and a held-out split "
                             f"of data.seq_len={seq_len}")  # fmt: skip
        cut = (n - n_eval) * seq_len
        return (StreamWindows(self.stream, 0, cut + 1, seq_len, eos_id, include_partial=False),
                StreamWindows(self.stream, cut, total, seq_len, eos_id, include_partial=True))  # fmt: skip

    def copy_tokenizer(self, workdir: str) -> None:
        fs.copy_tree(str(epath.Path(self.path) / TOKENIZER_DIR), workdir)


@DATA_SOURCES.register("arrayrecord")
class ArrayRecordSource(DataSource):
    """Prepared datasets: `data.path` (one) or `data.mixture` (several, weighted). The held-out
    split is `data.eval_path` (one dataset only) or the last `data.eval_fraction` of each
    dataset's stream; a mixture is evaluated on each dataset's held-out split separately
    (`eval_<name>_loss`, ...) and on all of them together (`eval_loss`). The tokenizer comes with
    the data (its `tokenizer/`), copied into the run directory."""

    def __init__(self, cfg):
        super().__init__(cfg)
        comps = parse_mixture(cfg.mixture) if cfg.mixture else [Component("data", cfg.path, 1.0)]
        self.components = comps
        self.datasets = [PreparedDataset(c.path) for c in comps]
        self.eval_sets: dict = {}
        hashes = {d.manifest["tokenizer"]["hash"] for d in self.datasets}
        if len(hashes) > 1:
            a = self.datasets[0]
            b = next(
                d for d in self.datasets if d.manifest["tokenizer"]["hash"] != a.manifest["tokenizer"]["hash"]
            )
            raise ConfigError(f"data.mixture: {a.path} and {b.path} were prepared with different tokenizers "
                              f"({a.manifest['tokenizer']['hash']} vs {b.manifest['tokenizer']['hash']}); "
                              f"prepare them with the same --tokenizer")  # fmt: skip
        kind = self.datasets[0].manifest["tokenizer"]["kind"]
        if kind != cfg.tokenizer.kind:
            raise ConfigError(f"{self.datasets[0].path} was tokenized by a {kind} tokenizer; set "
                              f"--config.data.tokenizer.kind={kind}")  # fmt: skip

    def copy_tokenizer(self, workdir: str) -> None:
        self.datasets[0].copy_tokenizer(workdir)

    def check_tokenizer(self, tok, workdir: str) -> None:
        from llm.data.tokenizers import fingerprint  # noqa: PLC0415

        have, want = fingerprint(tok), self.datasets[0].manifest["tokenizer"]["hash"]
        if have != want:
            raise ConfigError(f"the run's tokenizer ({workdir}, {have}) is not the one {self.datasets[0].path} "
                              f"was prepared with ({want}); use a new --workdir or prepare the data "
                              f"with --tokenizer={workdir}")  # fmt: skip

    def documents(self) -> tuple[list[str], list[str]]:
        from llm.data.tokenizers import load_tokenizer  # noqa: PLC0415

        d = self.datasets[0]
        tok = load_tokenizer(str(epath.Path(d.path) / TOKENIZER_DIR))
        _, eval_w = self.windows(tok)
        parts = eval_w.parts if isinstance(eval_w, ConcatWindows) else [eval_w]
        return [], [doc for p in parts for doc in p.decode_documents(tok)]

    def windows(self, tok):
        c = self.cfg
        own_eval = c.eval_path is not None
        splits = [
            d.split(c.seq_len, tok.eos_id, None if own_eval else c.eval_fraction) for d in self.datasets
        ]
        if own_eval:
            ev = PreparedDataset(c.eval_path)
            if ev.manifest["tokenizer"]["hash"] != self.datasets[0].manifest["tokenizer"]["hash"]:
                raise ConfigError(f"data.eval_path={c.eval_path} was prepared with another tokenizer than "
                                  f"{self.datasets[0].path}; prepare both with the same --tokenizer")  # fmt: skip
            total = ev.manifest["total_tokens"]
            splits = [(splits[0][0], StreamWindows(ev.stream, 0, total, c.seq_len, tok.eos_id, True))]
        if len(splits) == 1:
            return splits[0]
        self.eval_sets = {comp.name: ev for comp, (_, ev) in zip(self.components, splits)}
        train = Mixture([comp.name for comp in self.components], [tr for tr, _ in splits],
                        [comp.weight for comp in self.components])  # fmt: skip
        return train, ConcatWindows([ev for _, ev in splits])
