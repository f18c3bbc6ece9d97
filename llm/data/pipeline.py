"""Tokenize -> pack into windows (segment ids, positions) -> shuffle -> batch -> shard by process.

The token stream is every document followed by EOS, concatenated; window i holds tokens
[i*T, i*T + T] (T+1 tokens: inputs and the shifted targets). `segment_ids` number the documents
so attention never crosses a document boundary, and `positions` restart at each document start
(or at the window start). A target is scored only if it belongs to the same document as its input.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import grain
import numpy as np

from llm.data.tokenizers import Tokenizer

FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def tokenize(docs: list[str], tok: Tokenizer, pause_rate: float = 0.0, pause_id: int | None = None,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(ids [N], segment [N]): each document's ids plus EOS; segment = document number (>= 1).
    With `pause_rate`, pause tokens are inserted (llm/data/pause.py; seeded per document)."""
    from llm.data.pause import insert_pauses  # noqa: PLC0415

    def encode(i_doc):
        i, d = i_doc
        ids = tok.encode(d)
        if pause_rate and pause_id is not None:
            ids = insert_pauses(ids, pause_rate, pause_id, np.random.default_rng([seed, i]))
        return np.asarray(ids + [tok.eos_id])

    encoded = grain.MapDataset.source(list(enumerate(docs))).map(encode)
    parts = list(encoded)
    ids = np.concatenate(parts).astype(np.int32)
    seg = np.concatenate([np.full(len(p), i + 1, np.int32) for i, p in enumerate(parts)])
    return ids, seg


class PackedWindows:
    """Random access to fixed-length windows of the token stream (a grain data source)."""

    def __init__(self, ids: np.ndarray, seg: np.ndarray, seq_len: int, include_partial: bool,
                 pause_id: int | None = None):  # fmt: skip
        self.ids, self.seg, self.seq_len, self.pause_id = ids, seg, seq_len, pause_id
        full = max(0, (len(ids) - 1) // seq_len)
        partial = include_partial and (len(ids) - 1) % seq_len > 0
        self.n = full + int(partial)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int, offset: int = 0) -> dict[str, np.ndarray]:
        t = self.seq_len
        start = i * t + offset
        chunk = self.ids[start : start + t + 1]
        seg = self.seg[start : start + t + 1]
        if len(chunk) < t + 1:  # last, partial window (eval only): pad with segment 0
            pad = t + 1 - len(chunk)
            chunk, seg = np.pad(chunk, (0, pad)), np.pad(seg, (0, pad))
        ex = make_example(chunk, seg)
        if self.pause_id is not None:  # a pause is never a scored target
            ex["loss_mask"] = ex["loss_mask"] * (ex["targets"] != self.pause_id)
        return ex


def make_example(chunk: np.ndarray, seg: np.ndarray) -> dict[str, np.ndarray]:
    seg_in, seg_tgt = seg[:-1], seg[1:]
    idx = np.arange(len(seg_in))
    starts = np.where(np.concatenate([[True], seg_in[1:] != seg_in[:-1]]), idx, 0)
    positions = idx - np.maximum.accumulate(starts)
    return {
        "tokens": chunk[:-1].astype(np.int32),
        "targets": chunk[1:].astype(np.int32),
        "positions": positions.astype(np.int32),
        "segment_ids": seg_in.astype(np.int32),
        "loss_mask": ((seg_in == seg_tgt) & (seg_in > 0)).astype(np.int32),
    }


def stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


MIXTURE_FIELD = "mixture"  # [global batch] dataset index of each row (a mixture only; not a model input)


