"""Evaluation suite on a checkpoint: `python -m llm.evaluate --workdir=<run> [--step=N] [...]`.

- held-out loss, perplexity and bits per byte for each named eval set (`heldout` is the run's own
  held-out split; any other entry is a corpus spec, e.g. builtin:the-verdict.txt);
- multiple-choice log-likelihood scoring in the lm-eval-harness style, built deterministically
  from tiny Shakespeare's held-out tail: `shakespeare_next_line` (given three lines, pick the true
  next line among length-matched distractor lines from the same tail: needs sense across lines)
  and `shakespeare_word_order` (pick the true line among shuffles of its own words: fluency);
  accuracy by total log-likelihood (`acc`) and by log-likelihood per byte (`acc_norm`);
- calibration of those choices: expected calibration error of the model's own probabilities of
  the choices (renormalised over the choices) and a reliability diagram;
- with `--passkey_lengths=2000,8000`: passkey retrieval accuracy over lengths x depths
  (llm/data/passkey.py), a table and a heat map; `loss_by_position` (in Python) gives the held-out
  loss by token position for long windows.

Writes <out>/step_<N>.json and <out>/reliability_<task>_step_<N>.png (out defaults to <workdir>/eval).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm.data import pipeline, sources
from llm.data.tokenizers import Tokenizer
from llm.train.step import eval_step, eval_summary

HELDOUT = "heldout"
MC_CORPUS = "builtin:tinyshakespeare.txt"


# ---- held-out perplexity / bits per byte ------------------------------------------------------


def eval_set_documents(spec: str, cfg) -> list[str]:
    """`heldout` -> the run's held-out split (as training made it); else the documents of `spec`."""
    if spec == HELDOUT:
        return sources.source_for(cfg.data).documents()[1]
    return sources.read_documents(spec, cfg.data.text_field)


@functools.lru_cache(maxsize=8)
def _eval_fn(model):
    return jax.jit(
        lambda params, batch, token_bytes: eval_step(params, batch, model=model, token_bytes=token_bytes)
    )


def language_model_metrics(model, params, tokenizer: Tokenizer, docs: list[str], seq_len: int,
                           batch_size: int = 8, max_batches: int = 0) -> dict[str, float]:  # fmt: skip
    """Loss (nats/token), perplexity and bits per byte of `docs`, packed in windows of seq_len."""
    windows = pipeline.PackedWindows(*pipeline.tokenize(docs, tokenizer), seq_len, include_partial=True)
    token_bytes = np.zeros(model.cfg.vocab_size, np.int32)
    token_bytes[: len(tokenizer.token_bytes)] = tokenizer.token_bytes
    fn = _eval_fn(model)
    batches = pipeline.eval_batches(windows, batch_size, max_batches=max_batches)
    return eval_summary(fn(params, batch, token_bytes) for batch in batches)


# ---- multiple choice ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MCExample:
    """One question: score each choice as a continuation of `context`; `gold` is the right index."""

    context: str
    choices: tuple[str, ...]
    gold: int


def _is_verse(line: str, min_chars: int) -> bool:
    s = line.strip()
    # Speaker headings ("ROMEO:") are all capitals; they would be trivially easy distractors.
    return len(s) >= min_chars and not (s.endswith(":") and s[:-1].replace(" ", "").isupper())


def _heldout_lines(corpus: str, eval_fraction: float) -> list[str]:
    return "\n".join(sources.split_corpus(corpus, eval_fraction)[1]).split("\n")


def _spread(targets: list[int], n_examples: int, corpus: str) -> list[int]:
    """n_examples of the candidate line indices, spread evenly over the held-out tail."""
    if len(targets) < n_examples:
        raise ValueError(f"only {len(targets)} candidate lines in the held-out tail of {corpus}; "
                         f"ask for fewer examples")  # fmt: skip
    return [targets[j] for j in np.linspace(0, len(targets) - 1, n_examples).round().astype(int)]


