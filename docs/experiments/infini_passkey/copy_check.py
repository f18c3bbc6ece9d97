"""Does a passkey model copy at all? Teacher-forced exact match of the key at its three places in
training-format documents: the key's first mention (unpredictable: ~0), its second mention ~20
bytes later ("The pass key is K. Remember it. K is the pass key.": a short-range copy that any
attention within a 64-token window can do) and the answer at the end (long-range retrieval).

    .venv/bin/python docs/experiments/infini_passkey/copy_check.py runs/ip_cur2 runs/ip_gate \
        --data=runs/data/passkey.jsonl --n=80

A model that fails the second mention never learned to copy, so its 0 in the retrieval grid says
nothing about its memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
)

import llm  # noqa: E402
from llm import evaluate  # noqa: E402

PLACES = ("first mention", "second mention", "answer")


def key_scores(workdir: str, docs: list[str]) -> dict[str, float]:
    m = llm.load(workdir)
    argmax = evaluate._argmax_fn(m.model)
    hits = {p: [] for p in PLACES}
    for doc in docs:
        ids = m.tokenizer.encode(doc)
        offset = len(ids) - len(doc.encode())  # tokens the tokenizer adds in front (BOS), byte tokens after
        key = doc.split("The pass key is ", 1)[1][:5]
        starts = [i for i in range(len(doc)) if doc.startswith(key, i)]
        tokens_BT = np.asarray([ids], np.int32)
        pred_T = np.asarray(argmax(m.params, tokens_BT, np.ones_like(tokens_BT))[0])[0]
        for place, start in zip(PLACES, (starts[0], starts[1], starts[-1])):
            q = start + offset
            hits[place].append(all(pred_T[q + j - 1] == ids[q + j] for j in range(len(key))))
    return {p: float(np.mean(h)) for p, h in hits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdirs", nargs="+")
    ap.add_argument(
        "--data", default="runs/data/passkey.jsonl", help="passkey documents (byte tokenizer runs)"
    )
    ap.add_argument("--n", type=int, default=80)
    a = ap.parse_args()
    with open(a.data) as f:
        docs = [json.loads(line)["text"] for line in f][-a.n :]  # the held-out tail
    print("| run | " + " | ".join(PLACES) + " |\n|---|---|---|---|")
    for wd in a.workdirs:
        s = key_scores(wd, docs)
        print(f"| {wd} | " + " | ".join(f"{s[p]:.2f}" for p in PLACES) + " |", flush=True)


if __name__ == "__main__":
    main()
