"""Run configuration: ml_collections at the edge, frozen validated dataclasses inside.

`from_config_dict(config_dict)` converts a `ConfigDict` (from `configs/*.py` plus command-line
overrides) into a `RunConfig`, rejecting unknown keys, wrong types and impossible combinations
before anything is compiled. Library code receives only the dataclass it needs.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llm.model.config import AttentionConfig, ModelConfig
from llm.registry import ConfigError, did_you_mean
from llm.sharding import MeshConfig

SP_MODEL_TYPES = ("bpe", "unigram")
PAUSE = "<pause>"  # the pause token's name (llm/data/pause.py)


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str = (
        "sentencepiece"  # registry TOKENIZERS (llm/data/tokenizers.py): sentencepiece | byte | gpt2 | hf
    )
    vocab_size: int = 2048  # sentencepiece only
    model_type: str = "bpe"  # bpe | unigram
    byte_fallback: bool = True
    path: str | None = (
        None  # an existing .model file (sentencepiece) or tokenizer.json (hf) instead of training one
    )
    # Named special tokens added to pad/eos/bos, e.g. ("<pause>",): ids of their own, 0 bytes of text.
    special_tokens: tuple[str, ...] = ()

    def __post_init__(self):
        from llm.data.tokenizers import TOKENIZERS  # noqa: PLC0415 (import cycle)

        kinds = TOKENIZERS.names(sort=False)
        if self.kind not in kinds:
            raise ConfigError(f"unknown data.tokenizer.kind {self.kind!r}; valid choices: "
                              f"{', '.join(kinds)}." + did_you_mean(self.kind, kinds))  # fmt: skip
        if self.model_type not in SP_MODEL_TYPES:
            raise ConfigError(f"unknown data.tokenizer.model_type {self.model_type!r}; valid "
                              f"choices: {', '.join(SP_MODEL_TYPES)}")  # fmt: skip


@dataclass(frozen=True)
class ClassificationDataConfig:
    """Labelled texts for `data.kind=classification` (llm/data/classification.py)."""

    # class names in label-id order; empty = the sorted distinct labels of the corpus
    labels: tuple[str, ...] = ()
    split: tuple[float, ...] = (0.7, 0.1, 0.2)  # train / validation / test, stratified per class
    balanced: bool = False  # oversample the training examples of smaller classes to equal counts
    label_field: str = "label"  # JSONL field of the label (TSV: the first column)

    def __post_init__(self):
        if len(self.split) != 3 or min(self.split) < 0 or self.split[0] <= 0 or self.split[1] <= 0:
            raise ConfigError(f"data.classification.split={self.split}: three fractions (train, validation, "
                              "test), train and validation > 0")  # fmt: skip


@dataclass(frozen=True)
class InstructionDataConfig:
    """Instruction / response records for `data.kind=instructions` (llm/data/instructions.py)."""

    template: str = "alpaca"  # registry TEMPLATES: alpaca | phi3
    prompt_loss: bool = False  # also score the prompt's tokens (default: the response's alone)
    split: tuple[float, ...] = (0.85, 0.05, 0.10)  # train / validation / test, in file order (935/55/110)


@dataclass(frozen=True)
class PauseConfig:
    """Pause tokens (Goyal et al. 2023): a learned `<pause>` token (list it in
    data.tokenizer.special_tokens) the model may "think" on; it is never a scored target."""

    rate: float = 0.0  # pretraining: before each token, insert a pause with this probability (seeded)
    k: int = 0  # fine-tuning and inference: append k pauses after the prompt (or the classified text)


@dataclass(frozen=True)
class DataConfig:
    """Text corpus -> tokens -> packed windows of seq_len (+1 for the shifted targets)."""

    kind: str = "text"  # registry DATA_SOURCES (llm/data/sources.py): text | arrayrecord | ...
    corpus: str = "builtin:tinyshakespeare.txt"  # comma-separated paths/globs (.txt, .jsonl)
    # data.kind=arrayrecord (llm/data/prepared.py): a `python -m llm.data.prepare` output directory,
    # or a weighted mixture of several: ("web=/data/web@0.8", "code=gs://b/code@0.2").
    path: str | None = None
    mixture: tuple[str, ...] = ()
    eval_path: str | None = None  # a prepared held-out set; None = the last eval_fraction of the data
    eval_corpus: str | None = None  # None = hold out eval_fraction of the corpus
    eval_fraction: float = 0.1
    text_field: str = "text"  # JSONL field holding the document text
    seq_len: int = 256
    shift_windows: bool = True  # each epoch tiles the stream from a new seeded offset
    seed: int = 0
    worker_threads: int = 2  # grain prefetch threads
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    classification: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    instructions: InstructionDataConfig = field(default_factory=InstructionDataConfig)
    pause: PauseConfig = field(default_factory=PauseConfig)
    # data.kind=preferences (llm/data/preferences.py): train / validation fractions, in file order
    preference_split: tuple[float, ...] = (0.8, 0.2)

    def __post_init__(self):
        from llm.data.sources import DATA_SOURCES, _load_all  # noqa: PLC0415 (import cycle)

        _load_all()  # the kinds registered outside sources.py (classification, instructions, ...)
        DATA_SOURCES.get(self.kind, "data.kind")
        if self.pause.rate or self.pause.k:
            if not (0 <= self.pause.rate < 1 and self.pause.k >= 0):
                raise ConfigError(
                    f"data.pause: 0 <= rate < 1 and k >= 0; got rate={self.pause.rate}, k={self.pause.k}"
                )
            if PAUSE not in self.tokenizer.special_tokens:
                raise ConfigError(
                    f"data.pause needs the token: add --config.data.tokenizer.special_tokens=\"('{PAUSE}',)\""
                )
        if self.seq_len <= 0:
            raise ConfigError("data.seq_len must be > 0")
        if self.kind == "arrayrecord":
            from llm.data.prepared import parse_mixture  # noqa: PLC0415

            parse_mixture(self.mixture)
            if bool(self.path) == bool(self.mixture):
                raise ConfigError("data.kind=arrayrecord needs exactly one of --config.data.path=<prepared dir> "
                                  "or --config.data.mixture=\"('name=<dir>@<weight>', ...)\"")  # fmt: skip
            if self.mixture and self.eval_path:
                raise ConfigError("data.eval_path is for one dataset; a mixture holds out the last "
                                  "data.eval_fraction of each dataset")  # fmt: skip
            if self.pause.rate:
                raise ConfigError("data.pause.rate inserts pauses while tokenizing; prepared data is already "
                                  "tokenized: use data.kind=text for pause-token runs")  # fmt: skip
        elif self.path or self.mixture or self.eval_path:
            raise ConfigError(f"data.path / data.mixture / data.eval_path are read by data.kind=arrayrecord, "
                              f"not data.kind={self.kind}; for text use data.corpus / data.eval_corpus")  # fmt: skip
        if not 0.0 < self.eval_fraction < 1.0 and self.eval_corpus is None:
            raise ConfigError("data.eval_fraction must be in (0, 1) (or set data.eval_corpus)")


@dataclass(frozen=True)
class MuonConfig:
    """optim.name=muon: Muon (orthogonalised momentum) on the hidden weight matrices, Adam (optim.b1,
    b2, eps) on embeddings, the output head, norms, biases and routers (llm/train/optimizer.py)."""

    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5  # Newton-Schulz iterations
    # Updates scaled to RMS consistent_rms * sqrt(max(fan_in, fan_out)) (Liu et al. 2025): at 0.2 they
    # match AdamW's RMS, so optim.lr and weight_decay serve both halves. 0 = Keller Jordan's
    # sqrt(max(1, fan_out / fan_in)) scaling, which wants a ~20x larger lr: set lr_ratio.
    consistent_rms: float = 0.2
    lr_ratio: float = 1.0  # Muon's learning rate = the schedule's * lr_ratio


@dataclass(frozen=True)
class LionConfig:
    """optim.name=lion: sign of an interpolated momentum (Chen et al. 2023); wants ~3-10x less lr."""

    b1: float = 0.9
    b2: float = 0.99


@dataclass(frozen=True)
class AdafactorConfig:
    """optim.name=adafactor: factored second moments (row and column statistics of each matrix of
    at least min_dim_size_to_factor in both dims), no first moment by default: ~0 bytes of state
    per weight-matrix entry vs AdamW's 8 (Shazeer & Stern 2018)."""

    decay_rate: float = 0.8  # second-moment decay 1 - t^-decay_rate
    min_dim_size_to_factor: int = 128
    clipping_threshold: float = 1.0  # update RMS clipped to this per parameter (0 = off)
    momentum: float = 0.0  # > 0 adds a first moment (one more state tensor per parameter)
    multiply_by_parameter_scale: bool = False  # True: relative step sizes (the paper's; lr ~ 1e-2)
    eps: float = 1e-30


