"""Tokenizers, one registry entry per kind: SentencePiece trained on the corpus (default), raw
UTF-8 bytes, OpenAI's GPT-2 BPE (`gpt2`, files shipped in llm/data/gpt2/) and any Hugging Face
`tokenizer.json` (`hf`). A new kind is a `Tokenizer` subclass registered under its
`data.tokenizer.kind` name with `build` (from the config and the training texts), `load` (from a
run directory) and `save`.

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


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character standing for each byte -> byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


@TOKENIZERS.register("hf")
class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (the `tokenizers` library), e.g. an imported model's
    (`data.tokenizer.path=<tokenizer.json>`). Encodes without adding BOS/EOS: the data pipeline
    places document separators itself. Saved in a run directory as `hf_tokenizer.json`.
    `special` maps names to token strings (bos/eos/pad from the model's tokenizer_config.json;
    pad falls back to eos)."""

    kind = "hf"
    FILE = "hf_tokenizer.json"

    def __init__(self, tokenizer_json: str, special_tokens: dict[str, str], extra: Sequence[str] = ()):
        from tokenizers import AddedToken  # noqa: PLC0415
        from tokenizers import Tokenizer as _HF  # noqa: PLC0415

        self.tok = _HF.from_str(tokenizer_json)
        new = [t for t in extra if self.tok.token_to_id(t) is None]  # e.g. <pause>: appended ids
        if new:
            self.tok.add_special_tokens([AddedToken(t, special=True) for t in new])
        self.json = self.tok.to_str() if new else tokenizer_json
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = dict(special_tokens)
        self.special = {}
        for name, token in {**special_tokens, **{t: t for t in extra}}.items():
            i = self.tok.token_to_id(token) if token is not None else None
            if i is None:
                raise ConfigError(f"special token {name}={token!r} is not in the tokenizer's vocabulary")
            self.special[name] = i
        self.special.setdefault("eos", self.special.get("bos", 0))
        self.special.setdefault("bos", self.special["eos"])
        self.special.setdefault("pad", self.special["eos"])
        self.token_bytes = self._token_bytes()

    def _token_bytes(self) -> np.ndarray:
        """Raw-text bytes per id: byte-level pieces through GPT-2's alphabet; SentencePiece-style
        pieces with ▁ as a space and <0xNN> as one byte; added/special tokens 0."""
        byte_level = '"ByteLevel"' in json.dumps(json.loads(self.json).get("decoder") or {})
        inv = _byte_decoder()
        added = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        table = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            piece = self.tok.id_to_token(i)
            if piece is None or piece in added:
                continue
            if byte_level:
                table[i] = len(piece) if all(c in inv for c in piece) else len(piece.encode("utf-8"))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                table[i] = 1
            else:
                table[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        for i in self.special.values():
            table[i] = 0
        return table

    @classmethod
    def build(cls, cfg: TokenizerConfig, texts: Iterable[str]) -> HFTokenizer:
        if not cfg.path or not os.path.exists(cfg.path):
            raise FileNotFoundError(
                f"data.tokenizer.kind=hf needs data.tokenizer.path=<tokenizer.json>; got {cfg.path!r}"
            )
        with open(cfg.path, encoding="utf-8") as f:
            return cls(f.read(), hf_special_tokens(os.path.dirname(cfg.path)), cfg.special_tokens)

    @classmethod
    def load(cls, directory: str, meta: dict) -> HFTokenizer:
        with open(os.path.join(directory, cls.FILE), encoding="utf-8") as f:
            return cls(f.read(), meta.get("special_tokens", {}), meta.get("extra", ()))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, self.FILE), "w", encoding="utf-8") as f:
            f.write(self.json)
        extra = [k for k in self.special if k not in ("pad", "eos", "bos") and k not in self.special_tokens]
        _write_meta(directory, {**self._meta(), "special_tokens": self.special_tokens, "extra": extra})


def hf_special_tokens(directory: str) -> dict[str, str]:
    """bos/eos/pad token strings from a Hugging Face model directory's tokenizer_config.json."""
    out: dict[str, str] = {}
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            tc = json.load(f)
        for name in ("bos", "eos", "pad"):
            v = tc.get(f"{name}_token")
            v = v.get("content") if isinstance(v, dict) else v
            if v:
                out[name] = v
    return out


