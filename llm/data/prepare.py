"""`python -m llm.data.prepare`: raw text -> cleaned, deduplicated, tokenized ArrayRecord shards.

    python -m llm.data.prepare --input='data/*.jsonl.zst,extra.parquet' --output=/data/prep \\
        --tokenizer=runs/shakespeare --shards=16

then train with `--config.data.kind=arrayrecord --config.data.path=/data/prep` (llm/data/prepared.py
has the format). Documents stream through, in input order, in batches:

  workers (processes): normalise and filter (llm/data/clean.py), the exact-duplicate key and
      MinHash signature (llm/data/dedup.py), tokenize;
  this process: drop exact and near duplicates of earlier kept documents, append the ids + EOS
      to the token stream, write records round-robin to the shards.

At most `4 x workers` batches are in flight, so input larger than memory streams through (the
dedup index grows by ~2.5 KB per kept document). The output does not depend on the number of
workers. The manifest, written last, records the inputs (path, size, mtime), the options, the
tokenizer's fingerprint and what was dropped and why; a second run with the same inputs and
options finds it and does nothing. Inputs: .txt (`--txt_documents`: the file, its blank-line
separated paragraphs, or its lines, each a document), .jsonl, .jsonl.gz, .jsonl.zst, .parquet.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator

import numpy as np

from llm.data import clean, dedup
from llm.data.prepared import FORMAT, MANIFEST, TOKENIZER_DIR, WRITER_OPTIONS, shard_name
from llm.data.sources import reader_for, resolve_paths
from llm.registry import ConfigError

TXT_DOCUMENTS = ("file", "paragraphs", "lines")


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    shards: int = 4
    record_tokens: int = 2048  # ids per ArrayRecord record (a window reads one or two)
    text_field: str = "text"  # .jsonl / .parquet
    txt_documents: str = "file"  # file | paragraphs | lines
    clean: clean.CleanOptions = dataclasses.field(default_factory=clean.CleanOptions)
    exact_dedup: bool = True
    near_dedup: bool = True
    near_threshold: float = 0.8  # estimated Jaccard similarity of word shingles
    num_perm: int = 128
    shingle: int = 5  # words per shingle

    def __post_init__(self):
        if self.shards < 1 or self.record_tokens < 1:
            raise ConfigError("--shards and --record_tokens must be >= 1")
        if self.txt_documents not in TXT_DOCUMENTS:
            raise ConfigError(f"--txt_documents={self.txt_documents!r}: one of {', '.join(TXT_DOCUMENTS)}")
        if not 0 < self.near_threshold <= 1:
            raise ConfigError("--near_threshold must be in (0, 1]")


# ---- reading --------------------------------------------------------------------------------


def iter_documents(paths: list[str], opt: PrepareOptions) -> Iterator[str]:
    for path in paths:
        reader = reader_for(path)
        if reader.__name__ == "read_txt" and opt.txt_documents != "file":
            yield from _txt_units(path, opt.txt_documents)
        else:
            yield from reader(path, opt.text_field)


def _txt_units(path: str, mode: str) -> Iterator[str]:
    """Lines, or paragraphs (runs of non-blank lines), streamed from a text file."""
    with open(path, encoding="utf-8") as f:
        para: list[str] = []
        for line in f:
            if mode == "lines":
                yield line
            elif line.strip():
                para.append(line)
            elif para:
                yield "".join(para)
                para = []
        if para:
            yield "".join(para)


# ---- the workers ------------------------------------------------------------------------------

_worker: dict = {}


def _init_worker(tokenizer_dir: str, opt: PrepareOptions) -> None:
    from llm.data.tokenizers import load_tokenizer  # noqa: PLC0415

    _worker.update(tok=load_tokenizer(tokenizer_dir), opt=opt,
                   minhash=dedup.MinHasher(opt.num_perm, opt.shingle))  # fmt: skip


def _process(docs: list[str]) -> list[tuple]:
    """Per document: (reason, None, None, None, chars) if filtered, else (None, exact key,
    signature or None, ids, chars)."""
    tok, opt, mh = _worker["tok"], _worker["opt"], _worker["minhash"]
    out = []
    for raw in docs:
        text = clean.normalize(raw)
        words = clean.WORD.findall(text.lower())
        reason = clean.reject_reason(text, opt.clean, words)
        if reason:
            out.append((reason, text[:100], None, None, len(raw)))
            continue
        key = dedup.exact_key(text) if opt.exact_dedup else None
        sig = mh.signature(words) if opt.near_dedup else None
        out.append((None, key, sig, np.asarray(tok.encode(text), np.int32), len(raw)))
    return out


def _batches(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _ordered(batches: Iterator[list[str]], workers: int) -> Iterator[list[tuple]]:
    """`_process` over the batches, results in input order, at most 4 x workers batches in flight."""
    if workers <= 1:
        yield from map(_process, batches)
        return
    ctx = multiprocessing.get_context("spawn")  # the caller may have threads (JAX); never fork them
    with ctx.Pool(workers, _init_worker, (_worker["tokenizer_dir"], _worker["opt"])) as pool:
        pending: collections.deque = collections.deque()
        for b in batches:
            pending.append(pool.apply_async(_process, (b,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- writing ----------------------------------------------------------------------------------


class ShardWriter:
    """The token stream as records of `record_tokens` ids, record r to shard r % n (see prepared.py)."""

    def __init__(self, directory: str, n: int, record_tokens: int, dtype: np.dtype, eos_id: int):
        from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

        self.paths = [os.path.join(directory, shard_name(i, n)) for i in range(n)]
        self.writers = [ArrayRecordWriter(p + ".tmp", WRITER_OPTIONS) for p in self.paths]
        self.c, self.dtype, self.eos_id = record_tokens, dtype, eos_id
        self.buf: list[np.ndarray] = []
        self.buffered = self.records = self.total = 0
        self.stats = [
            {"file": os.path.basename(p), "records": 0, "tokens": 0, "documents": 0} for p in self.paths
        ]

    def add(self, ids: np.ndarray) -> None:
        self.buf.append(ids)
        self.buffered += len(ids)
        if self.buffered >= self.c:
            flat = np.concatenate(self.buf)
            n_full = len(flat) // self.c
            for k in range(n_full):
                self._emit(flat[k * self.c : (k + 1) * self.c])
            rest = flat[n_full * self.c :]
            self.buf, self.buffered = [rest], len(rest)

    def _emit(self, rec: np.ndarray) -> None:
        s = self.records % len(self.writers)
        self.writers[s].write(rec.astype(self.dtype).tobytes())
        st = self.stats[s]
        st["records"] += 1
        st["tokens"] += len(rec)
        st["documents"] += int(np.sum(rec == self.eos_id))
        self.records += 1
        self.total += len(rec)

    def close(self) -> None:
        if self.buffered:
            self._emit(np.concatenate(self.buf))
        for w, p in zip(self.writers, self.paths):
            w.close()
            os.replace(p + ".tmp", p)


# ---- the command ------------------------------------------------------------------------------


def resolve_tokenizer(spec: str):
    """`byte` | `gpt2` | a run directory | a SentencePiece .model | a Hugging Face tokenizer.json."""
    from llm.config import TokenizerConfig  # noqa: PLC0415
    from llm.data.tokenizers import META_FILE, TOKENIZERS, load_tokenizer  # noqa: PLC0415

    if spec in ("byte", "gpt2"):
        return TOKENIZERS.get(spec).build(TokenizerConfig(kind=spec), [])
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, META_FILE)):
            raise FileNotFoundError(f"--tokenizer={spec}: no tokenizer in that directory (a run directory has "
                                    f"{META_FILE}); train a run first or give a .model / tokenizer.json file")  # fmt: skip
        return load_tokenizer(spec)
    if spec.endswith(".model") and os.path.isfile(spec):
        return TOKENIZERS.get("sentencepiece").build(TokenizerConfig(kind="sentencepiece", path=spec), [])
    if spec.endswith(".json") and os.path.isfile(spec):
        return TOKENIZERS.get("hf").build(TokenizerConfig(kind="hf", path=spec), [])
    raise FileNotFoundError(f"--tokenizer={spec!r}: expected byte, gpt2, a run directory, a SentencePiece "
                            f".model or a Hugging Face tokenizer.json that exists")  # fmt: skip


def input_fingerprint(paths: list[str], opt: PrepareOptions, tok_hash: str) -> str:
    files = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    blob = json.dumps([FORMAT, files, dataclasses.asdict(opt), tok_hash], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _up_to_date(output: str, fp: str) -> dict | None:
    path = os.path.join(output, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        m = json.load(f)
    files_ok = all(os.path.exists(os.path.join(output, s["file"])) for s in m.get("shards", []))
    return m if m.get("fingerprint") == fp and files_ok else None


def _clear_output(output: str) -> None:
    """Remove a previous preparation's files; refuse a directory holding anything else."""
    if not os.path.isdir(output):
        os.makedirs(output)
        return
    ours = [n for n in os.listdir(output)
            if n in (MANIFEST, TOKENIZER_DIR) or (n.startswith("tokens-") and ".arrayrecord" in n)]  # fmt: skip
    foreign = sorted(set(os.listdir(output)) - set(ours))
    if foreign:
        raise FileExistsError(f"--output={output} holds files that are not a prepared dataset ({foreign[:3]}); "
                              f"choose an empty or new directory")  # fmt: skip
    for n in ours:
        p = os.path.join(output, n)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def prepare(inputs: str, output: str, tokenizer: str, opt: PrepareOptions | None = None, workers: int = 1,
            batch_docs: int = 64, progress: bool = True) -> dict:  # fmt: skip
    """Prepare `inputs` (comma-separated files/globs) into `output`; returns the manifest."""
    from llm.data.tokenizers import fingerprint  # noqa: PLC0415

    opt = opt or PrepareOptions()
    if "://" in output:
        raise ConfigError(f"--output={output}: write to a local directory (ArrayRecord's writer opens local "
                          f"files), then copy it, e.g. gcloud storage cp -r {output.split('/')[-1]} {output}")  # fmt: skip
    paths = resolve_paths(inputs)
    tok = resolve_tokenizer(tokenizer)
    tok_hash = fingerprint(tok)
    fp = input_fingerprint(paths, opt, tok_hash)
    done = _up_to_date(output, fp)
    if done is not None:
        print(f"{output} is up to date ({done['documents']:,} documents, {done['total_tokens']:,} tokens; "
              f"same inputs, options and tokenizer): nothing to do")  # fmt: skip
        return done
    _clear_output(output)
    tok_dir = os.path.join(output, TOKENIZER_DIR)
    tok.save(tok_dir)
    _init_worker(tok_dir, opt)
    _worker["tokenizer_dir"] = tok_dir

    dtype = np.dtype("<u2") if tok.vocab_size <= 1 << 16 else np.dtype("<u4")
    writer = ShardWriter(output, opt.shards, opt.record_tokens, dtype, tok.eos_id)
    seen: set[bytes] = set()
    near = dedup.NearDuplicateIndex(opt.near_threshold, opt.num_perm) if opt.near_dedup else None
    dropped: collections.Counter = collections.Counter()
    examples: dict[str, list[str]] = collections.defaultdict(list)
    n_in = chars_in = n_kept = 0
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=sum(os.path.getsize(p) for p in paths), unit="B", unit_scale=True, desc="prepare",
                   dynamic_ncols=True)  # fmt: skip
    for results in _ordered(_batches(iter_documents(paths, opt), batch_docs), workers):
        for reason, key, sig, ids, chars in results:
            n_in += 1
            chars_in += chars
            if reason is None and key is not None:
                reason = "exact_duplicate" if key in seen else None
                seen.add(key)
            if reason is None and sig is not None and near.check_and_add(sig):
                reason = "near_duplicate"
            if reason:
                dropped[reason] += 1
                if len(examples[reason]) < 3:  # what was dropped, for the manifest: the text's start
                    examples[reason].append(key if isinstance(key, str) else tok.decode(ids[:30].tolist()))
                continue
            writer.add(np.append(ids, tok.eos_id))
            n_kept += 1
        if bar is not None:
            bar.update(sum(r[-1] for r in results))
            bar.set_postfix(docs=n_in, kept=n_kept, tokens=writer.total + writer.buffered)
    writer.close()
    if bar is not None:
        bar.close()
    if n_kept == 0:
        raise ValueError(f"no document of {inputs!r} survived cleaning and dedup ({dict(dropped)}); check the "
                         f"input and the filter options")  # fmt: skip
    seconds = time.perf_counter() - t0
    manifest = {
        "format": FORMAT, "fingerprint": fp, "record_tokens": opt.record_tokens, "dtype": dtype.name,
        "total_tokens": writer.total, "records": writer.records, "documents": n_kept,
        "shards": writer.stats,
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "hash": tok_hash, "source": tokenizer},
        "inputs": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in paths],
        "options": dataclasses.asdict(opt),
        "input_documents": n_in, "input_chars": chars_in,
        "dropped": dict(sorted(dropped.items())), "dropped_examples": dict(examples),
        "workers": workers, "seconds": round(seconds, 3),
        "mb_per_s": round(chars_in / 1e6 / seconds, 3), "mb_per_s_per_worker": round(chars_in / 1e6 / seconds / workers, 3),
    }  # fmt: skip
    tmp = os.path.join(output, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(output, MANIFEST))  # the commit: without it the output is not used
    print(summary(manifest, output))
    return manifest