@dataclass(frozen=True)
class WSDConfig:
    """optim.schedule=wsd: warmup, a stable plateau at optim.lr, then a decay over the last
    decay_fraction of train.steps to lr * min_lr_ratio (Hägele et al. 2024): a run can be extended
    or branched from any plateau checkpoint by decaying from there."""

    decay_fraction: float = 0.2
    decay_shape: str = "linear"  # linear | cosine | sqrt (1 - sqrt)


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer (optim.name) and learning-rate schedule (optim.schedule); parameter groups
    (rules) decide decay, lr, freezing for every optimizer."""

    name: str = "adamw"  # registry OPTIMIZERS (llm/train/optimizer.py): adamw | muon | lion | adafactor
    schedule: str = "cosine"  # registry SCHEDULES: cosine | wsd | linear | constant (all after warmup)
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine / linear / wsd end at lr * min_lr_ratio at train.steps
    b1: float = 0.9  # AdamW's (and Muon's Adam half)
    b2: float = 0.95
    eps: float = 1e-8
    muon: MuonConfig = field(default_factory=MuonConfig)
    lion: LionConfig = field(default_factory=LionConfig)
    adafactor: AdafactorConfig = field(default_factory=AdafactorConfig)
    wsd: WSDConfig = field(default_factory=WSDConfig)
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    decay_embeddings: bool = False  # also decay embedding tables
    decay_norms_and_biases: bool = False
    # Parameter groups as rules over parameter paths, first match per setting wins, e.g.
    # ("infini/gate: lr_mult=100 decay=false", "^(embed|layer_0)/: frozen"); llm/train/optimizer.py.
    groups: tuple[str, ...] = ()

    def __post_init__(self):
        from llm.train.optimizer import OPTIMIZERS, SCHEDULES, WSD_SHAPES, parse_rule  # noqa: PLC0415 (import cycle)

        OPTIMIZERS.get(self.name, "optim.name")
        SCHEDULES.get(self.schedule, "optim.schedule")
        if self.wsd.decay_shape not in WSD_SHAPES:
            raise ConfigError(f"unknown optim.wsd.decay_shape {self.wsd.decay_shape!r}; valid choices: "
                              f"{', '.join(WSD_SHAPES)}")  # fmt: skip
        if not 0 < self.wsd.decay_fraction <= 1:
            raise ConfigError(f"optim.wsd.decay_fraction={self.wsd.decay_fraction} must be in (0, 1]")
        for rule in self.groups:
            parse_rule(rule)


@dataclass(frozen=True)
class TrainConfig:
    task: str = "lm"  # registry TASKS (llm/train/tasks.py): lm | classify | dpo
    dpo_beta: float = 0.1  # DPO: the strength of the implicit KL to the reference (train.task=dpo)
    # Start a new run from another run's parameters (fresh optimizer): "<run dir>[:step]".
    init_from: str | None = None
    steps: int = 1000
    batch_size: int = 32  # global, in sequences
    grad_accum: int = 1  # micro-batches per step (batch_size must divide)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200  # 0 = only at the end
    eval_batches: int = 0  # 0 = the whole held-out split
    eval_batch_size: int = 0  # 0 = batch_size
    nan_policy: str = "stop"  # stop | skip
    # Loss-spike skipping: an update whose loss exceeds mean + spike_sigmas * std of the last
    # spike_window applied losses is not applied (params and optimizer moments stay as they were)
    # and is counted in `spikes_total`. 0 = off. Changing it changes the checkpointed state.
    spike_window: int = 0
    spike_sigmas: float = 6.0
    # A resume may change train.steps / batch_size or the optim schedule fields only with this set
    # (the change is recorded in <workdir>/runs.jsonl): otherwise the run's curve would silently bend.
    allow_schedule_change: bool = False
    z_loss: float = 0.0  # PaLM's output z-loss weight (1e-4 in PaLM): z_loss * mean(logsumexp(logits)^2)
    progress: bool = True  # tqdm progress bar on the console
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)
    peak_tflops: float | None = None  # per-device peak TFLOP/s for MFU; None = llm/flops.py table
    profile_steps: int = 0  # >0: jax.profiler trace of this many steps into <workdir>/profile


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 200  # steps between saves (0 = only at the end / on signals)
    keep: int = 3
    async_save: bool = True
    # OCDBT (the default): one key-value database per item, few large files. False: a directory of
    # zarr chunks per array, for storage where OCDBT's manifest writes fail (the local GCS
    # emulator of tests/test_gcs.py). Either reads back whatever the checkpoint holds.
    ocdbt: bool = True


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self):
        t, d, m = self.train, self.data, self.model
        if t.batch_size % t.grad_accum:
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                              f"train.grad_accum={t.grad_accum}")  # fmt: skip
        if d.seq_len > m.max_seq_len:
            raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len="
                              f"{m.max_seq_len}; raise model.max_seq_len or lower data.seq_len")  # fmt: skip
        if t.z_loss < 0 or (t.z_loss and t.task != "lm"):
            raise ConfigError(
                f"train.z_loss={t.z_loss}: a weight >= 0 on the language-model loss (train.task=lm)"
            )
        if t.peak_tflops is not None and t.peak_tflops <= 0:
            raise ConfigError(f"train.peak_tflops={t.peak_tflops} must be > 0 (or unset for the chip table)")
        if t.spike_window < 0 or (t.spike_window and t.spike_window < 2):
            raise ConfigError(f"train.spike_window={t.spike_window}: use 0 (off) or a window of >= 2 steps")
        if m.lora.base_quant != "none" and not t.init_from:
            raise ConfigError(f"model.lora.base_quant={m.lora.base_quant} quantizes a pretrained base: set "
                              "train.init_from=<run dir> (the run whose parameters are the frozen base)")  # fmt: skip
        if t.spike_sigmas <= 0:
            raise ConfigError(f"train.spike_sigmas={t.spike_sigmas} must be > 0 (standard deviations)")
        from llm.train import dpo  # noqa: F401, PLC0415 (registers `dpo`; import cycle)
        from llm.train.tasks import TASKS  # noqa: PLC0415 (import cycle)

        TASKS.get(t.task, "train.task")
        if t.nan_policy not in ("stop", "skip"):
            raise ConfigError(f"unknown train.nan_policy {t.nan_policy!r}; valid choices: stop, skip")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def default_config_dict():
    """The ml_collections form of `RunConfig()`: every field a flag, every default written once.

    `configs/base.py` returns this; optional fields become `placeholder(type)` so that
    `--config.model.d_ff=1024` works on a field whose default is None (unset).
    """
    return to_config_dict(RunConfig())


def to_config_dict(obj):
    """A (nested) config dataclass instance -> ConfigDict with the same fields and values."""
    from ml_collections import config_dict  # noqa: PLC0415

    hints = typing.get_type_hints(type(obj))
    out = config_dict.ConfigDict()
    for f in dataclasses.fields(obj):
        value, typ = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            out[f.name] = to_config_dict(value)
        elif isinstance(value, Mapping):
            out[f.name] = config_dict.ConfigDict(dict(value))
        elif value is None:
            out[f.name] = config_dict.placeholder(_flag_type(typ))
        else:
            out[f.name] = value
    return out


def _flag_type(typ) -> type:
    """`int | None` -> int; `tuple[str, ...] | None` -> tuple: the type a placeholder accepts."""
    base = [t for t in typing.get_args(typ) if t is not type(None)] or [typ]
    return typing.get_origin(base[0]) or base[0]


def field_paths(cls=None, prefix: str = "") -> list[str]:
    """Every leaf field of the config dataclasses as a dotted flag path ('model.attention.kind')."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out += field_paths(typ, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def from_dict(cls, d: dict[str, Any], path: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with 'did you mean'."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        where = f"{path}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {where!r}; valid keys here: {', '.join(names)}."
                              + did_you_mean(key, names))  # fmt: skip
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where!r} must be a section, got {value!r}")
            value = from_dict(typ, value, where + ".")
        else:
            value = _coerce(value, typ, where)
        kwargs[key] = value
    return cls(**kwargs)


