"""Prepared data (llm/data/prepare.py, llm/data/prepared.py): prepare throughput, reader
throughput, and the data start-up of a training run, prepared shards vs the text path.

Run (idle machine):
  .venv/bin/python benchmarks/prepared_data.py                  # 100M-token dataset, ~5 minutes
  .venv/bin/python benchmarks/prepared_data.py --tokens=5e6 --prepare_mb=4   # quicker

1. prepare: a synthetic .jsonl corpus (documents of random tiny-Shakespeare words, none
   duplicated) through `prepare` with the GPT-2 tokenizer, 1 and 2 worker processes: MB/s and
   MB/s per worker (cleaning, MinHash, tokenizing, writing).
2. reader: the training iterator (`pipeline.train_dataset`, the default run's batch 16 x 256,
   2 grain threads) over a synthetic `--tokens` prepared dataset written straight to shards:
   tokens/s delivered, against the default model's training speed.
3. start-up: in a fresh child process, from the data config to the first training batch
   (DataSource.windows + one batch), with the child's peak RSS: the text path at 1M and 10M
   tokens (read, tokenize, pack in memory) and prepared shards at 1M, 10M and `--tokens`.
Writes benchmarks/results/prepared_data.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

# README quick start: the default model trains at ~8,100-8,200 tokens/s on the AVX-512 host
# (~3,900 on AVX2-only hosts); the reader should deliver >= 10x the faster figure.
DEFAULT_TRAIN_TOK_S = 8_200
B, T = 16, 256


def words() -> list[str]:
    from llm.data import clean, sources  # noqa: PLC0415

    text = open(os.path.join(sources.CORPORA_DIR, "tinyshakespeare.txt")).read()
    return sorted(set(clean.WORD.findall(text)))


def synthetic_text(n_chars: int, seed: int, doc_chars: int = 2000) -> list[str]:
    """Documents of random Shakespeare words in lines of ~10: no two alike, no repetition."""
    rng = np.random.default_rng(seed)
    vocab = np.array(words())
    docs, total = [], 0
    while total < n_chars:
        w = vocab[rng.integers(0, len(vocab), doc_chars // 6)]
        doc = "\n".join(" ".join(w[i : i + 10]) for i in range(0, len(w), 10))
        docs.append(doc)
        total += len(doc)
    return docs


def write_synthetic_prepared(path: str, n_tokens: int, shards: int = 16) -> float:
    """A prepared dataset of random GPT-2 ids with an EOS every ~500 ids; returns seconds."""
    from llm.data import prepare, prepared  # noqa: PLC0415
    from llm.data.tokenizers import fingerprint  # noqa: PLC0415

    tok = prepare.resolve_tokenizer("gpt2")
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, prepared.TOKENIZER_DIR))
    t0 = time.perf_counter()
    w = prepare.ShardWriter(path, shards, 2048, np.dtype("<u2"), tok.eos_id)
    rng = np.random.default_rng(0)
    done = 0
    while done < n_tokens:
        n = min(1 << 20, n_tokens - done)
        ids = rng.integers(0, 50_000, n, dtype=np.int32)
        ids[rng.integers(0, n, n // 500)] = tok.eos_id
        w.add(ids)
        done += n
    w.close()
    seconds = time.perf_counter() - t0
    manifest = {"format": prepared.FORMAT, "fingerprint": "synthetic", "record_tokens": 2048, "dtype": "uint16",
                "total_tokens": w.total, "records": w.records, "documents": sum(s["documents"] for s in w.stats),
                "shards": w.stats, "tokenizer": {"kind": "gpt2", "vocab_size": tok.vocab_size,
                                                 "hash": fingerprint(tok)}}  # fmt: skip
    with open(os.path.join(path, prepared.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return seconds


def child_startup(kind: str, path: str) -> None:
    """(child) data config -> first batch; prints JSON."""
    t0 = time.perf_counter()
    from llm.config import DataConfig, TokenizerConfig  # noqa: PLC0415
    from llm.data import pipeline, sources  # noqa: PLC0415
    from llm.data.prepare import resolve_tokenizer  # noqa: PLC0415

    t_import = time.perf_counter() - t0
    tok = resolve_tokenizer("gpt2")
    t0 = time.perf_counter()
    if kind == "text":
        cfg = DataConfig(corpus=path, seq_len=T, tokenizer=TokenizerConfig(kind="gpt2"))
    else:
        cfg = DataConfig(kind="arrayrecord", path=path, seq_len=T, eval_fraction=0.01,
                         tokenizer=TokenizerConfig(kind="gpt2"))  # fmt: skip
    train_w, _ = sources.source_for(cfg).windows(tok)
    it = pipeline.train_iterator(pipeline.train_dataset(train_w, B, 0, shift_windows=True), 2)
    next(it)
    print(json.dumps({"seconds": time.perf_counter() - t0, "import_s": t_import, "windows": len(train_w),
                      **common.rss_mb()}))  # fmt: skip


def startup(kind: str, path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, path], capture_output=True, text=True,
                         check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def reader_throughput(path: str, batches: int) -> float:
    from llm.data import pipeline, prepared  # noqa: PLC0415

    ds = prepared.PreparedDataset(path)
    train_w, _ = ds.split(T, 50256, 0.01)
    it = pipeline.train_iterator(pipeline.train_dataset(train_w, B, 0, shift_windows=True), 2)
    for _ in range(20):  # warm: threads, first reads
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * B * T / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=float, default=1e8)
    ap.add_argument("--prepare_mb", type=float, default=20)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        child_startup(*a.child)
        return
    from llm.data import prepare  # noqa: PLC0415

    result = {"host": common.host(), "date": time.strftime("%Y-%m-%d %H:%M"), "batch": B, "seq_len": T}
    with tempfile.TemporaryDirectory() as tmp:
        # 1. prepare
        corpus = os.path.join(tmp, "corpus.jsonl")
        docs = synthetic_text(int(a.prepare_mb * 1e6), seed=0)
        with open(corpus, "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        result["prepare"] = []
        for workers in (1, 2):
            m = prepare.prepare(
                corpus, os.path.join(tmp, f"prep{workers}"), "gpt2", workers=workers, progress=False
            )
            result["prepare"].append({k: m[k] for k in ("workers", "seconds", "mb_per_s", "mb_per_s_per_worker",
                                                        "input_chars", "total_tokens", "documents")})  # fmt: skip
        chars_per_token = result["prepare"][0]["input_chars"] / result["prepare"][0]["total_tokens"]

        # 2. reader
        big = os.path.join(tmp, "big")
        result["write_s"] = write_synthetic_prepared(big, int(a.tokens))
        result["tokens"] = int(a.tokens)
        tok_s = reader_throughput(big, a.batches)
        result["reader"] = {"tokens_per_s": tok_s, "vs_default_training": tok_s / DEFAULT_TRAIN_TOK_S,
                            "default_training_tok_s": DEFAULT_TRAIN_TOK_S}  # fmt: skip

        # 3. start-up
        result["startup"] = []
        for n_tok in (1e6, 1e7):
            txt = os.path.join(tmp, f"text_{int(n_tok)}.txt")
            with open(txt, "w") as f:
                f.write("\n\n".join(synthetic_text(int(n_tok * chars_per_token), seed=int(n_tok))))
            result["startup"].append({"path": "text", "tokens": int(n_tok), **startup("text", txt)})
            small = os.path.join(tmp, f"prep_{int(n_tok)}")
            write_synthetic_prepared(small, int(n_tok))
            result["startup"].append(
                {"path": "arrayrecord", "tokens": int(n_tok), **startup("arrayrecord", small)}
            )
        result["startup"].append(
            {"path": "arrayrecord", "tokens": int(a.tokens), **startup("arrayrecord", big)}
        )
    common.write_results("prepared_data", result, markdown(result))


def markdown(r: dict) -> str:
    h = r["host"]
    lines = [f"# Prepared data ({r['date']}; {h['cpu']}, {h['cores']} cores, {h['isa']})", "",
             "`python benchmarks/prepared_data.py`", "", "## prepare (synthetic .jsonl, GPT-2 tokenizer)", "",
             "| workers | MB in | seconds | MB/s | MB/s per worker | tokens out |", "|---|---|---|---|---|---|"]  # fmt: skip
    for p in r["prepare"]:
        lines.append(f"| {p['workers']} | {p['input_chars'] / 1e6:.1f} | {p['seconds']:.1f} | {p['mb_per_s']:.2f} | "
                     f"{p['mb_per_s_per_worker']:.2f} | {p['total_tokens']:,} |")  # fmt: skip
    rd = r["reader"]
    lines += ["", f"## reader ({r['tokens']:,}-token prepared dataset, batch {r['batch']} x {r['seq_len']}, 2 threads)",
              "", f"{rd['tokens_per_s']:,.0f} tokens/s = {rd['vs_default_training']:.0f}x the default model's training "
              f"speed ({rd['default_training_tok_s']:,} tokens/s). Writing the shards took {r['write_s']:.1f} s.",
              "", "## start-up: data config -> first batch (fresh process)", "",
              "| path | tokens | seconds | peak RSS MiB | windows |", "|---|---|---|---|---|"]  # fmt: skip
    for s in r["startup"]:
        lines.append(
            f"| {s['path']} | {s['tokens']:,} | {s['seconds']:.2f} | {s['peak_rss_mb']:,.0f} | {s['windows']:,} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
