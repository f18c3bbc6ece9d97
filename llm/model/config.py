"""Frozen, validated model configuration (the library never sees an ml_collections object).

Shape legend used across the model code: B batch, T query length, S key length, D model dim,
N query heads, K kv heads, G query heads per kv head (N = K*G), H head dim, F ffn dim, V vocab,
L layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from llm.registry import ConfigError

NORM_POSITIONS = ("pre", "post")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LocalConfig:
    """Sliding-window attention (`kind=local` layers)."""

    window: int = 128  # a query sees the last `window` positions of its document, itself included


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (`kind=mla`, DeepSeek-V2/V3; llm/model/mla.py)."""

    q_lora_rank: int | None = None  # None = full-rank queries
    kv_lora_rank: int = 64  # the cached latent per token
    qk_nope_head_dim: int = 32  # per-head query/key channels without rotation
    qk_rope_head_dim: int = 16  # rotary channels (the key's are shared by all heads)
    v_head_dim: int = 32
    absorb: bool = False  # decode with W_uk / W_uv folded into query and output (same logits)


@dataclass(frozen=True)
class InfiniConfig:
    """Infini-attention (`kind=infini`; llm/model/infini.py; Munkhdalai et al. 2024)."""

    segment_len: int = 64  # tokens per segment: local softmax attention inside, compressive memory across
    # memory update: linear (M += s(K)^T V) | delta (M += s(K)^T (V - retrieved)). Not called `update`:
    # ml_collections' ConfigDict.update would shadow it on the command line.
    update_rule: str = "linear"
    gate_init: float = 0.0  # initial beta; sigmoid(beta) mixes memory (1) and local (0) attention
    memory_positional: bool = False  # rotate Q/K on the memory path by RoPE too (off, as working ports do)
    first_segment: str = (
        "skip"  # skip: no memory term where a document has none yet | eps: eps-guarded always
    )
    bptt_segments: int | None = None  # stop gradients through the memory every k segments; None = full
    # 0: each layer scans its segments over the whole sequence (activations linear in T). k >= 1:
    # the train/eval step runs the whole stack over k segments at a time, carrying every layer's
    # (M, z) (llm/train/recurrent.py): memory flat in T; every attention layer must be infini.
    chunk_segments: int = 0


@dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency scaling for contexts beyond the trained one (`model.rope_scaling.`)."""

    kind: str | None = None  # None = plain RoPE | llama3 (Llama 3.1: llm/model/positional.py)
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192  # the context the unscaled model was trained on


@dataclass(frozen=True)
class AttentionConfig:
    """Self-attention: head layout (MHA/GQA/MQA), kind, options and implementation."""

    # registry ATTENTION: causal | local | nope | mla | differential | infini (llm/model/attention.py,
    # mla.py, differential.py, infini.py)
    kind: str = "causal"
    # Attention kinds cycling over depth, e.g. ('local','local','causal'); unset = every layer `kind`.
    pattern: tuple[str, ...] | None = None
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (MHA); 1 = MQA; else GQA
    head_dim: int | None = None  # None = d_model // n_heads
    dropout: float = 0.0  # on attention probabilities
    impl: str = "fused"  # registry ATTENTION_IMPL: fused (default) | einsum (autodiff reference) | jax
    # impl=fused, full-sequence passes: query rows in blocks of this many, each attending only to keys
    # up to its block's end, so the causally masked upper blocks are never computed (0 = one block)
    query_block: int = 128
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (OLMo-2, Gemma-3)
    logit_softcap: float | None = None  # C * tanh(score / C) (Gemma-2); None = off
    sinks: bool = False  # a learned per-head logit in the softmax denominator (gpt-oss, StreamingLLM)
    nope_every: int = 0  # > 0: every nope_every-th layer has no positional rotation/bias (NoPE)
    local: LocalConfig = field(default_factory=LocalConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)
    infini: InfiniConfig = field(default_factory=InfiniConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts knobs (`model.ffn.kind=moe`; llm/model/moe.py). The expert MLP is `model.mlp`."""

    num_experts: int = 8
    top_k: int = 2
    every: int = 1  # MoE at layers first_dense, first_dense + every, ...; the others stay dense
    first_dense: int = 0  # the first layers keep a dense FFN (DeepSeek, Qwen)
    shared_experts: int = 0  # always-on experts (a dense MLP shared_experts * expert_d_ff wide)
    expert_d_ff: int | None = None  # width of one expert; None = the dense FFN width (model.d_ff)
    router: str = "softmax_topk"  # registry ROUTERS: softmax_topk (Switch) | topk_softmax (Mixtral) | sigmoid (DeepSeek-V3)
    router_jitter: float = 0.0  # multiplicative noise on the router input while training (Switch)
    capacity_factor: float | None = None  # None = dropless; else an expert takes <= cf * tokens * k / E
    impl: str = "dropless"  # registry MOE_IMPLS: dropless (sorted, ragged_dot) | dense (one-hot einsums)
    aux_loss_weight: float = 0.01  # Switch load-balancing loss
    z_loss_weight: float = 0.001  # router z-loss (ST-MoE)
    bias_balancing_rate: float = (
        0.0  # > 0: auxiliary-loss-free balancing bias (DeepSeek-V3) updated at this rate
    )


