"""Tokenizers: SentencePiece trained on the corpus (default) and raw UTF-8 bytes.

Both expose `token_bytes`: how many bytes of raw text each id stands for, so evaluation can report
bits per byte, comparable across tokenizers.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from llm.config import TokenizerConfig
from llm.registry import ConfigError

SP_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"


class Tokenizer:
    """Interface: ids <-> text, special ids, and bytes-per-id for bits-per-byte."""

    kind: str
    vocab_size: int
    pad_id: int
    eos_id: int
    token_bytes: np.ndarray  # [vocab_size] int32

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; 256 = end of document, 257 = padding."""

    kind = "byte"

    def __init__(self):
        self.vocab_size, self.eos_id, self.pad_id = 258, 256, 257
        self.token_bytes = np.array([1] * 256 + [0, 0], np.int32)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        _write_meta(directory, {"kind": self.kind, "vocab_size": self.vocab_size})


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; identity normalisation so decode(encode(text)) == text."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm  # noqa: PLC0415

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.eos_id = self.sp.pad_id(), self.sp.eos_id()
        table = []
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                table.append(1)
            elif self.sp.is_control(i) or self.sp.is_unknown(i):
                table.append(0)
            else:
                table.append(len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")))
        self.token_bytes = np.asarray(table, np.int32)

    @classmethod
    def load(cls, path: str) -> SentencePieceTokenizer:
        with open(path, "rb") as f:
            return cls(f.read())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, SP_FILE), "wb") as f:
            f.write(self.proto)
        _write_meta(directory, {"kind": self.kind, "vocab_size": self.vocab_size})


def train_sentencepiece(texts: Iterable[str], cfg: TokenizerConfig) -> SentencePieceTokenizer:
    """Train on the lines of `texts`. One thread: SentencePiece's output depends on the count."""
    import sentencepiece as spm  # noqa: PLC0415

    lines = (line for text in texts for line in text.split("\n") if line)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=buf, vocab_size=cfg.vocab_size,
            model_type=cfg.model_type, byte_fallback=cfg.byte_fallback,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, user_defined_symbols=["\n"], allow_whitespace_only_pieces=True,
            split_digits=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=1,
            hard_vocab_limit=False, minloglevel=2,
        )  # fmt: skip
    except RuntimeError as e:
        raise ConfigError(
            f"SentencePiece training failed ({e}); try a smaller data.tokenizer.vocab_size "
            f"(now {cfg.vocab_size}) or a larger corpus"
        ) from e
    return SentencePieceTokenizer(buf.getvalue())


def _write_meta(directory: str, meta: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f)


def load_tokenizer(directory: str) -> Tokenizer:
    """Load the tokenizer saved in a run directory."""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no tokenizer in {directory} (expected {META_FILE})")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["kind"] == "byte":
        return ByteTokenizer()
    return SentencePieceTokenizer.load(os.path.join(directory, SP_FILE))


def build_tokenizer(cfg: TokenizerConfig, directory: str, texts: Iterable[str]) -> Tokenizer:
    """The run's tokenizer: reuse the one saved in `directory` (resume), else load or train one."""
    if os.path.exists(os.path.join(directory, META_FILE)):
        tok = load_tokenizer(directory)
        if tok.kind != cfg.kind:
            raise ConfigError(
                f"{directory} holds a {tok.kind} tokenizer but data.tokenizer.kind={cfg.kind}; "
                f"use a new --workdir or the original setting"
            )
        return tok
    if cfg.kind == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif cfg.path:
        if not os.path.exists(cfg.path):
            raise FileNotFoundError(f"data.tokenizer.path={cfg.path} does not exist")
        tok = SentencePieceTokenizer.load(cfg.path)
    else:
        tok = train_sentencepiece(texts, cfg)
    return tok
