"""Tokenizers, packing, the grain pipeline, process sharding, and bad-data errors."""

import os

import numpy as np
import pytest

from llm.config import TokenizerConfig
from llm.data import pipeline, sources
from llm.data.tokenizers import ByteTokenizer, build_tokenizer, load_tokenizer, train_sentencepiece

VERDICT = "builtin:the-verdict.txt"


@pytest.fixture(scope="module")
def sp_tok():
    docs = sources.read_documents(VERDICT)
    return train_sentencepiece(docs, TokenizerConfig(vocab_size=400))


def test_sentencepiece_roundtrip_and_bytes_table(sp_tok):
    text = "I had always thought Jack Gisburn rather a cheap genius--\n\n  though a good fellow é€"
    ids = sp_tok.encode(text)
    assert sp_tok.decode(ids) == text  # identity normalisation: exact round trip
    # Bytes per id add up to the UTF-8 length of the text (bits per byte relies on this).
    assert int(sp_tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert sp_tok.vocab_size == 400


def test_sentencepiece_training_is_deterministic(sp_tok):
    docs = sources.read_documents(VERDICT)
    again = train_sentencepiece(docs, TokenizerConfig(vocab_size=400))
    assert again.proto == sp_tok.proto


def test_unigram_and_byte_tokenizers():
    docs = sources.read_documents(VERDICT)
    uni = train_sentencepiece(docs, TokenizerConfig(vocab_size=400, model_type="unigram"))
    assert uni.decode(uni.encode(docs[0][:500])) == docs[0][:500]
    bt = ByteTokenizer()
    s = "héllo\n"
    assert bt.encode(s) == list(s.encode()) and bt.decode(bt.encode(s)) == s
    assert bt.token_bytes[bt.encode(s)].sum() == len(s.encode())


def test_tokenizer_saved_and_reused(tmp_path, sp_tok):
    sp_tok.save(str(tmp_path))
    again = build_tokenizer(TokenizerConfig(vocab_size=999), str(tmp_path), ["unused"])
    assert again.proto == sp_tok.proto  # reused from the run dir, not retrained
    assert load_tokenizer(str(tmp_path)).vocab_size == 400


def test_packing_segments_positions_and_mask():
    # Two documents of 4 and 6 tokens (EOS included), windows of T=4.
    ids = np.arange(10, dtype=np.int32)
    seg = np.array([1] * 4 + [2] * 6, np.int32)
    w = pipeline.PackedWindows(ids, seg, 4, include_partial=True)
    assert len(w) == 3  # 2 full windows of 4 (+1 target) and a partial one
    e0, e1, e2 = w[0], w[1], w[2]
    np.testing.assert_array_equal(e0["tokens"], [0, 1, 2, 3])
    np.testing.assert_array_equal(e0["targets"], [1, 2, 3, 4])
    np.testing.assert_array_equal(e0["loss_mask"], [1, 1, 1, 0])  # 3 -> 4 crosses documents
    np.testing.assert_array_equal(e1["segment_ids"], [2, 2, 2, 2])
    np.testing.assert_array_equal(e1["positions"], [0, 1, 2, 3])  # restarts at the window
    np.testing.assert_array_equal(e2["tokens"], [8, 9, 0, 0])
    np.testing.assert_array_equal(e2["loss_mask"], [1, 0, 0, 0])  # padding is never scored
    mixed = pipeline.make_example(np.array([5, 6, 7, 8, 9]), np.array([3, 3, 4, 4, 4]))
    np.testing.assert_array_equal(mixed["positions"], [0, 1, 0, 1])


def _windows(n=40, t=8):
    ids = np.arange(n * t + 1, dtype=np.int32)
    return pipeline.PackedWindows(ids, np.ones_like(ids), t, include_partial=False)


def test_pipeline_is_seeded_and_resumable():
    w = _windows()
    a = pipeline.train_iterator(pipeline.train_dataset(w, 4, seed=1), threads=2)
    b = pipeline.train_iterator(pipeline.train_dataset(w, 4, seed=1), threads=0)
    first = [next(a)["tokens"] for _ in range(12)]  # 12 batches of 4 > 40 windows: crosses an epoch
    np.testing.assert_array_equal(np.stack(first), np.stack([next(b)["tokens"] for _ in range(12)]))
    c = pipeline.train_iterator(pipeline.train_dataset(w, 4, seed=2), threads=0)
    assert not np.array_equal(first[0], next(c)["tokens"])
    # Save the state after 5 batches, restore into a fresh iterator: the stream continues exactly.
    d = pipeline.train_iterator(pipeline.train_dataset(w, 4, seed=1), threads=2)
    for _ in range(5):
        next(d)
    state = d.get_state()
    e = pipeline.train_iterator(pipeline.train_dataset(w, 4, seed=1), threads=2)
    e.set_state(state)
    np.testing.assert_array_equal(next(e)["tokens"], first[5])
    # Each epoch sees every window once, reshuffled between epochs.
    epoch1 = np.concatenate(first[:10])[:, 0] // 8
    assert sorted(epoch1.tolist()) == list(range(40))


def test_processes_read_disjoint_rows_of_the_same_global_batch():
    w = _windows()
    whole = pipeline.train_iterator(pipeline.train_dataset(w, 8, seed=3), threads=0)
    parts = [pipeline.train_iterator(pipeline.train_dataset(w, 8, 3, p, 4), threads=0) for p in range(4)]
    for _ in range(6):
        g = next(whole)["tokens"]
        np.testing.assert_array_equal(np.concatenate([next(p)["tokens"] for p in parts]), g)


def test_split_documents():
    train, held = sources.split_documents(["line one\nline two\nline three\n" * 10], 0.1)
    assert train[0] + held[0] == "line one\nline two\nline three\n" * 10
    assert held[0].startswith("line") and train[0].endswith("\n")
    docs = [f"doc {i}" for i in range(20)]
    train, held = sources.split_documents(docs, 0.1)
    assert held == ["doc 18", "doc 19"] and len(train) == 18


def test_jsonl_source(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "a b"}\n{"text": "c"}\n\n')
    assert sources.read_documents(str(p)) == ["a b", "c"]
    with pytest.raises(Exception, match="no field 'body'"):
        sources.read_documents(str(p), text_field="body")


def test_bad_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.read_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="matched no files"):
        sources.read_documents(str(tmp_path / "*.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        sources.read_documents(str(empty))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe bytes")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        sources.read_documents(str(bad))
    with pytest.raises(ValueError, match="fewer than one batch"):
        pipeline.train_dataset(_windows(n=3), 4, seed=0)


def test_shipped_corpus_is_present():
    path = sources.resolve_paths("builtin:tinyshakespeare.txt")[0]
    assert os.path.getsize(path) == 1_115_394


def test_shifted_windows_cover_each_epoch_from_a_new_offset():
    w = _windows(n=10, t=8)  # stream 0..80, 10 windows; with shifting 9 per epoch
    it = pipeline.train_iterator(pipeline.train_dataset(w, 3, seed=5, shift_windows=True), threads=0)
    rows = np.concatenate([next(it)["tokens"] for _ in range(6)])  # 18 rows = 2 epochs of 9
    offsets = [sorted(set((r[0] % 8) for r in rows[e * 9 : (e + 1) * 9])) for e in range(2)]
    assert all(len(o) == 1 for o in offsets)  # one offset per epoch...
    assert offsets[0] != offsets[1]  # ...and a new one each epoch (seed 5)
    for e in range(2):  # each epoch still covers windows 0..8 once
        assert sorted(int(r[0] // 8) for r in rows[e * 9 : (e + 1) * 9]) == list(range(9))
    for r in rows:  # contiguous text, targets shifted by one
        np.testing.assert_array_equal(r, np.arange(r[0], r[0] + 8))


# ---- the tokenizer registry and named special tokens --------------------------------------------


def test_special_tokens_have_ids_of_their_own_and_no_bytes(tmp_path):
    docs = sources.read_documents(VERDICT)
    cfg = TokenizerConfig(vocab_size=400, special_tokens=("<pause>", "<sep>"))
    tok = train_sentencepiece(docs, cfg)
    pause, sep = tok.special_id("<pause>"), tok.special_id("<sep>")
    assert len({pause, sep, tok.pad_id, tok.eos_id, tok.bos_id}) == 5
    ids = tok.encode("I had<pause> always")
    assert ids.count(pause) == 1 and tok.decode(ids) == "I had<pause> always"
    assert tok.token_bytes[pause] == 0 and tok.token_bytes[sep] == 0  # bits per byte counts text only
    assert int(tok.token_bytes[ids].sum()) == len("I had always")
    tok.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again.special == tok.special
    with pytest.raises(
        KeyError, match=r"no special token '<mask>'; it has \['<pause>', '<sep>', 'bos', 'eos', 'pad'\]"
    ):
        tok.special_id("<mask>")
    # A run dir whose tokenizer lacks a requested special token is refused, not silently reused.
    with pytest.raises(Exception, match=r"without the special tokens \['<mask>'\]"):
        build_tokenizer(TokenizerConfig(special_tokens=("<mask>",)), str(tmp_path), docs)
    bt = ByteTokenizer(("<pause>",))
    assert (bt.vocab_size, bt.special_id("<pause>"), bt.token_bytes[258]) == (259, 258, 0)
    bt.save(str(tmp_path / "b"))
    assert load_tokenizer(str(tmp_path / "b")).special == bt.special


def test_a_new_tokenizer_kind_is_one_registered_class(tmp_path):
    """The seam for GPT-2 BPE / Hugging Face tokenizers: subclass, register, and the config, the
    run directory and loading find it."""
    from llm.data.tokenizers import TOKENIZERS

    if "test_shifted_bytes" not in TOKENIZERS:

        @TOKENIZERS.register("test_shifted_bytes")
        class Shifted(ByteTokenizer):
            kind = "test_shifted_bytes"

            def encode(self, text):
                return [(b + 1) % 256 for b in text.encode("utf-8")]

            def decode(self, ids):
                return bytes((int(i) - 1) % 256 for i in ids if 0 <= int(i) < 256).decode("utf-8", "replace")

    cfg = TokenizerConfig(kind="test_shifted_bytes")
    tok = build_tokenizer(cfg, str(tmp_path), ["unused"])
    assert tok.encode("a") == [ord("a") + 1] and tok.decode(tok.encode("hé")) == "hé"
    tok.save(str(tmp_path))
    assert type(load_tokenizer(str(tmp_path))).__name__ == "Shifted"
    with pytest.raises(Exception, match="valid choices: sentencepiece, byte, hf, gpt2, test_shifted_bytes"):
        TokenizerConfig(kind="bpe")


def test_a_new_data_source_and_file_format_are_one_registered_thing_each(tmp_path):
    """The seams for prepared shards / parquet: a reader per extension, a source per data.kind."""
    import dataclasses

    from llm.config import DataConfig
    from llm.data.sources import DATA_SOURCES, READERS, TextSource, source_for

    if ".lines" not in READERS:

        @READERS.register(".lines")
        def read_lines(path, text_field):  # every line is a document
            with open(path, encoding="utf-8") as f:
                yield from (line for line in f.read().split("\n") if line)

    if "test_upper" not in DATA_SOURCES:

        @DATA_SOURCES.register("test_upper")
        class Upper(TextSource):
            def documents(self):
                train, held = super().documents()
                return [d.upper() for d in train], [d.upper() for d in held]

    corpus = tmp_path / "c.lines"
    corpus.write_text("\n".join(f"line number {i} of the corpus" for i in range(40)))
    cfg = DataConfig(corpus=str(corpus), seq_len=8)
    assert len(source_for(cfg).documents()[0]) == 36  # 40 documents, the last 10% held out
    upper = source_for(dataclasses.replace(cfg, kind="test_upper"))
    train, held = upper.documents()
    assert train[0] == "LINE NUMBER 0 OF THE CORPUS" and len(held) == 4
    tw, ew = upper.windows(ByteTokenizer())
    assert len(tw) > 0 and len(ew) > 0 and bytes(tw[0]["tokens"][:4].tolist()) == b"LINE"
    with pytest.raises(Exception, match=r"unknown data source kind 'arrayrecrd' \(config field data.kind\)"):
        DataConfig(kind="arrayrecrd")


def test_each_corpus_entry_holds_out_its_own_tail(tmp_path):
    """A mixture of many short documents and one long text: each entry keeps its last tenth for
    the held-out split (one list of 101 documents would have held out the long text whole)."""
    import json

    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"text": f"doc {i} " * 5}) + "\n" for i in range(100)))
    long_text = "".join(f"line {i} of the long text\n" for i in range(1000))
    (tmp_path / "long.txt").write_text(long_text)
    train, held = sources.split_corpus(f"{many},{tmp_path / 'long.txt'}", 0.1)
    assert [d for d in held if d.startswith("doc")] == [f"doc {i} " * 5 for i in range(90, 100)]
    long_train = [d for d in train if d.startswith("line")]
    long_held = [d for d in held if d.startswith("line")]
    assert len(long_train) == len(long_held) == 1
    assert long_train[0] + long_held[0] == long_text and long_held[0].startswith("line 9")
    assert 0.09 < len(long_held[0]) / len(long_text) < 0.11
