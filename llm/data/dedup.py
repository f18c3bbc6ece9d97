"""Exact and near-duplicate detection for `python -m llm.data.prepare`.

Exact: a 128-bit BLAKE2 digest of the text with whitespace runs collapsed (trailing spaces or a
reflowed line do not make a copy new).

Near: MinHash over word `shingle`-grams, the Jaccard similarity estimated by the fraction of
equal signature entries, found with LSH banding: the signature is cut into `bands` bands of `rows`
rows and two documents become candidates if any band is equal. A candidate counts as a duplicate
only if its estimated Jaccard similarity to the earlier kept document is >= `threshold` (the
banding alone has a soft S-curve around it). The first occurrence in input order is kept, so the
result does not depend on the number of worker processes.

Signatures are computed in the workers (`signature`); the index (`NearDuplicateIndex`) lives in
the one process that decides, and holds per kept document its signature (4 * num_perm bytes) and
one dict entry per band (~100 bytes each): about 2.5 KB per document at the defaults, 2.5 GB per
million documents. Beyond that, deduplicate per shard of the input first.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

_WS = re.compile(r"\s+")
WORD = re.compile(r"\w+")


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(_WS.sub(" ", text).strip().encode(), digest_size=16).digest()


class MinHasher:
    """`num_perm` hash functions h(x) = ((a x + b) mod 2^64) >> 32 over 32-bit shingle hashes:
    multiply-shift, 2-universal for 32-bit keys with random 64-bit a, b (uint64 products wrap).
    (An affine map mod a prime needs a large multiplier for the same effect: with a x below the
    prime the "permutations" all order shingles by x alike and the estimates collapse.)"""

    def __init__(self, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)
        self.num_perm, self.shingle = num_perm, shingle

    def shingles(self, words: list[str]) -> set[str]:
        n = min(self.shingle, len(words))
        return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)} if words else set()

    def signature(self, words: list[str]) -> np.ndarray | None:
        """[num_perm] uint32, or None for a document without words (only exact dedup applies)."""
        grams = self.shingles(words)
        if not grams:
            return None
        x = np.fromiter((zlib.crc32(g.encode()) for g in grams), np.uint64, len(grams))
        h = (x[:, None] * self.a[None, :] + self.b[None, :]) >> np.uint64(32)  # [S, P], wraps mod 2^64
        return h.min(axis=0).astype(np.uint32)


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm, minimising the area of false positives below the
    threshold plus false negatives above it under the candidate curve 1 - (1 - s^r)^b."""
    s = np.linspace(0, 1, 1001)
    best, best_err = (1, num_perm), np.inf
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        p = 1 - (1 - s**rows) ** bands
        err = np.trapezoid(np.where(s < threshold, p, 1 - p), s)
        if err < best_err:
            best, best_err = (bands, rows), err
    return best


class NearDuplicateIndex:
    """Signatures of the kept documents, banded for LSH lookup."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128):
        self.threshold = threshold
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.tables: list[dict[bytes, int]] = [{} for _ in range(self.bands)]
        self.sigs = np.zeros((1024, num_perm), np.uint32)
        self.n = 0

    def _keys(self, sig: np.ndarray) -> list[bytes]:
        r = self.rows
        return [sig[i * r : (i + 1) * r].tobytes() for i in range(self.bands)]

    def check_and_add(self, sig: np.ndarray) -> bool:
        """True if `sig` is a near-duplicate of a kept document; else keep it (add to the index)."""
        keys = self._keys(sig)
        for table, key in zip(self.tables, keys):
            j = table.get(key)
            if j is not None and np.mean(self.sigs[j] == sig) >= self.threshold:
                return True
        if self.n == len(self.sigs):
            self.sigs = np.concatenate([self.sigs, np.zeros_like(self.sigs)])
        self.sigs[self.n] = sig
        for table, key in zip(self.tables, keys):
            table.setdefault(key, self.n)
        self.n += 1
        return False