GPT2_DIR = os.path.join(os.path.dirname(__file__), "gpt2")


@TOKENIZERS.register("gpt2")
class GPT2Tokenizer(HFTokenizer):
    """OpenAI's original GPT-2 byte-level BPE (50,257 ids; llm/data/gpt2/, provenance there),
    run by the `tokenizers` library: GPT-2's regex pre-split, byte-level alphabet, 50,000 merges.
    `<|endoftext|>` (50256) is eos, bos and pad."""

    kind = "gpt2"
    EOT = "<|endoftext|>"

    def __init__(self, extra: Sequence[str] = ()):
        super().__init__(gpt2_tokenizer_json(), {"eos": self.EOT, "bos": self.EOT, "pad": self.EOT}, extra)

    @classmethod
    def build(cls, cfg: TokenizerConfig, texts: Iterable[str]) -> GPT2Tokenizer:
        return cls(cfg.special_tokens)

    @classmethod
    def load(cls, directory: str, meta: dict) -> GPT2Tokenizer:
        return cls(meta.get("extra", ()))

    def save(self, directory: str) -> None:  # the files ship with the package
        extra = [k for k in self.special if k not in ("pad", "eos", "bos")]
        _write_meta(directory, {**self._meta(), "extra": extra})


def gpt2_tokenizer_json() -> str:
    """The GPT-2 tokenizer as a `tokenizers` JSON, built from encoder.json and vocab.bpe."""
    return bpe_tokenizer_json(os.path.join(GPT2_DIR, "encoder.json"), os.path.join(GPT2_DIR, "vocab.bpe"))


def bpe_tokenizer_json(vocab_path: str, merges_path: str) -> str:
    """A byte-level BPE in GPT-2's format (vocab.json/encoder.json + merges.txt/vocab.bpe) as a
    `tokenizers` JSON: GPT-2's regex pre-split, no prefix space, `<|endoftext|>` special if present."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        merges = [
            tuple(line.split()) for line in f.read().split("\n") if line and not line.startswith("#version")
        ]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if GPT2Tokenizer.EOT in vocab:
        tok.add_special_tokens([AddedToken(GPT2Tokenizer.EOT, special=True)])
    return tok.to_str()


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


def is_tokenizer_file(name: str) -> bool:
    """The files a tokenizer's `save` writes into a run directory (what copying a tokenizer copies)."""
    return name.startswith("tokenizer.") or name == HFTokenizer.FILE


def load_tokenizer(directory: str) -> Tokenizer:
    """Load the tokenizer saved in a run directory (local or gs://: its tokenizer.* files are
    fetched to a temporary directory first)."""
    from llm import fs  # noqa: PLC0415

    if fs.is_remote(directory):
        import tempfile  # noqa: PLC0415

        from etils import epath  # noqa: PLC0415

        if not fs.exists(fs.join(directory, META_FILE)):
            raise FileNotFoundError(f"no tokenizer in {directory} (expected {META_FILE})")
        with tempfile.TemporaryDirectory() as local:
            for f in epath.Path(directory).iterdir():
                if is_tokenizer_file(f.name):
                    (epath.Path(local) / f.name).write_bytes(f.read_bytes())
            return load_tokenizer(local)
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no tokenizer in {directory} (expected {META_FILE})")
    with open(meta_path) as f:
        meta = json.load(f)
    return TOKENIZERS.get(meta["kind"], f"{meta_path} kind").load(directory, meta)


def save_tokenizer(tok: Tokenizer, directory: str) -> None:
    """`tok.save(directory)`, for a gs:// directory through a local temporary one."""
    from llm import fs  # noqa: PLC0415

    if not fs.is_remote(directory):
        tok.save(directory)
        return
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as local:
        tok.save(local)
        fs.copy_tree(local, directory)


def build_tokenizer(cfg: TokenizerConfig, directory: str, texts: Iterable[str]) -> Tokenizer:
    """The run's tokenizer: reuse the one saved in `directory` (resume), else build one."""
    from llm import fs  # noqa: PLC0415

    if fs.exists(fs.join(directory, META_FILE)):
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


def fingerprint(tok: Tokenizer) -> str:
    """A short hash of what `save` writes (model file and vocabulary/special-token metadata): two
    tokenizers with the same fingerprint map text to the same ids."""
    import hashlib  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
    return f"{tok.kind}:{h.hexdigest()[:16]}"
