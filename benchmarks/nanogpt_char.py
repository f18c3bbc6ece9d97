"""The reference the default recipe is measured against: karpathy/nanoGPT's character-level
Shakespeare recipe, written here independently in plain PyTorch (no project code), evaluated on
the same held-out text.

  .venv/bin/python benchmarks/nanogpt_char.py [--iters=7300] [--eval_every=250]   # idle machine

Model: 4 layers, width 128, 4 heads, block 128, character vocabulary, GELU MLP, pre-LayerNorm,
learned positions, tied embeddings, dropout 0. Training: batch 16, AdamW (0.9, 0.99), weight
decay 0.1 on matrices, clip 1.0, lr 1e-3 with 100 warmup steps then cosine to 1e-4 at 7,300
iterations, 2 threads. Held-out split: the last 10% of tiny Shakespeare cut at a line boundary,
exactly the project's (llm.data.sources.split_documents); it is scored whole, in windows of 128,
and bits per byte = nats per character / ln 2 (the text is ASCII: one byte per character).
Training wall time excludes evaluation. Writes benchmarks/results/nanogpt_char.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "llm", "data", "corpora", "tinyshakespeare.txt")


def split(text: str, eval_fraction: float = 0.1) -> tuple[str, str]:
    """Last 10% held out, cut after a newline (as llm.data.sources.split_documents does)."""
    cut = int(len(text) * (1 - eval_fraction))
    nl = text.rfind("\n", 0, cut)
    cut = nl + 1 if nl > 0 else cut
    return text[:cut], text[cut:]


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.h = h

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, block: int = 128, d: int = 128, layers: int = 4, heads: int = 4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as nanoGPT
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "out.weight")):  # nanoGPT's scaled residual init
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def lr_at(it: int, a) -> float:
    if it < a.warmup:
        return a.lr * (it + 1) / (a.warmup + 1)
    ratio = min(1.0, (it - a.warmup) / max(1, a.iters - a.warmup))
    return a.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (a.lr - a.min_lr)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, block: int, batch: int = 64) -> float:
    """Mean nats per character over the whole held-out text, in consecutive windows."""
    model.eval()
    n = (len(ids) - 1) // block
    total, count = 0.0, 0
    for s in range(0, n, batch):
        rows = range(s, min(s + batch, n))
        x = torch.stack([ids[i * block : i * block + block] for i in rows])
        y = torch.stack([ids[i * block + 1 : i * block + block + 1] for i in rows])
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=7300)
    ap.add_argument("--eval_every", type=int, default=250)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min_lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "nanogpt_char.json"))
    a = ap.parse_args()
    torch.manual_seed(1337)
    torch.set_num_threads(a.threads)
    train_text, eval_text = split(open(CORPUS).read())
    chars = sorted(set(train_text + eval_text))
    stoi = {c: i for i, c in enumerate(chars)}
    enc = lambda s: torch.tensor([stoi[c] for c in s], dtype=torch.long)  # noqa: E731
    train_ids, eval_ids = enc(train_text), enc(eval_text)
    block, batch = 128, 16
    model = CharGPT(len(chars), block)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=a.lr, betas=(0.9, 0.99))  # fmt: skip
    rng = np.random.default_rng(1337)
    curve, train_s = [], 0.0
    for it in range(a.iters + 1):
        if it % a.eval_every == 0 or it == a.iters:
            nats = evaluate(model, eval_ids, block)
            curve.append(
                {"iter": it, "train_s": train_s, "eval_nats_per_char": nats, "eval_bpb": nats / math.log(2)}
            )
            print(json.dumps(curve[-1]), flush=True)
        if it == a.iters:
            break
        t0 = time.perf_counter()
        starts = rng.integers(0, len(train_ids) - block - 1, batch)
        x = torch.stack([train_ids[s : s + block] for s in starts])
        y = torch.stack([train_ids[s + 1 : s + block + 1] for s in starts])
        for g in optim.param_groups:
            g["lr"] = lr_at(it, a)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        train_s += time.perf_counter() - t0
    sys.path.insert(0, ROOT)
    from benchmarks import common  # noqa: PLC0415

    result = {"host": common.host(), "torch": torch.__version__, "threads": a.threads, "args": vars(a),
              "params": sum(p.numel() for p in model.parameters()), "curve": curve}  # fmt: skip
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
