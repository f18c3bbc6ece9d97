"""int8 weight-only quantization for inference, with one fp32 scale per output channel.

`quantize_params` turns every matrix of a params tree into a `QTensor` (int8 values plus fp32
scales); vectors (biases, norm scales) stay as they are. Inference functions call `dequantize`
inside the compiled step, so the weights live on the device as int8 (about 4x smaller than fp32)
and are widened layer by layer where they are used: XLA fuses the convert-and-scale into the
matmul operand on TPU/GPU; on CPU it materialises a transient copy per matrix.

Per output channel: a matmul y = x W contracts W's input axes, so one scale per output channel
factors out of the sum (y = (x q) * s) and the error of each output is bounded by its own scale.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llm.model import layout
from llm.registry import ConfigError

QUANT_KINDS = ("none", "int8")

# Leading (contracted) axes of a kernel, by the name of the module that owns it. A kernel not
# listed here contracts its first axis (Dense: D->F, DenseGeneral q/k/v: D->(N,H)).
CONTRACTED_AXES: dict[str, int] = {"out": 2}  # attention output: (N, H) -> D
EXPERT_WEIGHTS = ("w_in", "w_gate", "w_out")  # MoE experts' matrices (llm/model/moe.py)


@struct.dataclass
class QTensor:
    """An int8 tensor and its per-output-channel fp32 scales (size 1 along contracted axes)."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.q.shape

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def quantize_tensor(w, contracted: tuple[int, ...]) -> QTensor:
    """Symmetric int8: scale = max|w| / 127 over the contracted axes, q = round(w / scale)."""
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=contracted, keepdims=True)
    # A channel of zeros gets scale 1 (not 0) so dequantisation never divides by zero.
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return QTensor(q=q, scale=scale)


def contracted_axes(path: tuple[str, ...], leaf) -> tuple[int, ...] | None:
    """Axes to reduce for the scale of this leaf, or None to keep it in floating point."""
    if leaf.ndim < 2 or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return None
    name = path[-1] if path else ""
    if name == "embedding":
        # Rows are tokens: one scale per row serves the lookup and the tied output projection
        # (logits = x E^T contracts the embed axis, so a row is an output channel there).
        return tuple(range(1, leaf.ndim))
    # Under scan_layers the stacked block has the repeat index as its leading axis: each layer
    # keeps its own scales.
    lead = 1 if path and path[0] == layout.SCANNED else 0
    if name == "kernel":
        owner = path[-2] if len(path) > 1 else ""
        n = CONTRACTED_AXES.get(owner, 1)
        return tuple(range(lead, lead + n))
    if name in EXPERT_WEIGHTS:  # routed experts [E, in, out]: per expert and output channel
        return (lead + 1,)
    return None


def quantize_params(params: Any, kind: str = "int8") -> Any:
    """A params tree with every weight matrix as an int8 `QTensor` (kind 'none' returns params)."""
    if kind not in QUANT_KINDS:
        raise ConfigError(f"unknown quantization {kind!r}; valid choices: {', '.join(QUANT_KINDS)}")
    if kind == "none":
        return params

    def one(path, leaf):
        if isinstance(leaf, QTensor):
            return leaf
        names = tuple(str(getattr(k, "key", k)) for k in path)
        axes = contracted_axes(names, leaf)
        return leaf if axes is None else quantize_tensor(leaf, axes)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, QTensor))


def dequantize(params: Any, dtype=jnp.float32) -> Any:
    """The tree with every `QTensor` widened back to `dtype` (a no-op for unquantized params)."""
    return jax.tree.map(
        lambda x: x.dequantize(dtype) if isinstance(x, QTensor) else x,
        params,
        is_leaf=lambda x: isinstance(x, QTensor),
    )


def is_quantized(params: Any) -> bool:
    return any(
        isinstance(x, QTensor) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QTensor))
    )


def param_bytes(params: Any) -> int:
    """Bytes the tree occupies on device (int8 values plus their scales for a quantized tree)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
