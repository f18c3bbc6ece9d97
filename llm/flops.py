"""Analytic training FLOPs per token, per-chip peak FLOP/s, and model FLOPs utilisation (MFU).

Per token of a training step (forward + backward = 3x the forward's 2 FLOPs per multiply-add):

    flops_per_token = 6 * (N_matmul + D*V) + 12 * L * T * N*H

- N_matmul: weights of every matmul in the blocks that a token passes through, embeddings
  excluded (attention q, k, v, out; MLP in/out, or gate/up/down for SwiGLU; for MoE layers the
  router and the top-k and shared experts only). Biases and norm scales are left out.
- D*V: the LM head (the tied embedding table or lm_head), a matmul although it is an embedding.
  The input embedding is a gather, 0 FLOPs.
- 12*L*T*N*H: attention scores q.k and the weighted sum p.v, T*N*H multiply-adds each per token
  and layer (2 FLOPs each), times 3 for training. Counted over the full T x T square as in PaLM
  (Chowdhery et al. 2022, appendix B) although causal masking could skip half; N*H = D in the usual
  layouts. Each attention kind reports its own (`score_macs`: a local layer sees min(T, window)
  keys, MLA's heads are qk_nope + qk_rope wide for scores and v_head_dim for values, differential
  attention computes two half-width maps), as it reports its matmul weights (`matmul_params`).

MFU = flops_per_token * tokens/s / (devices * peak). Remat recomputation is not counted (that
would be hardware FLOPs utilisation), so MFU compares layouts and remat policies fairly.
"""

from __future__ import annotations

from llm.model.config import ModelConfig

# Dense peak TFLOP/s per chip (one JAX device) by compute dtype, from the vendors' data sheets.
# float32 on GPUs: JAX's default matmul precision runs fp32 dots on TF32 tensor cores, so that is
# the reachable peak. TPUs have no separate fp32 matmul peak (fp32 dots run as bf16 passes), so
# fp32 there gives no MFU unless train.peak_tflops says what to compare with.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "TPU v4": {"bfloat16": 275.0},
    "TPU v5e": {"bfloat16": 197.0},
    "TPU v5p": {"bfloat16": 459.0},
    "TPU v6e": {"bfloat16": 918.0},
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0},
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0},  # SXM
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
}

# jax Device.device_kind -> table key; first match wins, so the more specific names come first.
_KIND_PATTERNS: list[tuple[str, str]] = [
    ("v6 lite", "TPU v6e"), ("v6e", "TPU v6e"),
    ("v5 lite", "TPU v5e"), ("v5e", "TPU v5e"), ("v5p", "TPU v5p"), ("TPU v5", "TPU v5p"),
    ("TPU v4", "TPU v4"),
    ("H100 PCIe", "H100 PCIe"), ("H100", "H100"), ("H200", "H200"), ("A100", "A100"),
]  # fmt: skip


def chip_name(device_kind: str) -> str | None:
    """Table key for a jax device_kind ('TPU v5 lite' -> 'TPU v5e'); None if unknown (e.g. CPU)."""
    return next((key for pat, key in _KIND_PATTERNS if pat.lower() in device_kind.lower()), None)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of one device for the compute dtype, or None if not in the table."""
    name = chip_name(device_kind)
    return PEAK_TFLOPS.get(name, {}).get(dtype) if name else None


def matmul_params(cfg: ModelConfig) -> int:
    """Weights of the matmuls one token passes through in all blocks (the N_matmul above):
    embeddings and head excluded; for an MoE layer only the router, the top-k routed and the
    shared experts (active parameters), as each FFN kind reports."""
    from llm.model import layout, registries  # noqa: PLC0415

    registries._load_all()
    specs = layout.layer_specs(cfg)
    attn = sum(registries.ATTENTION.get(s.attention).matmul_params(cfg) for s in specs)
    dense = registries.FFN.get("dense").active_matmul_params  # for kinds that do not say
    ffn = sum(getattr(registries.FFN.get(s.ffn), "active_matmul_params", dense)(cfg) for s in specs)
    return attn + ffn


def active_params(cfg: ModelConfig, total_params: int) -> int:
    """Parameters one token uses: all of them except the experts it is not routed to."""
    from llm.model import layout, registries  # noqa: PLC0415

    registries._load_all()
    unused = sum(
        getattr(registries.FFN.get(s.ffn), "inactive_params", lambda c: 0)(cfg)
        for s in layout.layer_specs(cfg)
    )
    return total_params - unused


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    from llm.model import layout, registries  # noqa: PLC0415

    registries._load_all()
    head = cfg.d_model * cfg.vocab_size
    attention = 6 * sum(
        registries.ATTENTION.get(s.attention).score_macs(cfg, seq_len) for s in layout.layer_specs(cfg)
    )
    return 6.0 * (matmul_params(cfg) + head) + attention


class Throughput:
    """Turns tokens/s into `tflops_per_device` and (where a peak is known) `mfu` metrics."""

    def __init__(self, cfg: ModelConfig, seq_len: int, devices, peak_override: float | None = None):
        devices = list(devices)
        self.n_devices = len(devices)
        self.flops_per_token = flops_per_token(cfg, seq_len)
        self.peak = peak_override or peak_tflops(devices[0].device_kind, cfg.dtype)

    def metrics(self, tokens_per_sec: float) -> dict[str, float]:
        tflops = self.flops_per_token * tokens_per_sec / self.n_devices / 1e12
        out = {"tflops_per_device": tflops}
        if self.peak:
            out["mfu"] = tflops / self.peak
        return out