def summary(m: dict, output: str) -> str:
    drops = ", ".join(f"{k} {v:,}" for k, v in m["dropped"].items()) or "none"
    return (f"prepared {output}: {m['input_documents']:,} documents in ({m['input_chars'] / 1e6:.1f} MB) -> "
            f"{m['documents']:,} kept, {m['total_tokens']:,} tokens in {len(m['shards'])} shard(s) | dropped: {drops} "
            f"| {m['seconds']:.1f} s, {m['mb_per_s']:.2f} MB/s ({m['mb_per_s_per_worker']:.2f} per worker x "
            f"{m['workers']})")  # fmt: skip


# ---- CLI --------------------------------------------------------------------------------------


def main(argv) -> int:
    from absl import flags  # noqa: PLC0415

    f = flags.FLAGS
    if len(argv) > 1:
        print(f"llm.data.prepare: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    missing = [n for n in ("input", "output", "tokenizer") if not getattr(f, n)]
    if missing:
        print(f"llm.data.prepare: give --{', --'.join(missing)} (see --help)", file=sys.stderr)
        return 2
    opt = PrepareOptions(
        shards=f.shards, record_tokens=f.record_tokens, text_field=f.text_field, txt_documents=f.txt_documents,
        clean=clean.CleanOptions(f.min_chars, f.max_chars, f.max_dup_line_fraction, f.max_top_bigram_fraction,
                                 f.repetition_min_words),
        exact_dedup=f.exact_dedup, near_dedup=f.near_dedup, near_threshold=f.near_threshold,
        num_perm=f.num_perm, shingle=f.shingle,
    )  # fmt: skip
    try:
        prepare(f.input, f.output, f.tokenizer, opt, workers=f.workers, progress=f.progress)
    except (ValueError, FileExistsError) as e:  # bad input: one line, exit 2 (cli.run)
        raise ConfigError(str(e)) from e
    return 0


def _define_flags() -> None:
    from absl import flags  # noqa: PLC0415

    d, c = PrepareOptions(), clean.CleanOptions()
    flags.DEFINE_string(
        "input", None, "comma-separated files/globs: .txt .jsonl .jsonl.gz .jsonl.zst .parquet"
    )
    flags.DEFINE_string("output", None, "the prepared dataset's directory (local)")
    flags.DEFINE_string(
        "tokenizer", None, "a run directory, a SentencePiece .model, a tokenizer.json, byte or gpt2"
    )
    flags.DEFINE_integer("shards", d.shards, "ArrayRecord files to write")
    flags.DEFINE_integer("record_tokens", d.record_tokens, "ids per record")
    flags.DEFINE_string("text_field", d.text_field, "the text field of .jsonl / .parquet records")
    flags.DEFINE_enum("txt_documents", d.txt_documents, TXT_DOCUMENTS, "what one document of a .txt file is")
    flags.DEFINE_integer("workers", os.cpu_count() or 1, "tokenizing worker processes (1: in this process)")
    flags.DEFINE_integer("min_chars", c.min_chars, "drop shorter documents")
    flags.DEFINE_integer("max_chars", c.max_chars, "drop longer documents (0: no limit)")
    flags.DEFINE_float(
        "max_dup_line_fraction", c.max_dup_line_fraction, "drop documents repeating more lines (1: off)"
    )
    flags.DEFINE_float("max_top_bigram_fraction", c.max_top_bigram_fraction,
                       "drop documents whose top word bigram covers more of the text (1: off)")  # fmt: skip
    flags.DEFINE_integer(
        "repetition_min_words",
        c.repetition_min_words,
        "apply the two repetition filters to documents of at least this many words",
    )
    flags.DEFINE_boolean("exact_dedup", d.exact_dedup, "drop exact duplicates (whitespace-insensitive)")
    flags.DEFINE_boolean("near_dedup", d.near_dedup, "drop near-duplicates (MinHash LSH)")
    flags.DEFINE_float(
        "near_threshold", d.near_threshold, "near-duplicate: estimated Jaccard similarity >= this"
    )
    flags.DEFINE_integer("num_perm", d.num_perm, "MinHash permutations")
    flags.DEFINE_integer("shingle", d.shingle, "words per shingle")
    flags.DEFINE_boolean("progress", True, "show a progress bar")


if __name__ == "__main__":
    from llm import cli

    _define_flags()
    cli.run(main)
