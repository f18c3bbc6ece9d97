"""Independent PyTorch GPTs identical in shape and training step to the project's models.

Two layouts: `gpt2` (nanoGPT style: learned positions, pre-LayerNorm, tanh-GELU MLP, biases) and
`llama` (the default recipe's: RoPE on q/k (rotate-half pairs, theta 10,000), RMSNorm, SwiGLU,
no biases). Both: tied embeddings, F.scaled_dot_product_attention (causal), AdamW(b1=0.9,
b2=0.95, eps=1e-8, weight decay 0.1 on matrices only), global-norm clipping at 1.0, warmup +
cosine learning rate. bf16 = torch.autocast. `compile=True` wraps the model in `torch.compile`
(inductor; forward and backward compiled, the optimizer step eager), what a PyTorch user runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = nn.LayerNorm(d, eps=1e-5)
        self.c_attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=1e-5)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x_BTD):
        b, t, d = x_BTD.shape
        q, k, v = self.c_attn(self.ln_1(x_BTD)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_BTD = x_BTD + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x_BTD + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x_BTD)), approximate="tanh"))


def rope(x_BNTH, theta: float = 10_000.0):
    """Rotate channel pairs (i, i + H/2) by angle t * theta^(-2i/H) (Llama/NeoX layout)."""
    t, h = x_BNTH.shape[-2], x_BNTH.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, h, 2, dtype=torch.float32) / h)
    ang_TH = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)
    cos, sin = ang_TH.cos().to(x_BNTH.dtype), ang_TH.sin().to(x_BNTH.dtype)
    x1, x2 = x_BNTH[..., : h // 2], x_BNTH[..., h // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class LlamaBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, d_ff: int):
        super().__init__()
        self.n_heads, self.d_ff = n_heads, d_ff
        self.ln_1 = nn.RMSNorm(d, eps=1e-5)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.attn_proj = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.RMSNorm(d, eps=1e-5)
        self.gate_up = nn.Linear(d, 2 * d_ff, bias=False)
        self.mlp_proj = nn.Linear(d_ff, d, bias=False)

    def forward(self, x_BTD):
        b, t, d = x_BTD.shape
        q, k, v = self.c_attn(self.ln_1(x_BTD)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x_BTD = x_BTD + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        gate, up = self.gate_up(self.ln_2(x_BTD)).split(self.d_ff, dim=2)
        return x_BTD + self.mlp_proj(F.silu(gate) * up)


class GPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d: int, n_layers: int, n_heads: int, std: float = 0.02,
                 layout: str = "gpt2", d_ff: int | None = None):  # fmt: skip
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq_len, d) if layout == "gpt2" else None
        if layout == "gpt2":
            self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
            self.ln_f = nn.LayerNorm(d, eps=1e-5)
        else:
            self.blocks = nn.ModuleList(LlamaBlock(d, n_heads, d_ff) for _ in range(n_layers))
            self.ln_f = nn.RMSNorm(d, eps=1e-5)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2: residual output projections get std / sqrt(2 L), like the project's model.
                s = std / math.sqrt(2 * n_layers) if name.endswith("proj.weight") else std
                nn.init.normal_(p, 0.0, s / 2 if name == "wpe.weight" else s)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens_BT):
        t = tokens_BT.shape[1]
        x = self.wte(tokens_BT)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(t, device=tokens_BT.device))
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied output head


def make_optimizer(model: GPT, lr: float, weight_decay: float = 0.1):
    """AdamW with decay on matrices only (embeddings, norms and biases undecayed), as the project."""
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith(("wte", "wpe"))]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup from 0, then cosine to peak * min_ratio (optax.warmup_cosine_decay_schedule)."""
    if step < warmup:
        return peak * step / max(warmup, 1)
    frac = min(1.0, (step - warmup) / max(total - warmup, 1))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


class Trainer:
    """model + optimizer + one training step; `bf16` runs the forward under CPU autocast."""

    def __init__(self, vocab, seq_len, d, n_layers, n_heads, bf16: bool, lr=1e-3, warmup=100, total=1000,
                 layout: str = "gpt2", d_ff: int | None = None, compile: bool = False):  # fmt: skip
        torch.manual_seed(0)
        self.model = GPT(vocab, seq_len, d, n_layers, n_heads, layout=layout, d_ff=d_ff)
        self.opt = make_optimizer(self.model, lr)
        self.forward = torch.compile(self.model) if compile else self.model
        self.bf16, self.vocab = bf16, vocab
        self.lr, self.warmup, self.total, self.step_count = lr, warmup, total, 0

    def step(self, tokens_BT, targets_BT) -> torch.Tensor:
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step_count, self.lr, self.warmup, self.total)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits_BTV = self.forward(tokens_BT)
        loss = F.cross_entropy(logits_BTV.float().view(-1, self.vocab), targets_BT.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step_count += 1
        return loss.detach()
