"""`python -m llm.data.prepare`: cleaning, exact and near dedup, shards, manifest, readers.

The dedup test plants copies in a second file next to tiny Shakespeare cut into passages, and
checks the result against brute-force Jaccard similarities of the same word shingles (the exact
quantity MinHash estimates), not against the code under test.
"""

import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from llm.data import clean, dedup, prepare, prepared, sources
from llm.data.tokenizers import load_tokenizer
from llm.registry import ConfigError

SHAKESPEARE = os.path.join(sources.CORPORA_DIR, "tinyshakespeare.txt")
N_EXACT, N_NEAR, N_FAR = 15, 15, 10
# Shakespeare's dialogue repeats speaker names: the duplicate-line rule would drop ~25 passages.
DIALOGUE = clean.CleanOptions(max_dup_line_fraction=1.0)


def passages(n_lines: int = 80) -> list[str]:
    lines = open(SHAKESPEARE).read().split("\n")
    chunks = ["\n".join(lines[i : i + n_lines]).strip() for i in range(0, len(lines), n_lines)]
    return [c for c in chunks if c]


def write_jsonl(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def substitute(text: str, n: int, rng) -> str:
    """`text` with `n` of its words replaced by a word that is not in Shakespeare."""
    spans = [m.span() for m in re.finditer(r"[A-Za-z]{4,}", text)]
    for k in sorted(rng.choice(len(spans), n, replace=False), reverse=True):
        a, b = spans[k]
        text = text[:a] + f"zq{k}x" + text[b:]
    return text


def jaccard(a: str, b: str, mh: dedup.MinHasher) -> float:
    sa, sb = (mh.shingles(clean.WORD.findall(clean.normalize(t).lower())) for t in (a, b))
    return len(sa & sb) / len(sa | sb)


def max_pairwise_jaccard(texts: list[str], mh: dedup.MinHasher) -> float:
    """Exact, over every pair sharing at least one shingle (an inverted index finds them)."""
    sets = [mh.shingles(clean.WORD.findall(clean.normalize(t).lower())) for t in texts]
    index: dict[str, list[int]] = {}
    for i, s in enumerate(sets):
        for g in s:
            index.setdefault(g, []).append(i)
    pairs = {(i, j) for ids in index.values() for k, i in enumerate(ids) for j in ids[k + 1 :]}
    return max((len(sets[i] & sets[j]) / len(sets[i] | sets[j]) for i, j in pairs), default=0.0)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Shakespeare passages + a file of planted exact, near and far copies and junk."""
    d = tmp_path_factory.mktemp("planted")
    orig = passages()
    rng = np.random.default_rng(0)
    picks = rng.choice(len(orig), N_EXACT + N_NEAR + N_FAR, replace=False)
    ex, near, far = picks[:N_EXACT], picks[N_EXACT : N_EXACT + N_NEAR], picks[N_EXACT + N_NEAR :]
    copies = []
    for k, i in enumerate(ex):  # exact: identical, or equal after normalisation / whitespace
        t = orig[i]
        copies.append([t, t.replace("\n", "\r\n"), "  " + t.replace("\n", " \n") + "\x07"][k % 3])
    copies += [substitute(orig[i], 2, rng) for i in near]  # 2 of ~500 words changed
    copies += [substitute(orig[i], 80, rng) for i in far]  # ~a third of the long words: kept
    junk = ["", " \n\t ", "buy now " * 40 + "\n" + "buy now\n" * 30]  # empty, empty, repeated
    write_jsonl(d / "shakespeare.jsonl", orig)
    write_jsonl(d / "copies.jsonl", copies + junk)
    return d, orig, copies, (ex, near, far)


def test_planted_duplicates_are_removed_exactly(planted, tmp_path):
    d, orig, copies, (ex, near, far) = planted
    mh = dedup.MinHasher()
    # The oracle: exact Jaccard similarities, far from the 0.8 threshold on both sides.
    assert max_pairwise_jaccard(orig, mh) < 0.5  # Shakespeare itself has no near-duplicate passages
    near_j = [jaccard(orig[i], copies[N_EXACT + k], mh) for k, i in enumerate(near)]
    far_j = [max(jaccard(o, copies[N_EXACT + N_NEAR + k], mh) for o in orig) for k in range(N_FAR)]
    assert min(near_j) > 0.9 and max(far_j) < 0.6, (near_j, far_j)

    out = str(tmp_path / "prep")
    opt = prepare.PrepareOptions(clean=DIALOGUE)
    m = prepare.prepare(f"{d}/shakespeare.jsonl,{d}/copies.jsonl", out, "byte", opt, progress=False)
    assert m["input_documents"] == len(orig) + len(copies) + 3
    assert m["dropped"] == {"exact_duplicate": N_EXACT, "near_duplicate": N_NEAR, "empty": 2,
                            "repeated_ngram": 1}  # fmt: skip
    assert m["documents"] == len(orig) + N_FAR

    # The stream holds exactly the kept documents, in input order, each followed by EOS.
    tok = load_tokenizer(os.path.join(out, prepared.TOKENIZER_DIR))
    stream = prepared.TokenStream(out)
    ids = stream.read(0, len(stream))
    kept = orig + copies[N_EXACT + N_NEAR :]
    want = np.concatenate([np.append(tok.encode(clean.normalize(t)), tok.eos_id) for t in kept])
    np.testing.assert_array_equal(ids, want)
    assert sum(s["documents"] for s in m["shards"]) == len(kept)
    assert sum(s["tokens"] for s in m["shards"]) == len(want) == m["total_tokens"]


def test_workers_rerun_and_options(planted, tmp_path, capsys):
    """Two worker processes write the same bytes as one; the same command again does nothing;
    another option prepares again."""
    d = planted[0]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    inputs = f"{d}/shakespeare.jsonl,{d}/copies.jsonl"
    opt = prepare.PrepareOptions(shards=3, record_tokens=1000, clean=DIALOGUE)
    m1 = prepare.prepare(inputs, one, "byte", opt, workers=1, progress=False)
    m2 = prepare.prepare(inputs, two, "byte", opt, workers=2, batch_docs=16, progress=False)
    for s in m1["shards"]:
        with open(os.path.join(one, s["file"]), "rb") as a, open(os.path.join(two, s["file"]), "rb") as b:
            assert a.read() == b.read()
    assert [s["records"] for s in m1["shards"]] == [s["records"] for s in m2["shards"]]

    mtime = os.stat(os.path.join(one, prepared.MANIFEST)).st_mtime_ns
    capsys.readouterr()
    prepare.prepare(inputs, one, "byte", opt, progress=False)
    assert "up to date" in capsys.readouterr().out
    assert os.stat(os.path.join(one, prepared.MANIFEST)).st_mtime_ns == mtime
    m3 = prepare.prepare(inputs, one, "byte", prepare.PrepareOptions(shards=3, record_tokens=1000,
                                                                       clean=DIALOGUE, near_dedup=False), progress=False)  # fmt: skip
    assert "near_duplicate" not in m3["dropped"] and m3["documents"] == m1["documents"] + N_NEAR
    assert sorted(f for f in os.listdir(one) if f.endswith(".arrayrecord")) == [
        s["file"] for s in m3["shards"]
    ]


def test_cleaning_filters():
    o = clean.CleanOptions(min_chars=5, max_chars=100, repetition_min_words=3)
    assert clean.normalize("e\u0301\r\nb\x00c\x1b\t ") == "\u00e9\nbc"  # NFC, newlines, controls
    assert clean.reject_reason("", o) == "empty"
    assert clean.reject_reason("abc", o) == "too_short"
    assert clean.reject_reason("x" * 101, o) == "too_long"
    assert clean.reject_reason("a b c\na b c\na b c\nd e", o) == "repeated_lines"
    assert clean.reject_reason("foo bar foo bar foo bar baz", o) == "repeated_ngram"
    assert clean.reject_reason("the quick brown fox jumps over", o) is None


def test_minhash_estimates_jaccard():
    """The signature agreement tracks the exact Jaccard similarity (std ~ 0.04 at 128 perms)."""
    rng = np.random.default_rng(1)
    mh = dedup.MinHasher()
    base = [f"w{i}" for i in rng.integers(0, 10_000, 400)]
    for n_sub in (5, 40, 150):
        other = list(base)
        for k in rng.choice(len(base), n_sub, replace=False):
            other[k] = f"v{k}"
        a, b = mh.shingles(base), mh.shingles(other)
        exact = len(a & b) / len(a | b)
        est = np.mean(mh.signature(base) == mh.signature(other))
        assert abs(est - exact) < 0.12, (n_sub, exact, est)


def test_readers_agree(tmp_path):
    """.jsonl, .jsonl.gz, .jsonl.zst and .parquet give the same documents; paragraphs of a .txt."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = ["first doc", "second\ndoc é", "third"]
    write_jsonl(tmp_path / "a.jsonl", docs)
    raw = open(tmp_path / "a.jsonl", "rb").read()
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(raw)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet", row_group_size=2)
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"):
        assert sources.read_documents(str(tmp_path / name)) == docs, name
    (tmp_path / "p.txt").write_text("one\ntwo\n\n\nthree\n")
    opt = prepare.PrepareOptions(txt_documents="paragraphs")
    assert list(prepare.iter_documents([str(tmp_path / "p.txt")], opt)) == ["one\ntwo\n", "three\n"]
    with pytest.raises(ConfigError, match="no column 'body'"):
        list(sources.read_parquet(str(tmp_path / "d.parquet"), "body"))


def test_bad_input_is_one_line(tmp_path, repo_root):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "in.txt").write_text("hello world")
    with pytest.raises(FileExistsError, match="not a prepared dataset"):
        prepare.prepare(str(tmp_path / "in.txt"), str(tmp_path / "other"), "byte", progress=False)
    assert (tmp_path / "other" / "notes.txt").exists()  # never deleted
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        prepare.prepare(str(tmp_path / "in.txt"), str(tmp_path / "o"), str(tmp_path / "nope"), progress=False)
    with pytest.raises(FileNotFoundError, match="is not a prepared dataset"):
        prepared.read_manifest(str(tmp_path / "other"))
    cmd = [sys.executable, "-m", "llm.data.prepare", "--input=" + str(tmp_path / "in.txt"), "--output=" +
           str(tmp_path / "o"), "--tokenizer=byte", "--min_chars=100", "--noprogress"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "survived cleaning" in p.stderr and "too_short" in p.stderr
    p = subprocess.run(cmd[:4], capture_output=True, text=True, cwd=repo_root)
    assert p.returncode == 2 and "give --output, --tokenizer" in p.stderr