def _window_order(windows, global_batch: int, seed: int, shift_windows: bool) -> grain.MapDataset:
    """Infinite [window index, offset] pairs: a seeded shuffle per epoch (see train_dataset)."""
    shift_windows = shift_windows and getattr(windows, "shiftable", True)  # examples are not a stream
    n = len(windows) - int(shift_windows)
    if n < global_batch:
        raise ValueError(
            f"the training split has {len(windows)} windows of data.seq_len={windows.seq_len} "
            f"tokens, fewer than one batch (train.batch_size={global_batch}); use a larger "
            f"corpus, a smaller batch or a shorter seq_len"
        )
    t = windows.seq_len

    def with_offset(g: int, i: int) -> np.ndarray:
        epoch = g // n
        off = int(np.random.default_rng([seed, epoch]).integers(t)) if shift_windows else 0
        return np.asarray([i, off], np.int64)

    return grain.MapDataset.range(n).shuffle(seed=seed).repeat(None).map_with_index(with_offset)


def train_dataset(
    windows, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
    shift_windows: bool = False,
) -> grain.MapDataset:  # fmt: skip
    """Infinite, seeded, reshuffled each epoch; yields this process's rows of each global batch.

    Global batch j is windows order[j*B:(j+1)*B]; process p reads only rows [p*B/P, (p+1)*B/P),
    so any process count sees the same global batches in the same row order.

    With `shift_windows`, epoch e tiles the token stream from a seeded offset in [0, T): a small
    corpus seen for many epochs then never repeats a window exactly (the model cannot memorise
    fixed cut points), while each epoch still covers the stream once. One window is dropped to
    leave room for the offset.

    A `prepared.Mixture` interleaves its datasets' orders (each shuffled and repeated on its own)
    by weight with grain's deterministic `MapDataset.mix`: row g of the stream is a fixed function
    of g and the weights, so a resume continues exactly; other weights give another stream (each
    dataset's position in its own order is not carried over). Each batch then also carries
    `MIXTURE_FIELD`, the dataset of every row of the global batch, for the realised proportions.
    """
    from llm.data.prepared import Mixture  # noqa: PLC0415

    mixed = isinstance(windows, Mixture)
    parts = windows.components if mixed else [windows]
    orders = []
    for c, w in enumerate(parts):
        if mixed and len(w) - int(shift_windows) < 1:
            raise ValueError(
                f"data.mixture: {windows.names[c]} has no training window of data.seq_len tokens"
            )
        order = _window_order(w, 1 if mixed else global_batch, seed + 1_000_003 * c, shift_windows)
        orders.append(order.map(functools.partial(lambda c, row: np.concatenate([[c], row]), c)))
    order = grain.MapDataset.mix(orders, windows.weights) if mixed else orders[0]
    local = global_batch // process_count
    lo = process_index * local

    def read(rows: np.ndarray) -> dict[str, np.ndarray]:  # [B, 3]: dataset, window index, offset
        batch = stack([parts[int(c)].__getitem__(int(i), int(o)) for c, i, o in rows[lo : lo + local]])
        if mixed:
            batch[MIXTURE_FIELD] = rows[:, 0].astype(np.int32)
        return batch

    return order.batch(global_batch, drop_remainder=True).map(read)


def train_iterator(ds: grain.MapDataset, threads: int):
    """A checkpointable grain iterator (get_state/set_state) with background prefetch."""
    opts = grain.ReadOptions(num_threads=max(threads, 0), prefetch_buffer_size=max(2 * threads, 1))
    return iter(ds.to_iter_dataset(read_options=opts))


def eval_batches(
    windows: PackedWindows, global_batch: int, process_index: int = 0, process_count: int = 1,
    max_batches: int = 0,
) -> Iterator[dict[str, np.ndarray]]:  # fmt: skip
    """The held-out windows in order, this process's rows, the last batch padded (loss_mask 0)."""
    local = global_batch // process_count
    n_batches = -(-len(windows) // global_batch)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    if hasattr(windows, "empty"):  # a source with its own padding row (classification examples)
        empty = windows.empty()
    else:
        empty = make_example(np.zeros(windows.seq_len + 1, np.int32), np.zeros(windows.seq_len + 1, np.int32))
    for b in range(n_batches):
        rows = range(b * global_batch + process_index * local, b * global_batch + (process_index + 1) * local)
        yield stack([windows[i] if i < len(windows) else empty for i in rows])
