"""Inference: KV-cached prefill/decode engine, sampling, int8 weight quantization, generation."""

from llm.infer.engine import Sampling, decode_step, init_cache, prefill
from llm.infer.generation import generate, generate_ids, generate_stream, prepare_params, shard_params
from llm.model.quant import QTensor, dequantize, param_bytes, quantize_params

__all__ = [
    "QTensor", "Sampling", "decode_step", "dequantize", "generate", "generate_ids", "generate_stream",
    "init_cache", "param_bytes", "prefill", "prepare_params", "quantize_params", "shard_params",
]  # fmt: skip