def next_line_task(
    n_examples: int = 100,
    n_choices: int = 4,
    context_lines: int = 3,
    seed: int = 0,
    corpus: str = MC_CORPUS,
    eval_fraction: float = 0.1,
    min_chars: int = 16,
) -> list[MCExample]:
    """Deterministic 'choose the true next line' questions from the held-out tail of `corpus`.

    Targets are verse lines that follow another verse line (mid-speech), spread evenly over the
    tail; distractors are other verse lines of the tail whose length is within a factor 1.5 of the
    true line's (so line length alone does not give the answer), drawn with `seed`. Hard: it takes
    sense across lines, and small models score at chance (README "Evaluation suite").
    """
    lines = _heldout_lines(corpus, eval_fraction)
    verse = [i for i, line in enumerate(lines) if _is_verse(line, min_chars)]
    pool = sorted({lines[i].strip() for i in verse})
    targets = [i for i in verse if i >= context_lines and _is_verse(lines[i - 1], 1)]
    picks = _spread(targets, n_examples, corpus)
    rng = np.random.default_rng(seed)
    lengths = np.array([len(p) for p in pool])
    examples = []
    for i in picks:
        gold_text = lines[i].strip()
        ok = np.flatnonzero((lengths >= len(gold_text) / 1.5) & (lengths <= len(gold_text) * 1.5))
        ok = [j for j in ok if pool[j] != gold_text]
        distractors = [pool[j] for j in rng.choice(ok, size=n_choices - 1, replace=False)]
        examples.append(_question(lines, i, context_lines, gold_text, distractors, rng))
    return examples


def _question(lines: list[str], i: int, context_lines: int, gold_text: str, distractors: list[str],
              rng: np.random.Generator) -> MCExample:  # fmt: skip
    """The question for line i: the lines before it as context, the gold at a random position."""
    gold = int(rng.integers(len(distractors) + 1))
    choices = distractors[:gold] + [gold_text] + distractors[gold:]
    return MCExample(
        context="\n".join(lines[i - context_lines : i]) + "\n", choices=tuple(choices), gold=gold
    )


def word_order_task(
    n_examples: int = 100,
    n_choices: int = 4,
    context_lines: int = 3,
    seed: int = 0,
    corpus: str = MC_CORPUS,
    eval_fraction: float = 0.1,
    min_words: int = 6,
) -> list[MCExample]:
    """Deterministic 'which is the line as written' questions: the true next line against
    `n_choices - 1` shuffles of its own words (same words, same bytes, so no length or vocabulary
    cue; only word order, i.e. fluency). Targets as in `next_line_task`, with >= `min_words` words.
    A language model that has learned anything about English is far above chance here.
    """
    lines = _heldout_lines(corpus, eval_fraction)
    words = [line.split() for line in lines]
    targets = [i for i in range(context_lines, len(lines))
               if _is_verse(lines[i], 1) and _is_verse(lines[i - 1], 1) and len(words[i]) >= min_words]  # fmt: skip
    rng = np.random.default_rng(seed)
    examples = []
    for i in _spread(targets, n_examples, corpus):
        gold_text = " ".join(words[i])
        distractors: list[str] = []
        while len(distractors) < n_choices - 1:  # >= 6 words: 720 orders, distinct ones come fast
            shuffled = " ".join(rng.permutation(words[i]))
            if shuffled != gold_text and shuffled not in distractors:
                distractors.append(shuffled)
        examples.append(_question(lines, i, context_lines, gold_text, distractors, rng))
    return examples


# name -> builder(n_examples, n_choices, seed=...): the multiple-choice tasks `run_suite` can score.
MC_TASKS = {"shakespeare_next_line": next_line_task, "shakespeare_word_order": word_order_task}


@functools.lru_cache(maxsize=8)
def _continuation_fn(model):
    def fn(params, tokens_BT, targets_BT, segment_ids_BT, mask_BT):
        t = tokens_BT.shape[1]
        positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens_BT.shape)
        logits_BTV = model.apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT)
        logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
        logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
        return jnp.sum(logp_BT * mask_BT, axis=-1)

    return jax.jit(fn)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, max_len: int) -> tuple[list[int], int]:
    """Context ids + continuation ids (encoded separately, as lm-eval does), context cut from the left.

    Returns the ids (at most max_len + 1: inputs plus the shifted last target) and the context length.
    """
    ctx_ids, cont_ids = tokenizer.encode(context), tokenizer.encode(continuation)
    if not cont_ids:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    room = max_len + 1 - len(cont_ids)
    if room < 1:
        raise ValueError(f"continuation of {len(cont_ids)} tokens does not fit max_len={max_len}")
    ctx_ids = ctx_ids[-room:] if ctx_ids else []
    if not ctx_ids:  # no context: condition on a document boundary, as at the start of a text
        ctx_ids = [tokenizer.eos_id]
    return ctx_ids + cont_ids, len(ctx_ids)


