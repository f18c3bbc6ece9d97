"""Pause tokens (Goyal et al. 2023, "Think before you speak", arXiv:2310.02226): `data.pause.*`.

A `<pause>` token is a registered special token (`data.tokenizer.special_tokens`) with its own
learned embedding. In pretraining, `data.pause.rate` inserts one before each token with that
probability (seeded per document, so the stream is reproducible); in fine-tuning, `data.pause.k`
pauses follow every prompt (instructions) or text (classification: the classifier then reads the
last pause's state); at inference the same k are appended to the prompt before the answer.
A pause is never a scored target (`loss_mask` is 0 where the target is a pause); the output at a
pause position that predicts a real token is scored as usual, so the model learns to use the
extra positions for the next real token.
"""

from __future__ import annotations

import numpy as np

from llm.config import PAUSE


def pause_id(tok, cfg) -> int | None:
    """The tokenizer's pause id when the run uses pauses, else None."""
    if not (cfg.pause.rate or cfg.pause.k):
        return None
    return tok.special_id(PAUSE)


def insert_pauses(ids: list[int], rate: float, pid: int, rng: np.random.Generator) -> list[int]:
    """`ids` with a pause before each token with probability `rate`."""
    if rate <= 0 or not ids:
        return ids
    before = rng.random(len(ids)) < rate
    out: list[int] = []
    for tok_id, p in zip(ids, before, strict=True):
        if p:
            out.append(pid)
        out.append(tok_id)
    return out


def append_pauses(ids: list[int], k: int, pid: int | None) -> list[int]:
    return ids + [pid] * k if k and pid is not None else ids
