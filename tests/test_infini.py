"""Infini-attention against a naive reference written here (a loop over segments with explicit M and
z per document, float64), its reduction to causal attention, streaming decode, and its gate plumbing.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.model import Transformer
from llm.model.config import AttentionConfig, InfiniConfig, ModelConfig
from llm.model.context import training_context
from llm.model.registries import ATTENTION, _load_all
from tests.reference import rope_vec, softmax

_load_all()
B, T, SEG = 2, 21, 5  # T not a multiple of the segment
HEADS, D = 3, 24  # an odd head count, head_dim 8


def cfg_of(**inf):
    return ModelConfig(vocab_size=64, d_model=D, n_layers=2, max_seq_len=256, positional="rope", norm="rmsnorm",
                       mlp="swiglu", use_bias=False, tie_embeddings=False,
                       attention=AttentionConfig(n_heads=HEADS, kind="infini",
                                                 infini=InfiniConfig(**{"segment_len": SEG, "gate_init": 0.3, **inf})))  # fmt: skip


def _inputs(packed: bool):
    r = np.random.default_rng(0)
    x = r.normal(size=(B, T, D)).astype(np.float32)
    pos = np.tile(np.arange(T), (B, 1))
    seg = np.ones((B, T), np.int32)
    if packed:  # row 1: documents of 7, 9 and 5 tokens (boundaries inside segments)
        seg[1] = [1] * 7 + [2] * 9 + [3] * 5
        pos[1] = list(range(7)) + list(range(9)) + list(range(5))
    return x, pos, seg


def run_layer(cfg, x, pos, seg, params=None):
    mod = ATTENTION.get("infini")(cfg)
    ctx = training_context(jnp.asarray(pos), jnp.asarray(seg), True)
    if params is None:
        params = nn.meta.unbox(mod.init(jax.random.PRNGKey(0), jnp.asarray(x), ctx)["params"])
        # larger q/k so local attention is peaked and the memory path's features vary
        params = {
            k: ({"kernel": v["kernel"] * 10} if k in ("query", "key") else v) for k, v in params.items()
        }
    return np.asarray(mod.apply({"params": params}, jnp.asarray(x), ctx)), params


def elu1(x):
    return np.where(x > 0, x + 1.0, np.exp(x))


def reference(cfg, p, x, pos, seg):
    """Per row, head, and query: local softmax attention within the segment and document; memory
    built by folding, segment by segment, only the earlier segments' tokens of the query's document."""
    f, h = cfg.attention.infini, cfg.head_dim
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = x.astype(np.float64)
    gate = 1 / (1 + np.exp(-p["infini_gate"]))
    out = np.zeros((B, T, HEADS, h))
    for bi in range(B):
        for hd in range(HEADS):
            q = x[bi] @ p["query"]["kernel"][:, hd]
            k = x[bi] @ p["key"]["kernel"][:, hd]
            v = x[bi] @ p["value"]["kernel"][:, hd]
            qr = np.stack([rope_vec(q[i], pos[bi, i], cfg.rope_theta) for i in range(T)])
            kr = np.stack([rope_vec(k[i], pos[bi, i], cfg.rope_theta) for i in range(T)])
            qm, km = (qr, kr) if f.memory_positional else (q, k)
            for i in range(T):
                s_i, d = i // SEG, seg[bi, i]
                scores = np.array([qr[i] @ kr[j] / math.sqrt(h) if (j // SEG == s_i and j <= i and seg[bi, j] == d)
                                   else -np.inf for j in range(T)])  # fmt: skip
                a_dot = softmax(scores) @ v
                mem, z = np.zeros((h, h)), np.zeros(h)
                seen = False
                for s in range(s_i):  # earlier segments, in order, this document's tokens only
                    idx = [j for j in range(s * SEG, (s + 1) * SEG) if seg[bi, j] == d]
                    if not idx:
                        continue
                    seen = True
                    sk, vv = elu1(km[idx]), v[idx]
                    if f.update_rule == "delta":
                        vv = vv - (sk @ mem) / (sk @ z + 1e-6)[:, None]
                    mem, z = mem + sk.T @ vv, z + sk.sum(0)
                sq = elu1(qm[i])
                g = gate[hd]
                if f.first_segment == "skip":
                    out[bi, i, hd] = g * (sq @ mem) / (sq @ z) + (1 - g) * a_dot if seen else a_dot
                else:
                    out[bi, i, hd] = g * (sq @ mem) / (sq @ z + 1e-6) + (1 - g) * a_dot
    return np.einsum("btnh,nhd->btd", out, p["out"]["kernel"])


@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
@pytest.mark.parametrize("first_segment", ["skip", "eps"])
@pytest.mark.parametrize("update", ["linear", "delta"])
def test_layer_equals_the_naive_segment_loop(update, first_segment, packed):
    cfg = cfg_of(update_rule=update, first_segment=first_segment)
    x, pos, seg = _inputs(packed)
    got, p = run_layer(cfg, x, pos, seg)
    np.testing.assert_allclose(got, reference(cfg, p, x, pos, seg), rtol=1e-4, atol=1e-5)


def test_memory_positional_rotates_the_memory_path():
    cfg = cfg_of(memory_positional=True)
    x, pos, seg = _inputs(False)
    got, p = run_layer(cfg, x, pos, seg)
    np.testing.assert_allclose(got, reference(cfg, p, x, pos, seg), rtol=1e-4, atol=1e-5)
    plain, _ = run_layer(cfg_of(), x, pos, seg, params=p)
    assert np.abs(plain - got).max() > 1e-3 * np.abs(got).max()


def test_one_segment_with_empty_memory_is_causal_softmax_attention():
    cfg = cfg_of(segment_len=T)
    x, pos, seg = _inputs(True)
    got, p = run_layer(cfg, x, pos, seg)
    causal_cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, kind="causal"))
    mod = ATTENTION.get("causal")(causal_cfg)
    ctx = training_context(jnp.asarray(pos), jnp.asarray(seg), True)
    want = mod.apply({"params": {k: v for k, v in p.items() if k != "infini_gate"}}, jnp.asarray(x), ctx)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)


def test_bptt_segments_cut_gradients_through_the_memory():
    """With bptt_segments=1 the loss on the last segment gets no gradient from earlier segments'
    tokens except through local attention (none: they are other segments): d out[last] / d x[first] = 0."""
    x, pos, seg = _inputs(False)
    grads = {}
    for k in (None, 1):
        cfg = cfg_of(bptt_segments=k)
        _, p = run_layer(cfg, x, pos, seg)
        mod = ATTENTION.get("infini")(cfg)
        ctx = training_context(jnp.asarray(pos), jnp.asarray(seg), True)
        g = jax.grad(lambda x: mod.apply({"params": p}, x, ctx)[:, -1].sum())(jnp.asarray(x))
        grads[k] = np.abs(np.asarray(g[:, :SEG])).max()
    assert grads[None] > 1e-4 and grads[1] == 0.0


def test_streaming_decode_over_ten_segments_equals_the_full_forward():
    cfg = dataclasses.replace(cfg_of(update_rule="delta"), scan_layers=True)
    n = 10 * SEG + 3
    tokens = jax.random.randint(jax.random.PRNGKey(5), (B, n), 0, 64)
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    full = model.apply({"params": params}, tokens)
    from llm.infer import engine

    cache = engine.init_cache(model, B, n)
    shapes0 = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(cache)}
    logits, cache = engine.prefill(model, params, tokens[:, :7], jnp.full((B,), 7), cache)
    out = [logits]
    step = jax.jit(lambda p, t, pos, c: engine.decode_step(model, p, t, pos, c))
    for t in range(7, n):
        lg, cache = step(params, tokens[:, t], jnp.full((B,), t), cache)
        out.append(lg[:, None])
        assert {
            jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(cache)
        } == shapes0
    np.testing.assert_allclose(np.asarray(jnp.concatenate(out, 1)), np.asarray(full), rtol=1e-4, atol=1e-5)
    layer_cache = {k: v for k, v in shapes0.items() if "segment_key" in k}
    assert layer_cache and all(s[2] == SEG for s in layer_cache.values())  # [layers, B, SEG, K, H]


@pytest.mark.parametrize(
    "scan,chunk_segments,n", [(True, 1, 10 * SEG + 3), (False, 2, 4 * SEG), (True, 1, 12 * SEG)]
)
def test_model_level_recurrence_equals_the_full_sequence_step(scan, chunk_segments, n):
    """The step run chunk by chunk (llm/train/recurrent.py) gives the full-sequence loss, gradients
    and eval sums; packed documents cross chunk boundaries; 12 chunks take the nested scan."""
    from llm.train import recurrent, step

    cfg = dataclasses.replace(cfg_of(update_rule="delta"), scan_layers=scan)
    chunked = dataclasses.replace(cfg, attention=dataclasses.replace(
        cfg.attention, infini=dataclasses.replace(cfg.attention.infini, chunk_segments=chunk_segments)))  # fmt: skip
    tokens = jax.random.randint(jax.random.PRNGKey(3), (B, n + 1), 0, 64)
    seg = np.ones((B, n), np.int32)
    seg[1, 9:] = 2  # a second document starting mid-chunk, running across chunks
    seg[1, n - 4 :] = 0  # padding at the end
    pos = np.stack([np.arange(n), np.where(np.arange(n) < 9, np.arange(n), np.arange(n) - 9)]).astype(
        np.int32
    )
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": jnp.asarray(pos),
             "segment_ids": jnp.asarray(seg), "loss_mask": jnp.asarray(seg != 0)}  # fmt: skip
    assert recurrent.chunk_len(chunked) == chunk_segments * SEG
    if n == 12 * SEG:
        assert recurrent._group_size(12) == 3  # nested: 4 groups of 3 chunks
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), batch["tokens"])["params"])
    rng = jax.random.PRNGKey(0)
    outs = []
    for c in (cfg, chunked):
        model = Transformer(c)
        (loss, (nll, aux)), grads = jax.value_and_grad(step._loss, has_aux=True)(
            params, model, batch, rng, 7.0, 1.0
        )
        sums = step.eval_step(params, batch, model=model, token_bytes=jnp.ones((64,)))
        outs.append((loss, grads, sums, aux["metrics"]))
    (l0, g0, s0, m0), (l1, g1, s1, m1) = outs
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6), g0, g1
    )
    for k in s0:
        np.testing.assert_allclose(float(s1[k]), float(s0[k]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["infini_gate"]), float(m0["infini_gate"]), rtol=1e-6)


def test_gate_is_logged_per_head_and_never_decayed():
    from llm.config import OptimConfig
    from llm.model.channels import layer_metrics
    from llm.train import optimizer

    cfg = cfg_of(gate_init=-1.0)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, 64)
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    _, state = model.apply({"params": params}, tokens, mutable=["metrics"])
    m = layer_metrics(state["metrics"], cfg)
    assert float(m["infini_gate/layer_1/2"]) == pytest.approx(1 / (1 + math.exp(1.0)), rel=1e-6)
    rules = optimizer.rules(OptimConfig(groups=("infini_gate: lr_mult=10",)))
    s = optimizer.settings_for("layer_0/attn/infini_gate", rules)
    assert (s.lr_mult, s.decay, s.frozen) == (10.0, False, False)


def test_config_errors_name_the_field():
    from llm.registry import ConfigError

    for kw, msg in ((dict(update_rule="sum"), "infini.update_rule"), (dict(segment_len=0), "segment_len"),
                    (dict(first_segment="x"), "first_segment"), (dict(bptt_segments=0), "bptt_segments")):  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            cfg_of(**kw)
    a = AttentionConfig(n_heads=HEADS, pattern=("local", "infini"), infini=InfiniConfig(chunk_segments=1))
    with pytest.raises(ConfigError, match=r"chunk_segments=1 .*\['infini', 'local'\]"):
        dataclasses.replace(cfg_of(), attention=a)


# ---- passkey retrieval and loss by position ----------------------------------------------------------


def test_passkey_examples_hide_one_key_at_the_asked_depth():
    from llm.data import passkey

    for depth in (0.0, 0.5, 1.0):
        ex = passkey.examples(3, 900, depth, seed=1)[0]
        key = ex.answer.strip()
        assert len(key) == 5 and key.isdigit() and ex.prompt.endswith(passkey.QUESTION)
        at = ex.prompt.index(f"The pass key is {key}")
        assert abs(at / (len(ex.prompt) - len(passkey.QUESTION)) - depth) < 0.1
        assert ex.prompt.count(key) == 2  # the needle says it twice; nowhere else
    docs = passkey.training_documents(5, 100, 300, seed=0)
    assert len(set(docs)) == 5 and all(d.endswith(".") for d in docs)


class _Oracle:
    """A 'model' whose logits are the true next token everywhere (teacher forcing), except that
    with wrong_last it misses the last answer token: grids must then read 1.0 and 0.0."""

    def __init__(self, vocab, wrong_last=False):
        self.vocab, self.wrong_last = vocab, wrong_last

    def apply(self, variables, tokens_BT, positions_BT, segment_ids_BT):
        nxt = jnp.roll(tokens_BT, -1, axis=1)
        if self.wrong_last:  # the last real position predicts something else
            last = jnp.sum(segment_ids_BT, axis=1) - 2
            nxt = nxt.at[jnp.arange(tokens_BT.shape[0]), last].add(1) % self.vocab
        return jax.nn.one_hot(nxt, self.vocab) * 10.0


def test_passkey_grid_scores_teacher_forced_retrieval():
    from llm.data.tokenizers import ByteTokenizer
    from llm.evaluate import passkey_grid, passkey_heatmap

    tok = ByteTokenizer()
    lengths, depths = [200, 400], [0.0, 1.0]
    good = passkey_grid(_Oracle(tok.vocab_size), None, tok, lengths, depths, n=3)
    bad = passkey_grid(_Oracle(tok.vocab_size, wrong_last=True), None, tok, lengths, depths, n=3)
    assert good["exact"] == [[1.0, 1.0], [1.0, 1.0]] and bad["exact"] == [[0.0, 0.0], [0.0, 0.0]]
    assert bad["first"] == [[1.0, 1.0], [1.0, 1.0]]  # only the last token was wrong
    assert good["prompt_tokens"][1] > good["prompt_tokens"][0] > 200
    assert passkey_heatmap(good) is not None


def test_loss_by_position_buckets_the_windows():
    from llm.data.tokenizers import ByteTokenizer
    from llm.evaluate import loss_by_position

    tok = ByteTokenizer()
    r = loss_by_position(_Oracle(tok.vocab_size), None, tok, ["abcdefghi" * 40], seq_len=64, bucket=16)
    assert r["windows"] == 360 // 65 and len(r["loss"]) == 4
    right = math.log(1 + (tok.vocab_size - 1) * math.exp(-10.0))  # -log softmax of the 10.0 logit
    np.testing.assert_allclose(r["loss"][:-1], right, rtol=1e-4)
    assert r["loss"][-1] > 2 * right  # the last position's "next token" is rolled in from the start