def score_continuations(
    model, params, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], max_len: int, batch_size: int = 32
) -> np.ndarray:
    """log p(continuation | context) summed over its tokens, one per (context, continuation)."""
    encoded = [encode_pair(tokenizer, c, x, max_len) for c, x in pairs]
    n = len(encoded)
    n_pad = -(-n // batch_size) * batch_size
    tokens, targets = np.zeros((n_pad, max_len), np.int32), np.zeros((n_pad, max_len), np.int32)
    segs, mask = np.zeros((n_pad, max_len), np.int32), np.zeros((n_pad, max_len), np.float32)
    for r, (ids, n_ctx) in enumerate(encoded):
        m = len(ids) - 1
        tokens[r, :m], targets[r, :m], segs[r, :m] = ids[:-1], ids[1:], 1
        mask[r, n_ctx - 1 : m] = 1.0  # targets n_ctx..: the continuation's tokens
    fn = _continuation_fn(model)
    out = [np.asarray(fn(params, *(a[i : i + batch_size] for a in (tokens, targets, segs, mask))))
           for i in range(0, n_pad, batch_size)]  # fmt: skip
    return np.concatenate(out)[:n].astype(np.float64)


# ---- long context: passkey retrieval, loss by position -------------------------------------------


def _argmax_fn(model):
    def fn(params, tokens_BT, segment_ids_BT):
        t = tokens_BT.shape[1]
        positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens_BT.shape)
        logits_BTV = model.apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT)
        return jnp.argmax(logits_BTV, axis=-1), jax.nn.log_softmax(logits_BTV.astype(jnp.float32), -1)

    return jax.jit(fn)


def passkey_grid(model, params, tokenizer: Tokenizer, lengths: Sequence[int], depths: Sequence[float],
                 n: int = 20, seed: int = 0, digits: int = 5) -> dict[str, Any]:  # fmt: skip
    """Passkey retrieval accuracy over filler lengths (characters) x depths (llm/data/passkey.py).

    Teacher-forced: an example counts as retrieved (`exact`) when the model's argmax predicts every
    token of the key given the prompt and the key's earlier tokens; `first` scores only the key's
    first token. Returns {"exact": [[acc per depth] per length], "first": ..., "tokens": mean prompt
    tokens per length, ...}.
    """
    from llm.data import passkey  # noqa: PLC0415

    fn = _argmax_fn(model)
    exact, first, n_tokens = [], [], []
    for length in lengths:
        row_e, row_f, toks = [], [], []
        for depth in depths:
            exs = passkey.examples(n, length, depth, seed, digits)
            enc = [encode_pair(tokenizer, e.prompt, e.answer, 10**9) for e in exs]
            t = max(len(ids) for ids, _ in enc)
            tokens, segs = np.zeros((n, t), np.int32), np.zeros((n, t), np.int32)
            for r, (ids, _) in enumerate(enc):
                tokens[r, : len(ids)], segs[r, : len(ids)] = ids, 1
            pred_BT, _ = fn(params, tokens, segs)
            pred_BT = np.asarray(pred_BT)
            ok = [
                all(pred_BT[r, i - 1] == ids[i] for i in range(n_ctx, len(ids)))
                for r, (ids, n_ctx) in enumerate(enc)
            ]
            ok1 = [pred_BT[r, n_ctx - 1] == ids[n_ctx] for r, (ids, n_ctx) in enumerate(enc)]
            row_e.append(float(np.mean(ok)))
            row_f.append(float(np.mean(ok1)))
            toks.append(float(np.mean([n_ctx for _, n_ctx in enc])))
        exact.append(row_e)
        first.append(row_f)
        n_tokens.append(float(np.mean(toks)))
    return {"lengths": list(lengths), "depths": list(depths), "n": n, "exact": exact, "first": first,
            "prompt_tokens": n_tokens, "chance_exact": 10.0 ** -(digits - 1) / 9}  # fmt: skip


