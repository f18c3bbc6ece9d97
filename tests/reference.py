"""An independent numpy reference of the transformer forward pass, written from the papers.

It reads the Flax params dict but shares no code with llm/model: explicit loops over heads,
explicit masks, textbook formulas. Tests compare the Flax model against it.
"""

from __future__ import annotations

import math

import numpy as np


def layernorm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * scale
    return y + bias if bias is not None else y


def rmsnorm(x, scale, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x / (1 + np.exp(-x))


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def sinusoid(pos, d):
    out = np.zeros(d)
    for i in range(d // 2):
        w = 1.0 / (10000.0 ** (i / (d // 2)))
        out[2 * i] = math.sin(pos * w)
        out[2 * i + 1] = math.cos(pos * w)
    return out


def rope_vec(v, pos, theta):
    """Rotate pairs (j, j + h/2) by pos * theta^(-2j/h)."""
    h = len(v)
    out = np.empty_like(v)
    for j in range(h // 2):
        ang = pos * theta ** (-2.0 * j / h)
        a, b = v[j], v[j + h // 2]
        out[j] = a * math.cos(ang) - b * math.sin(ang)
        out[j + h // 2] = b * math.cos(ang) + a * math.sin(ang)
    return out


def alibi_slopes_paper(n):
    """Press et al. 2022: for n a power of two, slopes 2^(-8/n), 2^(-16/n), ..."""
    return [2 ** (-8.0 * (i + 1) / n) for i in range(n)]


def forward(cfg, params, tokens, positions=None, segments=None):
    """Logits [B, T, V] in float64 for a ModelConfig and the Flax params dict."""
    p = _to_np(params)
    b, t = tokens.shape
    positions = np.tile(np.arange(t), (b, 1)) if positions is None else np.asarray(positions)
    segments = np.ones((b, t), int) if segments is None else np.asarray(segments)
    d, n, kv = cfg.d_model, cfg.attention.n_heads, cfg.attention.kv_heads
    h = cfg.head_dim
    g = n // kv

    def norm(x, q):
        if cfg.norm == "rmsnorm":
            return rmsnorm(x, q["scale"], cfg.norm_eps)
        return layernorm(x, q["scale"], q.get("bias"), cfg.norm_eps)

    def lin(x, q):
        y = x @ q["kernel"]
        return y + q["bias"] if "bias" in q else y

    x = p["embed"]["embedding"][tokens]
    if cfg.positional == "learned":
        x = x + p["pos_embed"]["embedding"][positions]
    if cfg.positional == "sinusoidal":
        x = x + np.array([[sinusoid(positions[i, j], d) for j in range(t)] for i in range(b)])
    slopes = alibi_slopes_paper(n) if cfg.positional == "alibi" else None

    def attention(x, q):
        out = np.zeros((b, t, n, h))
        for bi in range(b):
            for head in range(n):
                kvh = head // g  # query head -> its shared kv head (GQA)
                wq = q["query"]["kernel"][:, head]
                wk = q["key"]["kernel"][:, kvh]
                wv = q["value"]["kernel"][:, kvh]
                qs = x[bi] @ wq + (q["query"]["bias"][head] if "bias" in q["query"] else 0)
                ks = x[bi] @ wk + (q["key"]["bias"][kvh] if "bias" in q["key"] else 0)
                vs = x[bi] @ wv + (q["value"]["bias"][kvh] if "bias" in q["value"] else 0)
                if cfg.positional == "rope":
                    qs = np.stack([rope_vec(qs[i], positions[bi, i], cfg.rope_theta) for i in range(t)])
                    ks = np.stack([rope_vec(ks[i], positions[bi, i], cfg.rope_theta) for i in range(t)])
                for i in range(t):
                    scores = np.full(t, -np.inf)
                    for j in range(i + 1):
                        if segments[bi, j] != segments[bi, i]:
                            continue
                        scores[j] = qs[i] @ ks[j] / math.sqrt(h)
                        if slopes is not None:
                            scores[j] += slopes[head] * (positions[bi, j] - positions[bi, i])
                    out[bi, i, head] = softmax(scores) @ vs
        y = np.einsum("btnh,nhd->btd", out, q["out"]["kernel"])
        return y + q["out"]["bias"] if "bias" in q["out"] else y

    def mlp(x, q):
        if cfg.mlp == "swiglu":
            return lin(silu(lin(x, q["gate"])) * lin(x, q["up"]), q["down"])
        return lin(gelu_tanh(lin(x, q["fc_in"])), q["fc_out"])

    for li in range(cfg.n_layers):
        q = p[f"layer_{li}"]
        if cfg.norm_position == "pre":
            x = x + attention(norm(x, q["norm_attn"]), q["attn"])
            x = x + mlp(norm(x, q["norm_mlp"]), q["mlp"])
        else:
            x = norm(x + attention(x, q["attn"]), q["norm_attn"])
            x = norm(x + mlp(x, q["mlp"]), q["norm_mlp"])
    if cfg.norm_position == "pre":
        x = norm(x, p["norm_final"])
    if cfg.tie_embeddings:
        return x @ p["embed"]["embedding"].T
    return x @ p["lm_head"]["kernel"]


def _to_np(tree):
    if isinstance(tree, dict):
        return {k: _to_np(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)
