"""What every layer is told about the tokens besides their hidden states: `LayerContext`.

The transformer builds it once per call; attention kinds build their own mask, bias and cache
from it, so a kind can be causal, windowed, segment-recurrent or latent without the transformer
knowing. `mask_B1TS` is the standard causal mask (queries see earlier keys of the same document
that hold real tokens), built once because most kinds use it as is; a kind that needs another
(a sliding window, memory segments) derives it from the positions, segment ids and key fields.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class LayerContext:
    positions_BT: jax.Array  # position of each query token in its document (restarts per document)
    segment_ids_BT: jax.Array  # document id of each query token; 0 = padding
    key_positions_BS: jax.Array  # position of each key: = positions_BT in training, cache slots' in decode
    key_valid_BS: jax.Array  # the key holds a real token (segment id != 0; in decode: a filled slot)
    mask_B1TS: jax.Array  # the standard causal mask (bool)
    decode_index: jax.Array | None = None  # decode: cache slot of the first of the T new tokens; else None
    # 0-based depth of the layer being called (an int unrolled, a traced scalar under nn.scan);
    # the transformer and the super-block set it (differential attention's lambda_init reads it).
    layer: jax.Array | int = 0
    deterministic: bool = struct.field(pytree_node=False, default=True)  # no dropout

    @property
    def decoding(self) -> bool:
        return self.decode_index is not None


def causal_mask(segment_ids_BT) -> jax.Array:
    """Causal mask that also keeps tokens of different packed documents apart: B 1 T S (bool)."""
    t = segment_ids_BT.shape[1]
    causal_TS = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    same_doc_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return (causal_TS[None] & same_doc_BTS)[:, None]


def training_context(positions_BT, segment_ids_BT, deterministic: bool) -> LayerContext:
    """Context of a full-sequence forward pass (training, evaluation, scoring)."""
    return LayerContext(
        positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, key_positions_BS=positions_BT,
        key_valid_BS=segment_ids_BT != 0, mask_B1TS=causal_mask(segment_ids_BT), deterministic=deterministic,
    )  # fmt: skip


def decode_context(
    module: nn.Module, positions_BT, segment_ids_BT, deterministic: bool = True
) -> LayerContext:
    """Context for T new tokens joining the decode cache (slot bookkeeping lives in `module`'s cache).

    The model-level cache holds, per row and slot, the token's position and whether the slot holds
    a real token (padding and empty slots do not), so rows of different lengths share one cache.
    The mask lets a query see valid slots up to its own.
    """
    b, t = positions_BT.shape
    index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    key_pos = module.variable("cache", "key_pos", jnp.zeros, (b, t), jnp.int32)
    key_valid = module.variable("cache", "key_valid", jnp.zeros, (b, t), jnp.bool_)
    start = index.value
    key_pos.value = jax.lax.dynamic_update_slice(key_pos.value, positions_BT.astype(jnp.int32), (0, start))
    key_valid.value = jax.lax.dynamic_update_slice(key_valid.value, segment_ids_BT != 0, (0, start))
    index.value = start + t
    slot_S = jnp.arange(key_pos.value.shape[1])
    query_slot_T = start + jnp.arange(t)
    causal_TS = slot_S[None, :] <= query_slot_T[:, None]
    mask_B1TS = (key_valid.value[:, None, :] & causal_TS[None])[:, None]
    return LayerContext(
        positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, key_positions_BS=key_pos.value,
        key_valid_BS=key_valid.value, mask_B1TS=mask_B1TS, decode_index=start, deterministic=deterministic,
    )  # fmt: skip