def passkey_heatmap(grid: dict[str, Any], path: str | None = None, title: str = ""):
    """Accuracy heat map: depth (x) by prompt length (y); returns the figure (saved if path)."""
    import matplotlib  # noqa: PLC0415

    if path:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    acc = np.asarray(grid["exact"])
    fig, ax = plt.subplots(figsize=(1.1 * len(grid["depths"]) + 2, 0.6 * len(grid["lengths"]) + 1.5))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(grid["depths"])), [f"{d:.2f}" for d in grid["depths"]])
    ax.set_yticks(range(len(grid["lengths"])), [f"{t:.0f}" for t in grid["prompt_tokens"]])
    ax.set_xlabel("depth of the key (0 = start)")
    ax.set_ylabel("prompt tokens")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", color="w" if acc[i, j] < 0.5 else "k",
                    fontsize=8)  # fmt: skip
    fig.colorbar(im, ax=ax, label="exact retrieval")
    ax.set_title(title or f"passkey retrieval ({grid['n']} per cell)", fontsize=9)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def loss_by_position(model, params, tokenizer: Tokenizer, docs: Sequence[str], seq_len: int,
                     bucket: int = 64) -> dict[str, Any]:  # fmt: skip
    """Mean next-token loss by position in the window (bucketed) over windows of `seq_len` tokens
    cut from the documents: whether later tokens profit from a long context."""
    ids = [i for d in docs for i in tokenizer.encode(d)]
    n_win = len(ids) // (seq_len + 1)
    if n_win < 1:
        raise ValueError(f"documents hold {len(ids)} tokens, fewer than one window of {seq_len + 1}")
    wins = np.asarray(ids[: n_win * (seq_len + 1)], np.int32).reshape(n_win, seq_len + 1)
    fn = _argmax_fn(model)
    total = np.zeros(seq_len)
    for w in wins:
        _, logp = fn(params, w[None, :-1], np.ones((1, seq_len), np.int32))
        total += -np.take_along_axis(np.asarray(logp[0]), w[1:, None], axis=-1)[:, 0]
    per_pos = total / n_win
    n_b = seq_len // bucket
    return {"bucket": bucket, "windows": int(n_win),
            "loss": [float(per_pos[i * bucket : (i + 1) * bucket].mean()) for i in range(n_b)]}  # fmt: skip


def choice_probabilities(loglik_C: np.ndarray) -> np.ndarray:
    """The model's distribution over the choices: p(choice | context) renormalised over them."""
    z = loglik_C - np.max(loglik_C)
    return np.exp(z) / np.sum(np.exp(z))


def multiple_choice(model, params, tokenizer: Tokenizer, examples: Sequence[MCExample], max_len: int,
                    batch_size: int = 32, n_bins: int = 10) -> dict[str, Any]:  # fmt: skip
    """lm-eval-style accuracy (raw and per-byte length-normalised) and calibration of the choices."""
    pairs = [(ex.context, ch) for ex in examples for ch in ex.choices]
    ll = score_continuations(model, params, tokenizer, pairs, max_len, batch_size)
    correct, correct_norm, conf, per_example = [], [], [], []
    k = 0
    for ex in examples:
        ll_C = ll[k : k + len(ex.choices)]
        k += len(ex.choices)
        n_bytes_C = np.array([len(c.encode("utf-8")) for c in ex.choices])
        probs_C = choice_probabilities(ll_C)
        pred, pred_norm = int(np.argmax(ll_C)), int(np.argmax(ll_C / n_bytes_C))
        correct.append(pred == ex.gold)
        correct_norm.append(pred_norm == ex.gold)
        conf.append(float(probs_C[pred]))
        per_example.append(
            {
                "gold": ex.gold,
                "pred": pred,
                "pred_norm": pred_norm,
                "loglik": [float(v) for v in ll_C],
                "confidence": float(probs_C[pred]),
            }
        )
    correct_a, conf_a = np.array(correct, float), np.array(conf)
    ece, bins = expected_calibration_error(conf_a, correct_a, n_bins)
    n_choices = len(examples[0].choices) if examples else 0
    return {
        "n": len(examples),
        "n_choices": n_choices,
        "chance": 1.0 / n_choices if n_choices else math.nan,
        "acc": float(np.mean(correct_a)),
        "acc_norm": float(np.mean(correct_norm)),
        "mean_confidence": float(np.mean(conf_a)),
        "ece": ece,
        "bins": bins,
        "examples": per_example,
    }


# ---- calibration -------------------------------------------------------------------------------