@dataclass(frozen=True)
class FFNConfig:
    """The feed-forward sub-layer: its kind per layer (`model.mlp` picks the MLP a dense FFN uses)."""

    kind: str = "dense"  # registry FFN (llm/model/block.py): dense | moe
    moe: MoEConfig = field(default_factory=MoEConfig)

    def kinds(self, n_layers: int) -> tuple[str, ...]:
        """The FFN kind of every layer: with kind=moe, `moe.first_dense` dense layers, then MoE
        every `moe.every` layers (dense in between)."""
        if self.kind != "moe":
            return (self.kind,) * n_layers
        m = self.moe
        return tuple("moe" if i >= m.first_dense and (i - m.first_dense) % m.every == 0 else "dense"
                     for i in range(n_layers))  # fmt: skip


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on linear layers (`model.lora.`; llm/model/lora.py). rank 0 = off."""

    rank: int = 0
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, while training
    # aliases attention | attn_qv | mlp | all_linear, or regexes searched in module paths
    targets: tuple[str, ...] = ("attention",)
    # none | int8: hold the frozen base's layer kernels as int8 with per-channel scales (QLoRA-
    # style; needs train.init_from, the base to quantize)
    base_quant: str = "none"


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer. Every field is a command-line flag under `model.`."""

    vocab_size: int | None = None  # None = the tokenizer's size rounded up to a multiple of 64
    d_model: int = 128
    n_layers: int = 2
    d_ff: int | None = None  # None = 4*d_model (gelu) or 8/3*d_model rounded to 64 (swiglu)
    max_seq_len: int = 256  # size of the learned position table; bound for generation
    positional: str = "learned"  # learned | sinusoidal | rope | alibi | none
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # pre | post
    mlp: str = "gelu"  # gelu | swiglu
    use_bias: bool = True
    dropout: float = 0.0  # embedding and residual dropout
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype of activations and elementwise math
    param_dtype: str = "float32"
    # Autocast-style mixed precision: with dtype=float32, matmul_dtype=bfloat16 casts the inputs of
    # every matmul to bf16 (f32 accumulation, result back in f32) while norms, GELU, softmax and
    # the residual stream stay f32 (what torch.autocast does). None = matmuls in `dtype`.
    matmul_dtype: str | None = None
    init_std: float = 0.02
    final_logit_softcap: float | None = None  # C * tanh(logit / C) on the output logits (Gemma-2); None = off
    # Log the largest attention logit per layer and the largest output logit (the quantities
    # QK-norm and soft-capping keep in check) through the metrics channel.
    monitor_logits: bool = False
    scan_layers: bool = False  # nn.scan over layers: one compiled block, faster compile
    remat: str = "none"  # registry REMAT (llm/model/transformer.py)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # What the model outputs: `lm` (next-token logits [B, T, V]) or `classifier` (class logits
    # [B, n_classes] from the last real token's or the mean hidden state: `pool`), for train.task=classify.
    head: str = "lm"
    n_classes: int = 2
    pool: str = "last"  # last | mean

    def __post_init__(self):
        a = self.attention
        _check(self.d_model > 0 and self.n_layers > 0, "model.d_model and model.n_layers must be > 0")
        _check(a.n_heads > 0, "model.attention.n_heads must be > 0")
        if a.head_dim is None:
            _check(
                self.d_model % a.n_heads == 0,
                f"model.d_model={self.d_model} is not divisible by model.attention.n_heads="
                f"{a.n_heads}; choose n_heads dividing d_model or set model.attention.head_dim",
            )
        _check(
            a.n_heads % a.kv_heads == 0,
            f"model.attention.n_heads={a.n_heads} is not divisible by model.attention.n_kv_heads="
            f"{a.kv_heads}; n_kv_heads must divide n_heads (1 = MQA, n_heads = MHA)",
        )
        _check(
            self.norm_position in NORM_POSITIONS,
            f"unknown model.norm_position {self.norm_position!r}; valid choices: pre, post",
        )
        for name in ("dtype", "param_dtype"):
            v = getattr(self, name)
            _check(v in DTYPES, f"unknown model.{name} {v!r}; valid choices: {', '.join(DTYPES)}")
        _check(
            self.matmul_dtype is None or self.matmul_dtype in DTYPES,
            f"unknown model.matmul_dtype {self.matmul_dtype!r}; valid choices: {', '.join(DTYPES)} (or unset)",
        )
        _check(0.0 <= self.dropout < 1.0 and 0.0 <= a.dropout < 1.0, "dropout must be in [0, 1)")
        if self.ffn.kind == "moe":
            m = self.ffn.moe
            _check(m.num_experts >= 1 and 1 <= m.top_k <= m.num_experts,
                   f"model.ffn.moe: need 1 <= top_k ({m.top_k}) <= num_experts ({m.num_experts})")  # fmt: skip
            _check(m.every >= 1 and m.first_dense >= 0 and m.shared_experts >= 0,
                   "model.ffn.moe: every must be >= 1, first_dense and shared_experts >= 0")  # fmt: skip
            _check(m.capacity_factor is None or m.capacity_factor > 0,
                   f"model.ffn.moe.capacity_factor={m.capacity_factor} must be > 0 (unset = dropless)")  # fmt: skip
            _check(m.first_dense < self.n_layers,
                   f"model.ffn.moe.first_dense={m.first_dense} leaves no MoE layer in {self.n_layers} layers")  # fmt: skip
            _check(m.router_jitter >= 0 and m.bias_balancing_rate >= 0,
                   "model.ffn.moe.router_jitter and bias_balancing_rate must be >= 0")  # fmt: skip
        _check(
            a.pattern is None or len(a.pattern) > 0,
            "model.attention.pattern is empty; give kinds, e.g. \"('local','causal')\", or leave it unset",
        )
        if self.positional == "rope":
            _check(self.head_dim % 2 == 0, f"rope needs an even head_dim, got {self.head_dim}")
        r = self.rope_scaling
        _check(r.kind in (None, "llama3"), f"model.rope_scaling.kind={r.kind!r}: choose llama3 (or unset)")
        if r.kind == "llama3":
            _check(r.factor > 0 and r.high_freq_factor > r.low_freq_factor > 0 and r.original_max_len > 0,
                   "model.rope_scaling: factor > 0, high_freq_factor > low_freq_factor > 0, original_max_len > 0")  # fmt: skip
        kinds = set(a.pattern or (a.kind,))
        if "local" in kinds:
            _check(a.local.window >= 1, f"model.attention.local.window={a.local.window} must be >= 1")
        if "differential" in kinds:
            _check(self.head_dim % (4 if self.positional == "rope" else 2) == 0,
                   f"differential attention splits each head in two (rotary halves): head_dim {self.head_dim} "
                   f"must be divisible by {4 if self.positional == 'rope' else 2}")  # fmt: skip
        if "mla" in kinds:
            m = a.mla
            _check(min(m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) > 0
                   and (m.q_lora_rank is None or m.q_lora_rank > 0), "model.attention.mla: ranks and dims must be > 0")  # fmt: skip
            _check(
                m.qk_rope_head_dim % 2 == 0,
                f"model.attention.mla.qk_rope_head_dim={m.qk_rope_head_dim} must be even",
            )
        if "infini" in kinds:
            f = a.infini
            _check(f.segment_len >= 1, f"model.attention.infini.segment_len={f.segment_len} must be >= 1")
            _check(f.update_rule in ("linear", "delta"),
                   f"model.attention.infini.update_rule={f.update_rule!r}: choose 'linear' or 'delta'")  # fmt: skip
            _check(f.first_segment in ("skip", "eps"),
                   f"model.attention.infini.first_segment={f.first_segment!r}: choose 'skip' or 'eps'")  # fmt: skip
            _check(f.bptt_segments is None or f.bptt_segments >= 1,
                   "model.attention.infini.bptt_segments must be >= 1 (or unset = full backpropagation)")  # fmt: skip
            _check(f.chunk_segments >= 0, "model.attention.infini.chunk_segments must be >= 0 (0 = off)")
            _check(not f.chunk_segments or kinds == {"infini"},
                   f"model.attention.infini.chunk_segments={f.chunk_segments} runs the stack chunk by chunk, so every "
                   f"attention layer must carry its past in a memory: kinds {sorted(kinds)} include others; use "
                   "chunk_segments=0 or make every layer infini")  # fmt: skip
        for name in ("logit_softcap",):
            v = getattr(a, name)
            _check(v is None or v > 0, f"model.attention.{name}={v} must be > 0 (or unset)")
        _check(self.final_logit_softcap is None or self.final_logit_softcap > 0,
               f"model.final_logit_softcap={self.final_logit_softcap} must be > 0 (or unset)")  # fmt: skip
        _check(a.nope_every >= 0, "model.attention.nope_every must be >= 0 (0 = off)")
        _check(
            a.query_block >= 0, f"model.attention.query_block={a.query_block} must be >= 0 (0 = one block)"
        )
        _check(self.head in ("lm", "classifier"), f"model.head={self.head!r}: choose lm or classifier")
        _check(self.pool in ("last", "mean"), f"model.pool={self.pool!r}: choose last or mean")
        _check(self.n_classes >= 2, f"model.n_classes={self.n_classes} must be >= 2")
        lo = self.lora
        _check(lo.rank >= 0 and lo.alpha > 0 and 0 <= lo.dropout < 1,
               f"model.lora: rank >= 0 (0 = off), alpha > 0, 0 <= dropout < 1; got rank={lo.rank}, "
               f"alpha={lo.alpha}, dropout={lo.dropout}")  # fmt: skip
        _check(lo.rank or lo.base_quant == "none",
               "model.lora.base_quant quantizes a LoRA run's frozen base: set model.lora.rank > 0 too")  # fmt: skip
        if lo.rank:
            from llm.model import lora as lora_lib  # noqa: PLC0415

            _check(lo.base_quant in lora_lib.BASE_QUANT,
                   f"model.lora.base_quant={lo.base_quant!r}: choose one of {', '.join(lora_lib.BASE_QUANT)}")  # fmt: skip
            _check(bool(lo.targets), "model.lora.targets is empty; e.g. ('attention',) or ('all_linear',)")
            for t in lo.targets:
                try:
                    lora_lib.target_patterns([t])
                except Exception as e:  # noqa: BLE001 (re.error)
                    raise ConfigError(f"model.lora.targets: {t!r} is neither an alias "
                                      f"({', '.join(lora_lib.ALIASES)}) nor a regex ({e})") from e  # fmt: skip
        # Registry names are checked here too so a bad flag fails before any tracing.
        from llm.model import registries  # noqa: PLC0415 (avoid an import cycle)

        registries.check_model_names(self)

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.d_model // self.attention.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":
            return 64 * -(-int(8 * self.d_model / 3) // 64)
        return 4 * self.d_model

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)
