"""Synthetic passkey retrieval (Mohtashami & Jaggi 2023): a number hidden in filler text, asked for
at the end. Used both as training data (a .jsonl corpus) and as an evaluation over a grid of
context lengths x depths (llm/evaluate.py `passkey_grid`).

    python -m llm.data.passkey --out=data/passkey.jsonl --n=2000 --min_chars=2000 --max_chars=8000

An example is: filler sentences, the key sentence at `depth` (0 = start, 1 = just before the
question), more filler, then the question. The answer is the `digits`-digit key after the prompt
"The pass key is". Lengths are in characters of filler (the tokenizer decides tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeyExample:
    prompt: str  # everything up to and including "The pass key is"
    answer: str  # " 12345"
    depth: float
    filler_chars: int


def make_example(rng: random.Random, filler_chars: int, depth: float, digits: int = 5) -> PasskeyExample:
    key = str(rng.randrange(10 ** (digits - 1), 10**digits))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    reps = max(1, -(-filler_chars // len(FILLER)))
    sentences = [FILLER] * reps
    at = round(depth * reps)
    text = "".join(sentences[:at]) + needle + "".join(sentences[at:])
    return PasskeyExample(
        prompt=text + QUESTION, answer=f" {key}", depth=depth, filler_chars=reps * len(FILLER)
    )


def examples(n: int, filler_chars: int, depth: float, seed: int = 0, digits: int = 5) -> list[PasskeyExample]:
    rng = random.Random(f"{seed}-{filler_chars}-{depth}")
    return [make_example(rng, filler_chars, depth, digits) for _ in range(n)]


def training_documents(n: int, min_chars: int, max_chars: int, seed: int = 0, digits: int = 5) -> list[str]:
    """Full examples (prompt + answer + ".") at uniform random depths and lengths."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        ex = make_example(rng, rng.randint(min_chars, max_chars), rng.random(), digits)
        docs.append(ex.prompt + ex.answer + ".")
    return docs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the .jsonl corpus to write (field 'text')")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--min_chars", type=int, default=500)
    ap.add_argument("--max_chars", type=int, default=4000)
    ap.add_argument("--digits", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.min_chars > a.max_chars or a.n < 1:
        ap.error("need n >= 1 and min_chars <= max_chars")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        for doc in training_documents(a.n, a.min_chars, a.max_chars, a.seed, a.digits):
            f.write(json.dumps({"text": doc}) + "\n")
    print(f"wrote {a.n} passkey documents to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