def expected_calibration_error(confidence_N: np.ndarray, correct_N: np.ndarray,
                               n_bins: int = 10) -> tuple[float, list[dict]]:  # fmt: skip
    """ECE = sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)| over equal-width bins of (0, 1].

    Bin b holds confidences in (b/n_bins, (b+1)/n_bins] (Guo et al. 2017); a confidence of exactly
    0 joins the first bin. Returns the ECE and per-bin {lo, hi, count, accuracy, confidence}.
    """
    conf = np.asarray(confidence_N, np.float64)
    corr = np.asarray(correct_N, np.float64)
    if conf.shape != corr.shape or conf.ndim != 1:
        raise ValueError(
            f"confidence and correct must be 1-d of one length, got {conf.shape} and {corr.shape}"
        )
    if conf.size and (conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidences must lie in [0, 1]")
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        sel = idx == b
        count = int(sel.sum())
        acc = float(corr[sel].mean()) if count else math.nan
        mean_conf = float(conf[sel].mean()) if count else math.nan
        if count:
            ece += count / conf.size * abs(acc - mean_conf)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": count, "accuracy": acc,
                     "confidence": mean_conf})  # fmt: skip
    return float(ece), bins


def reliability_diagram(bins: list[dict], path: str | None = None, title: str = "", ece: float | None = None):
    """Accuracy against confidence per bin, with the diagonal of perfect calibration and bin counts."""
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(4.6, 5.2), layout="constrained")
    ax, ax_n = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    width = bins[0]["hi"] - bins[0]["lo"] if bins else 0.1
    lo = [b["lo"] for b in bins]
    acc = [0.0 if math.isnan(b["accuracy"]) else b["accuracy"] for b in bins]
    conf = [b["confidence"] for b in bins]
    ax.bar(lo, acc, width=width, align="edge", edgecolor="k", alpha=0.75, label="accuracy")
    # The red mark is the bin's mean confidence: where a calibrated bar would end.
    ax.scatter(
        [x + width / 2 for x, c in zip(lo, conf) if not math.isnan(c)],
        [c for c in conf if not math.isnan(c)],
        color="C3",
        marker="_",
        zorder=3,
        s=200,
        linewidths=2,
        label="mean confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title + (f"  (ECE {ece:.3f})" if ece is not None else ""), fontsize=9)
    ax_n.bar(lo, [b["count"] for b in bins], width=width, align="edge", edgecolor="k", color="C7")
    ax_n.set_xlabel("confidence")
    ax_n.set_ylabel("count")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


# ---- the suite ---------------------------------------------------------------------------------


def run_suite(
    workdir: str,
    step: int | None = None,
    eval_sets: Sequence[str] = (HELDOUT, "builtin:the-verdict.txt"),
    max_batches: int = 0,
    batch_size: int = 0,
    mc_examples: int = 100,
    mc_choices: int = 4,
    mc_seed: int = 0,
    mc_tasks: Sequence[str] = tuple(MC_TASKS),
    n_bins: int = 10,
    out: str | None = None,
    loaded=None,
    passkey_lengths: Sequence[int] = (),
    passkey_depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    passkey_examples: int = 20,
    answer_tokens: int = 128,
) -> dict[str, Any]:
    """Evaluate a checkpoint on everything above; writes JSON (and the reliability PNG) under `out`."""
    import llm  # noqa: PLC0415

    run = loaded if loaded is not None else llm.load(workdir, step)
    cfg, model, params, tok = run.config, run.model, run.params, run.tokenizer
    bs = batch_size or cfg.train.eval_batch_size or cfg.train.batch_size
    seq_len = cfg.data.seq_len
    result: dict[str, Any] = {"workdir": workdir, "step": run.step, "eval_sets": {}}
    out = out or os.path.join(workdir, "eval")
    # Runs whose task is not plain language modelling are scored on their own held-out splits.
    if cfg.train.task == "dpo":  # held-out preference accuracy and reward margin vs the reference
        os.makedirs(out, exist_ok=True)
        result["preferences"] = preference_metrics(run, bs)
        return _write_json(result, out, run.step)
    if cfg.data.kind == "instructions":  # held-out loss on responses + generated answers
        os.makedirs(out, exist_ok=True)
        result["instructions"] = instruction_splits(run, bs, out, max_new_tokens=answer_tokens)
        return _write_json(result, out, run.step)
    if cfg.model.head == "classifier":  # a classifier has no LM logits: its task's splits instead
        os.makedirs(out, exist_ok=True)
        result["classification"] = classification_splits(run, bs, out)
        return _write_json(result, out, run.step)
    for spec in eval_sets:
        docs = eval_set_documents(spec, cfg)
        name = spec if spec == HELDOUT else os.path.basename(spec.removeprefix("builtin:"))
        result["eval_sets"][name] = {"spec": spec, **language_model_metrics(model, params, tok, docs, seq_len,
                                                                            bs, max_batches)}  # fmt: skip
    unknown = sorted(set(mc_tasks) - set(MC_TASKS))
    if unknown:
        raise ValueError(f"unknown multiple-choice task(s) {unknown}; choose from {sorted(MC_TASKS)}")
    if mc_examples:
        result["multiple_choice"] = {
            name: multiple_choice(model, params, tok, MC_TASKS[name](mc_examples, mc_choices, seed=mc_seed),
                                  seq_len, n_bins=n_bins)
            for name in mc_tasks
        }  # fmt: skip
    os.makedirs(out, exist_ok=True)
    if passkey_lengths:
        grid = passkey_grid(model, params, tok, passkey_lengths, passkey_depths, passkey_examples)
        grid["heatmap_png"] = os.path.join(out, f"passkey_step_{run.step}.png")
        passkey_heatmap(grid, grid["heatmap_png"], f"passkey retrieval, step {run.step}")
        result["passkey"] = grid
    for name, mc in result.get("multiple_choice", {}).items():
        png = os.path.join(out, f"reliability_{name}_step_{run.step}.png")
        reliability_diagram(mc["bins"], png, f"{name}, step {run.step}", mc["ece"])
        mc["reliability_png"] = png
    return _write_json(result, out, run.step)


def _write_json(result: dict[str, Any], out: str, step: int) -> dict[str, Any]:
    """Write the suite's result to <out>/step_<N>.json (NaN as null); the path joins the result."""
    path = os.path.join(out, f"step_{step}.json")
    with open(path, "w") as f:
        json.dump(
            result, f, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v
        )
    result["json"] = path
    return result


def instruction_splits(run, batch_size: int, out: str, max_new_tokens: int = 128) -> dict[str, Any]:
    """An instruction-tuned run: loss on the responses of the validation and test splits
    (prompt tokens unscored), and greedy answers to the test instructions written to
    `<out>/answers_step_<N>.jsonl` next to the gold outputs."""
    from llm.data import pipeline  # noqa: PLC0415
    from llm.data.instructions import InstructionSource  # noqa: PLC0415
    from llm.infer.engine import Sampling  # noqa: PLC0415
    from llm.infer.generation import generate_ids  # noqa: PLC0415
    from llm.train.step import eval_step, eval_summary  # noqa: PLC0415

    src = InstructionSource(run.config.data)
    token_bytes = jax.numpy.pad(jax.numpy.asarray(run.tokenizer.token_bytes),
                                (0, run.config.model.vocab_size - len(run.tokenizer.token_bytes)))  # fmt: skip
    fn = jax.jit(lambda p, b: eval_step(p, b, model=run.model, token_bytes=token_bytes))
    res: dict[str, Any] = {}
    for split in ("validation", "test"):
        s = eval_summary(
            fn(run.params, b) for b in pipeline.eval_batches(src.examples(run.tokenizer, split), batch_size)
        )
        res[split] = {"loss": s["loss"], "perplexity": s["perplexity"], "response_tokens": s["tokens"]}
    recs = src.splits()["test"]
    room = run.config.model.max_seq_len - max_new_tokens
    prompts = [src.prompt_ids(run.tokenizer, r)[-room:] for r in recs]  # with the run's k pauses
    path = os.path.join(out, f"answers_step_{run.step}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(0, len(prompts), batch_size):
            outs = generate_ids(run.model, run.params, prompts[i : i + batch_size], max_new_tokens,
                                sampling=Sampling(temperature=0.0), stop_ids=[run.tokenizer.eos_id],
                                pad_id=run.tokenizer.pad_id)  # fmt: skip
            for r, ids in zip(recs[i : i + batch_size], outs, strict=True):
                f.write(json.dumps({"instruction": r["instruction"], "input": r.get("input", ""),
                                    "output": r["output"], "generated": run.tokenizer.decode(ids)}) + "\n")  # fmt: skip
    res["answers_jsonl"] = path
    res["n_answers"] = len(prompts)
    return res


def preference_metrics(run, batch_size: int) -> dict[str, Any]:
    """A DPO run on its held-out pairs: DPO loss, preference accuracy, reward margin, with the
    reference log-probabilities from the run's `train.init_from` (as in training)."""
    import llm  # noqa: PLC0415
    from llm.checkpoint import parse_init_from  # noqa: PLC0415
    from llm.data import pipeline  # noqa: PLC0415
    from llm.data.preferences import PreferenceSource  # noqa: PLC0415
    from llm.train import tasks  # noqa: PLC0415

    task = tasks.get("dpo", run.config)
    src_dir, src_step = parse_init_from(run.config.train.init_from)
    ref = llm.load(src_dir, src_step)
    ex = PreferenceSource(run.config.data).examples(run.tokenizer, "validation")
    task.prepare(ex, ref.params, ref.model, batch_size)
    fn = jax.jit(lambda p, b: task.eval_sums(p, b, model=run.model, token_bytes=None))
    return task.summary(fn(run.params, b) for b in pipeline.eval_batches(ex, batch_size))


def classification_splits(run, batch_size: int, out: str) -> dict[str, Any]:
    """A classifier's metrics on its validation and test splits (llm/data/classification.py):
    accuracy, per-class precision / recall / F1, macro F1, confusion matrix (+ a PNG of it)."""
    from llm.data import pipeline  # noqa: PLC0415
    from llm.data.classification import ClassificationSource  # noqa: PLC0415
    from llm.train.tasks import Classify  # noqa: PLC0415

    src = ClassificationSource(run.config.data)
    task = Classify()
    fn = jax.jit(lambda p, b: task.eval_sums(p, b, model=run.model, token_bytes=None))
    names = list(run.config.data.classification.labels) or None
    res = {}
    for split in ("validation", "test"):
        ex = src.examples(run.tokenizer, split)
        m = task.summary(fn(run.params, b) for b in pipeline.eval_batches(ex, batch_size))
        m["labels"] = names or src.label_names
        m["confusion_png"] = os.path.join(out, f"confusion_{split}_step_{run.step}.png")
        confusion_plot(m["confusion"], m["labels"], m["confusion_png"], f"{split}, step {run.step}")
        res[split] = m
    return res


def confusion_plot(confusion, labels, path: str, title: str = ""):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    conf = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(3.2, 3))
    ax.imshow(conf, cmap="Blues")
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            ax.text(j, i, str(conf[i, j]), ha="center", va="center",
                    color="white" if conf[i, j] > conf.max() / 2 else "black")  # fmt: skip
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_result(result: dict[str, Any]) -> str:
    """The suite's numbers as the CLI prints them."""
    if "preferences" in result:
        m = result["preferences"]
        return "\n".join([f"step {result['step']} of {result['workdir']}", "",
                          f"held-out pairs: {m['pairs']} | DPO loss {m['loss']:.4f} | preference accuracy "
                          f"{m['preference_accuracy']:.3f} | reward margin {m['reward_margin']:.4f} (chosen "
                          f"{m['reward_chosen']:.4f}, rejected {m['reward_rejected']:.4f})", "", f"wrote {result['json']}"])  # fmt: skip
    if "instructions" in result:
        r = result["instructions"]
        lines = [f"step {result['step']} of {result['workdir']}", ""]
        lines += [f"{split}: response loss {r[split]['loss']:.4f} | perplexity {r[split]['perplexity']:.2f} | "
                  f"{r[split]['response_tokens']} response tokens" for split in ("validation", "test")]  # fmt: skip
        lines += [
            f"answers to {r['n_answers']} test instructions: {r['answers_jsonl']}",
            "",
            f"wrote {result['json']}",
        ]
        return "\n".join(lines)
    if "classification" in result:
        lines = [f"step {result['step']} of {result['workdir']}", ""]
        for split, m in result["classification"].items():
            per = " | ".join(f"{lab}: P {p:.3f} R {r:.3f} F1 {f:.3f}" for lab, p, r, f in
                             zip(m["labels"], m["precision"], m["recall"], m["f1"], strict=True))  # fmt: skip
            lines += [f"{split}: accuracy {m['accuracy']:.4f} | macro F1 {m['macro_f1']:.4f} | loss {m['loss']:.4f} "
                      f"| {m['examples']} examples", f"  {per}", f"  confusion (rows true, columns predicted): "
                      f"{m['confusion']}  {m['confusion_png']}"]  # fmt: skip
        return "\n".join(lines + ["", f"wrote {result['json']}"])
    lines = [f"step {result['step']} of {result['workdir']}", "",
             f"{'eval set':<22}{'loss':>8}{'ppl':>10}{'bpb':>8}{'tokens':>9}"]  # fmt: skip
    for name, m in result["eval_sets"].items():
        lines.append(
            f"{name:<22}{m['loss']:>8.4f}{m['perplexity']:>10.2f}{m['bits_per_byte']:>8.4f}{m['tokens']:>9d}"
        )
    for name, mc in result.get("multiple_choice", {}).items():
        lines += ["", f"{name}: {mc['n']} questions x {mc['n_choices']} choices (chance {mc['chance']:.3f})",
                  f"  acc {mc['acc']:.3f} | acc_norm {mc['acc_norm']:.3f} | mean confidence "
                  f"{mc['mean_confidence']:.3f} | ECE {mc['ece']:.3f}",
                  f"  reliability diagram: {mc.get('reliability_png', '-')}"]  # fmt: skip
    if "passkey" in result:
        g = result["passkey"]
        lines += ["", f"passkey retrieval (exact, {g['n']} per cell; rows: prompt tokens, columns: depth)",
                  "  tokens " + "".join(f"{d:>7.2f}" for d in g["depths"])]  # fmt: skip
        lines += [
            f"  {t:>6.0f} " + "".join(f"{a:>7.2f}" for a in row)
            for t, row in zip(g["prompt_tokens"], g["exact"])
        ]
        lines.append(f"  heat map: {g['heatmap_png']}")
    lines += ["", f"wrote {result['json']}"]
    return "\n".join(lines)


def main(argv):
    del argv
    from absl import flags  # noqa: PLC0415

    from llm import runtime  # noqa: PLC0415

    runtime.setup()
    f = flags.FLAGS
    try:
        result = run_suite(f.workdir, f.step, f.eval_sets, f.max_batches, f.batch_size, f.mc_examples,
                           f.mc_choices, f.mc_seed, f.mc_tasks, f.bins, f.out,
                           passkey_lengths=[int(x) for x in f.passkey_lengths],
                           passkey_depths=[float(x) for x in f.passkey_depths],
                           passkey_examples=f.passkey_examples, answer_tokens=f.answer_tokens)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_result(result))


