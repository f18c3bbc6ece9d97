"""Tokenizers, one registry entry per kind: SentencePiece trained on the corpus (default) and raw
UTF-8 bytes. A new kind (GPT-2's BPE, a Hugging Face tokenizer.json) is a `Tokenizer` subclass
registered under its `data.tokenizer.kind` name with `build` (from the config and the training
texts), `load` (from a run directory) and `save`.

Every tokenizer has named special tokens: `pad`, `eos`, `bos` and any the config adds
(`data.tokenizer.special_tokens`, e.g. ("<pause>",)), looked up by `special_id(name)`. Special
tokens stand for no text: their `token_bytes` is 0, so bits per byte stays honest.
`token_bytes`: how many bytes of raw text each id stands for, for bits per byte across tokenizers.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from llm.config import TokenizerConfig
from llm.registry import ConfigError, Registry

SP_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"

TOKENIZERS: Registry = Registry("tokenizer kind")


class Tokenizer:
    """Interface: ids <-> text, named special ids, and bytes-per-id for bits-per-byte."""

    kind: str
    vocab_size: int
    special: dict[str, int]  # name -> id: "pad", "eos", "bos", and the config's special_tokens
    token_bytes: np.ndarray  # [vocab_size] int32

    @property
    def pad_id(self) -> int:
        return self.special["pad"]

    @property
    def eos_id(self) -> int:
        return self.special["eos"]

    @property
    def bos_id(self) -> int:
        return self.special["bos"]

    def special_id(self, name: str) -> int:
        if name not in self.special:
            raise KeyError(f"the {self.kind} tokenizer has no special token {name!r}; it has {sorted(self.special)} "
                           f"(add it with data.tokenizer.special_tokens before the tokenizer is built)")  # fmt: skip
        return self.special[name]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @classmethod
    def build(cls, cfg: TokenizerConfig, texts: Iterable[str]) -> Tokenizer:
        """A new tokenizer for a run (trained on `texts`, or read from `cfg.path`)."""
        raise NotImplementedError

    @classmethod
    def load(cls, directory: str, meta: dict) -> Tokenizer:
        """The tokenizer a run directory holds (`meta` is its tokenizer.json)."""
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise NotImplementedError

    def _meta(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "special": self.special}


@TOKENIZERS.register("sentencepiece")
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; identity normalisation so decode(encode(text)) == text."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, special_tokens: Sequence[str] = ()):
        import sentencepiece as spm  # noqa: PLC0415

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.special = {"pad": self.sp.pad_id(), "eos": self.sp.eos_id(), "bos": self.sp.bos_id()}
        for name in special_tokens:
            i = self.sp.piece_to_id(name)
            if i == self.sp.unk_id() and name != self.sp.id_to_piece(i):
                raise ConfigError(f"special token {name!r} is not in this SentencePiece model; train the tokenizer "
                                  f"with it in data.tokenizer.special_tokens (or use a model that has it)")  # fmt: skip
            self.special[name] = i
        table = []
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                table.append(1)
            elif self.sp.is_control(i) or self.sp.is_unknown(i):
                table.append(0)
            else:
                table.append(len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")))
        for i in self.special.values():
            if i >= 0:
                table[i] = 0
        self.token_bytes = np.asarray(table, np.int32)

    @classmethod
    def build(cls, cfg: TokenizerConfig, texts: Iterable[str]) -> SentencePieceTokenizer:
        if cfg.path:
            if not os.path.exists(cfg.path):
                raise FileNotFoundError(f"data.tokenizer.path={cfg.path} does not exist")
            with open(cfg.path, "rb") as f:
                return cls(f.read(), cfg.special_tokens)
        return train_sentencepiece(texts, cfg)

    @classmethod
    def load(cls, directory: str, meta: dict) -> SentencePieceTokenizer:
        with open(os.path.join(directory, SP_FILE), "rb") as f:
            extra = [k for k in meta.get("special", {}) if k not in ("pad", "eos", "bos")]
            return cls(f.read(), extra)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, SP_FILE), "wb") as f:
            f.write(self.proto)
        _write_meta(directory, self._meta())


@TOKENIZERS.register("byte")
class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; 256 = end of document, 257 = padding, then added specials."""

    kind = "byte"

    def __init__(self, special_tokens: Sequence[str] = ()):
        self.special = {"eos": 256, "pad": 257, "bos": 256}  # documents are separated by eos alone
        for i, name in enumerate(special_tokens):
            self.special[name] = 258 + i
        self.vocab_size = 258 + len(special_tokens)
        self.token_bytes = np.array([1] * 256 + [0] * (self.vocab_size - 256), np.int32)

    @classmethod
    def build(cls, cfg: TokenizerConfig, texts: Iterable[str]) -> ByteTokenizer:
        return cls(cfg.special_tokens)

    @classmethod
    def load(cls, directory: str, meta: dict) -> ByteTokenizer:
        special = meta.get("special", {})
        return cls(sorted((k for k in special if k not in ("pad", "eos", "bos")), key=special.get))

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        _write_meta(directory, self._meta())


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
            add_dummy_prefix=False, user_defined_symbols=["\n", *cfg.special_tokens],
            allow_whitespace_only_pieces=True, split_digits=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            num_threads=1, hard_vocab_limit=False, minloglevel=2,
        )  # fmt: skip
    except RuntimeError as e:
        raise ConfigError(
            f"SentencePiece training failed ({e}); try a smaller data.tokenizer.vocab_size "
            f"(now {cfg.vocab_size}) or a larger corpus"
        ) from e
    return SentencePieceTokenizer(buf.getvalue(), cfg.special_tokens)


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
    return TOKENIZERS.get(meta["kind"], f"{meta_path} kind").load(directory, meta)


def build_tokenizer(cfg: TokenizerConfig, directory: str, texts: Iterable[str]) -> Tokenizer:
    """The run's tokenizer: reuse the one saved in `directory` (resume), else build one."""
    if os.path.exists(os.path.join(directory, META_FILE)):
        tok = load_tokenizer(directory)
        if tok.kind != cfg.kind:
            raise ConfigError(
                f"{directory} holds a {tok.kind} tokenizer but data.tokenizer.kind={cfg.kind}; "
                f"use a new --workdir or the original setting"
            )
        missing = [t for t in cfg.special_tokens if t not in tok.special]
        if missing:
            raise ConfigError(f"{directory} holds a tokenizer without the special tokens {missing} that "
                              f"data.tokenizer.special_tokens asks for; use a new --workdir")  # fmt: skip
        return tok
    return TOKENIZERS.get(cfg.kind, "data.tokenizer.kind").build(cfg, texts)