def _coerce(value, typ, where: str):
    """Check scalar types (ml_collections already type-checks overrides of existing keys)."""
    if typing.get_origin(typ) is tuple and isinstance(value, list):
        return tuple(value)  # JSON gives lists; frozen (hashable) configs keep tuples
    if typing.get_origin(typ) not in (None, typing.Union, types.UnionType):
        return value  # containers (e.g. mesh.rules) are checked by their dataclass
    base = [t for t in typing.get_args(typ) if t is not type(None)] or [typ]
    if value is None:
        return None
    want = base[0]
    if typing.get_origin(want) is tuple:  # JSON and flags give lists; frozen configs keep tuples
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {where!r} must be a tuple, e.g. \"('a','b')\", got {value!r}")
        return tuple(value)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want in (int, float, str, bool) and not isinstance(value, want):
        raise ConfigError(f"config key {where!r} must be {want.__name__}, got {value!r}")
    if want is int and isinstance(value, bool):
        raise ConfigError(f"config key {where!r} must be int, got {value!r}")
    return value


def from_config_dict(cd) -> RunConfig:
    """ConfigDict (or plain dict) -> RunConfig. Raises ConfigError naming the field and the fix."""
    d = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
    return from_dict(RunConfig, d)


def from_json(text: str) -> RunConfig:
    return from_dict(RunConfig, json.loads(text))


__all__ = [
    "AttentionConfig", "CheckpointConfig", "ConfigError", "DataConfig", "MeshConfig",
    "ModelConfig", "OptimConfig", "RunConfig", "TokenizerConfig", "TrainConfig",
    "default_config_dict", "field_paths", "from_config_dict", "from_json",
]  # fmt: skip
