"""Tokenizers of published models: GPT-2's BPE against the original algorithm (OpenAI's encoder.py,
re-written here from its description: regex pre-split, byte-to-unicode alphabet, lowest-rank merge
first) and a Hugging Face tokenizer.json against `transformers`' AutoTokenizer."""

import json
import os

import numpy as np
import pytest

from llm.data.tokenizers import (
    GPT2_DIR,
    TOKENIZERS,
    GPT2Tokenizer,
    HFTokenizer,
    _byte_decoder,
    load_tokenizer,
)

TRICKY = [
    "Hello world",
    "  leading spaces and   runs of   spaces\t\ttabs\n\n\nnewlines   ",
    "naïve café, Zürich — “quotes” and ‘apostrophes’",
    "emoji 🤗🚀 and ZWJ 👩‍👩‍👧 and CJK 漢字かな한국어",
    "numbers 1234567 3.14159 -42 1e-5",
    "I'm you're it's we've they'll he'd SHE'S",
    "a<|endoftext|>b",
    "",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]


def reference_gpt2_ids(text: str) -> list[int]:
    """GPT-2's encoder.py algorithm (the special token split off first, as tiktoken does)."""
    import regex

    encoder = json.load(open(os.path.join(GPT2_DIR, "encoder.json"), encoding="utf-8"))
    lines = open(os.path.join(GPT2_DIR, "vocab.bpe"), encoding="utf-8").read().split("\n")[1:]
    ranks = {tuple(m.split()): i for i, m in enumerate(lines) if m}
    byte_char = {b: c for c, b in _byte_decoder().items()}
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def bpe(word: tuple[str, ...]) -> tuple[str, ...]:
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return word

    ids = []
    for k, part in enumerate(text.split("<|endoftext|>")):
        if k:
            ids.append(encoder["<|endoftext|>"])
        for piece in pat.findall(part):
            ids += [encoder[t] for t in bpe(tuple(byte_char[b] for b in piece.encode("utf-8")))]
    return ids


@pytest.mark.parametrize("text", TRICKY)
def test_gpt2_bpe_gives_the_original_ids(text):
    tok = GPT2Tokenizer()
    ids = tok.encode(text)
    assert ids == reference_gpt2_ids(text)
    assert tok.decode(ids) == text


def test_gpt2_tokenizer_shape_specials_and_bytes():
    tok = TOKENIZERS.get("gpt2")(("<pause>",))
    assert tok.vocab_size == 50258 and tok.eos_id == tok.bos_id == tok.pad_id == 50256
    assert tok.special_id("<pause>") == 50257
    assert tok.token_bytes[50256] == 0 and tok.token_bytes[50257] == 0
    # bytes per id sum to the text's UTF-8 length (bits per byte stays honest)
    for text in TRICKY:
        if "<|endoftext|>" not in text:
            assert int(np.sum(tok.token_bytes[tok.encode(text)])) == len(text.encode("utf-8"))


def test_hf_tokenizer_json_matches_transformers_and_survives_a_run_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    # A small WordPiece-free BPE with a Metaspace (SentencePiece-style) pre-tokenizer, trained here.
    hf = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    from tokenizers import decoders

    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    corpus = ["the quick brown fox jumps over the lazy dog " * 3, "naïve café Zürich 1234 emoji 🤗"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=[f"<0x{b:02X}>" for b in range(256)])  # fmt: skip
    hf.train_from_iterator(corpus, trainer)
    d = tmp_path / "hf"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"},
              open(d / "tokenizer_config.json", "w"))  # fmt: skip
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    from llm.config import TokenizerConfig

    ours = HFTokenizer.build(TokenizerConfig(kind="hf", path=str(d / "tokenizer.json")), [])
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    for text in TRICKY[:6]:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    ours.save(str(tmp_path / "run"))
    again = load_tokenizer(str(tmp_path / "run"))
    assert again.kind == "hf" and again.encode(TRICKY[2]) == ours.encode(TRICKY[2])
    assert again.special == ours.special