def _define_flags():
    from absl import flags  # noqa: PLC0415

    flags.DEFINE_string("workdir", None, "Run directory with checkpoints.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_list(
        "eval_sets",
        [HELDOUT, "builtin:the-verdict.txt"],
        "Eval sets: 'heldout' (the run's split) or corpus specs (paths, globs, builtin:<name>).",
    )
    flags.DEFINE_integer("max_batches", 0, "Batches per eval set (0 = all).")
    flags.DEFINE_integer("batch_size", 0, "Eval batch size (0 = the run's).")
    flags.DEFINE_integer("mc_examples", 100, "Multiple-choice questions (0 = skip the task).")
    flags.DEFINE_integer("mc_choices", 4, "Choices per question.")
    flags.DEFINE_integer("mc_seed", 0, "Seed for the distractors and answer positions.")
    flags.DEFINE_list("mc_tasks", list(MC_TASKS), f"Multiple-choice tasks, from {', '.join(MC_TASKS)}.")
    flags.DEFINE_integer("bins", 10, "Calibration bins.")
    flags.DEFINE_string("out", None, "Output directory (default: <workdir>/eval).")
    flags.DEFINE_list(
        "passkey_lengths", [], "Passkey retrieval grid: filler lengths in characters (empty = skip)."
    )
    flags.DEFINE_list("passkey_depths", ["0", "0.25", "0.5", "0.75", "1"], "Passkey depths (0 = start).")
    flags.DEFINE_integer("passkey_examples", 20, "Passkey examples per grid cell.")
    flags.DEFINE_integer("answer_tokens", 128, "Instruction runs: new tokens per generated answer.")
    flags.mark_flags_as_required(["workdir"])


def run():
    from llm import cli  # noqa: PLC0415

    _define_flags()
    cli.run(main)  # --help exits 0; flag errors are one line, exit 2


if __name__ == "__main__":
    run()
