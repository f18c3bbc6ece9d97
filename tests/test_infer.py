"""KV-cached inference: cached logits equal the full forward pass, batching, sampling, int8, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import sharding
from llm.data.tokenizers import ByteTokenizer
from llm.infer import engine
from llm.infer import generation as gen
from llm.infer.engine import Sampling
from llm.model import AttentionConfig, ModelConfig, Transformer, quant
from llm.registry import ConfigError

TOL = dict(rtol=1e-4, atol=1e-4)  # fp32: cached decode vs full forward (observed ~3e-6 on O(10) logits)
GREEDY = Sampling(temperature=0.0)


def small(**kw):
    att = kw.pop("attention", {})
    base = dict(vocab_size=64, d_model=32, n_layers=2, max_seq_len=48, init_std=0.3)
    base.update(kw)
    return ModelConfig(**base, attention=AttentionConfig(**{"n_heads": 4, **att}))


def init(cfg, seed=0):
    """Model and random params drawn in numpy from the abstract init (a compiled init costs ~1 s)."""
    model = Transformer(cfg)
    shapes = jax.eval_shape(
        lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    )
    rs = np.random.RandomState(seed)

    def draw(path, s):
        x = rs.normal(0.0, cfg.init_std, s.shape)
        return (1.0 + x if str(path[-1].key) == "scale" else x).astype(np.float32)  # norm gains near 1

    return model, jax.tree_util.tree_map_with_path(draw, shapes["params"])


# Every positional kind, with MHA, GQA and MQA spread over them, plus scan_layers and impl=jax.
CACHE_VARIANTS = {
    "learned-mha": dict(positional="learned"),
    "sinusoidal-gqa-swiglu": dict(positional="sinusoidal", mlp="swiglu", norm="rmsnorm",
                                  attention=dict(n_kv_heads=2)),
    "rope-gqa-jaximpl": dict(positional="rope", attention=dict(n_kv_heads=2, impl="jax")),
    "alibi-mqa": dict(positional="alibi", attention=dict(n_heads=8, n_kv_heads=1)),
    "none-mqa-postnorm": dict(positional="none", norm_position="post", tie_embeddings=False,
                              attention=dict(n_kv_heads=1)),
    "scan-rope-gqa": dict(positional="rope", scan_layers=True, remat="full", attention=dict(n_kv_heads=2)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CACHE_VARIANTS))
def test_prefill_then_decode_equals_full_forward(name):
    """Rows of lengths 6 and 3 (left-padded) prefilled, then 4 cached steps == full forward per row."""
    model, params = init(small(**CACHE_VARIANTS[name]))
    model = engine.inference_model(model)
    lengths, n_steps = np.asarray([6, 3], np.int32), 4
    rows_BT = np.random.RandomState(0).randint(0, 64, (2, 6 + n_steps)).astype(np.int32)
    rows_BT[1, 3 + n_steps :] = 0  # row 1 is shorter (right padding: causal, so it changes nothing)
    p = int(lengths.max())
    prompt_BP = np.zeros((2, p), np.int32)
    for b, n in enumerate(lengths):
        prompt_BP[b, p - n :] = rows_BT[b, :n]
    prefill = jax.jit(lambda prm, t, n, c: engine.prefill(model, prm, t, n, c))
    step = jax.jit(lambda prm, t, pos, c: engine.decode_step(model, prm, t, pos, c))
    logits_BPV, cache = prefill(params, prompt_BP, lengths, engine.init_cache(model, 2, p + n_steps))
    got = [[np.asarray(logits_BPV[b, p - n :])] for b, n in enumerate(lengths)]
    for i in range(n_steps):
        logits_BV, cache = step(params, rows_BT[np.arange(2), lengths + i], lengths + i, cache)
        for b in range(2):
            got[b].append(np.asarray(logits_BV[b])[None])
    full_BTV = np.asarray(jax.jit(lambda prm, t: model.apply({"params": prm}, t))(params, rows_BT))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.concatenate(got[b]), full_BTV[b, : n + n_steps], **TOL)


# Lengths 3..17: the batch pads to 32 slots, most prompts alone to 16.
PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 2, 9, 4, 6], list(range(1, 18)), [11, 12, 13, 14, 15]]
N_NEW = 10


@pytest.fixture(scope="module")
def rope_gqa():
    return init(small(positional="rope", attention=dict(n_kv_heads=2)))


def test_batched_greedy_equals_each_prompt_alone(rope_gqa):
    model, params = rope_gqa
    batch = gen.generate_ids(model, params, PROMPTS, N_NEW, sampling=GREEDY)
    alone = [gen.generate_ids(model, params, [p], N_NEW, sampling=GREEDY)[0] for p in PROMPTS]
    assert batch == alone
    assert all(len(x) == N_NEW for x in batch)
    # Teacher-forced check against the uncached model: each new token is the argmax after its prefix
    # (rows right-padded into one batch: causal attention keeps the padding out of the real logits).
    full = np.zeros((len(PROMPTS), max(map(len, PROMPTS)) + N_NEW), np.int32)
    for b, (prompt, new) in enumerate(zip(PROMPTS, batch)):
        full[b, : len(prompt) + N_NEW] = prompt + new
    logits_BTV = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, full))
    for b, prompt in enumerate(PROMPTS):
        n = len(prompt)
        assert np.argmax(logits_BTV[b, n - 1 : n - 1 + N_NEW], -1).tolist() == batch[b]


def test_stop_tokens_cut_each_row_and_seeded_sampling_repeats(rope_gqa):
    model, params = rope_gqa
    full = gen.generate_ids(model, params, PROMPTS, N_NEW, sampling=GREEDY)
    stop = full[1][3]
    cut = gen.generate_ids(model, params, PROMPTS, N_NEW, sampling=GREEDY, stop_ids=[stop])
    for f, c in zip(full, cut):
        assert c == (f[: f.index(stop)] if stop in f else f)
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3)
    a = gen.generate_ids(model, params, PROMPTS, N_NEW, sampling=s, seed=7)
    b = gen.generate_ids(model, params, PROMPTS, N_NEW, sampling=s, seed=7)
    c = gen.generate_ids(model, params, PROMPTS, N_NEW, sampling=s, seed=8)
    assert a == b and a != c


def test_repetition_penalty_matches_ctrl_formula():
    from llm.infer.sampling import penalize_repetition

    logits = np.array([[2.0, -1.0, 0.5, -3.0]], np.float32)
    seen = np.array([[True, True, False, False]])
    got = np.asarray(penalize_repetition(jnp.asarray(logits), jnp.asarray(seen), 2.0))
    np.testing.assert_allclose(got, [[1.0, -2.0, 0.5, -3.0]])


def test_text_api_batch_stream_and_sliding_window():
    tok = ByteTokenizer()
    model, params = init(small(vocab_size=264, positional="learned", max_seq_len=32))
    one = gen.generate(model, params, tok, "hi", max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    many = gen.generate(model, params, tok, ["hi", "hello there"], max_new_tokens=8, temperature=0.0,
                        stop_at_eos=False)  # fmt: skip
    assert isinstance(one, str) and many[0] == one
    # 40 tokens overflow the 32-token context: a single prompt goes to generate_stream, which slides
    # its window; its first tokens (before any slide) equal the batch engine's.
    long = "".join(gen.generate_stream(model, params, tok, "hi", max_new_tokens=40, temperature=0.0,
                                       stop_at_eos=False))  # fmt: skip
    assert long.startswith(one) and len(long) > len(one)
    with pytest.raises(ValueError, match="must be below model.max_seq_len=32"):
        gen.generate(model, params, tok, ["a", "b"], max_new_tokens=40)


def test_misuse_errors(rope_gqa):
    model, params = rope_gqa
    with pytest.raises(ValueError, match="no prompts given"):
        gen.generate_ids(model, params, [], 4)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate_ids(model, params, [[1], []], 4)
    with pytest.raises(ValueError, match="exceeds the model's context model.max_seq_len=48"):
        gen.generate_ids(model, params, [list(range(1, 40))], 20)
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(top_p=0.0)
    with pytest.raises(ConfigError, match="unknown quantization 'int4'; valid choices: none, int8"):
        gen.generate_ids(model, params, [[1]], 4, quantize="int4")


def test_int8_quantized_matmul_matches_numpy_reference():
    rs = np.random.RandomState(0)
    # Dense kernel (D, F), attention output (N, H, D) and a scanned (L, D, F) stack.
    f32 = lambda *shape: rs.randn(*shape).astype(np.float32)  # noqa: E731 (reference in the same fp32)
    cases = [(("mlp", "fc_in", "kernel"), f32(32, 48), 1), (("attn", "out", "kernel"), f32(4, 8, 32), 2),
             (("layers", "mlp", "fc_in", "kernel"), f32(3, 32, 48), 1)]  # fmt: skip
    for path, w, n_contract in cases:
        qt = engine.quantize_jit({path[-2]: {"kernel": w}} if path[0] != "layers" else
                                 {"layers": {"fc_in": {"kernel": w}}}, "int8")  # fmt: skip
        qt = jax.tree.leaves(qt, is_leaf=lambda x: isinstance(x, quant.QTensor))[0]
        lead = 1 if path[0] == "layers" else 0
        axes = tuple(range(lead, lead + n_contract))
        scale = np.abs(w).max(axis=axes, keepdims=True) / np.float32(127)  # one per output channel
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        np.testing.assert_array_equal(np.asarray(qt.q), q)
        np.testing.assert_allclose(np.asarray(qt.scale), scale, rtol=1e-6)
        assert np.all(np.abs(np.asarray(qt.dequantize()) - w) <= scale / 2 + 1e-6)
        if lead == 0:
            x = rs.randn(5, int(np.prod(w.shape[:n_contract])))
            want = x @ (q.astype(np.float64) * scale).reshape(x.shape[1], -1)
            got = jnp.asarray(x, jnp.float32) @ qt.dequantize().reshape(x.shape[1], -1)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_int8_model_logits_close_and_memory_smaller():
    cfg = small(positional="rope", init_std=0.02, attention=dict(n_kv_heads=2), d_model=64, vocab_size=256)
    model, params = init(cfg)
    qparams = engine.quantize_jit(params, "int8")
    assert quant.is_quantized(qparams) and quant.quantize_params(params, "none") is params
    # Matrices shrink 4x; vectors (biases, norms) and the per-channel scales stay fp32.
    assert quant.param_bytes(qparams) < 0.3 * quant.param_bytes(params)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 256, (2, 16)))
    apply = jax.jit(lambda p: model.apply({"params": quant.dequantize(p)}, tokens))
    ref, got = np.asarray(apply(params)), np.asarray(apply(qparams))
    # int8 with per-channel scales: ~0.5% weight noise; logits' relative error stays within 3%.
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.03


def test_sharded_generation_equals_unsharded(rope_gqa):
    """data=2 x fsdp=2 x tensor=2 on the 8 fake CPU devices: same tokens, fp32 and int8."""
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    model, params = rope_gqa
    want = gen.generate_ids(model, params, PROMPTS, N_NEW, sampling=GREEDY)
    sharded = gen.shard_params(model, params, mesh)
    kernel = sharded["layer_0"]["mlp"]["fc_in"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and kernel.sharding.spec != jax.sharding.PartitionSpec()
    assert gen.generate_ids(model, sharded, PROMPTS, N_NEW, sampling=GREEDY, mesh=mesh) == want
    want_q = gen.generate_ids(model, params, PROMPTS, N_NEW, sampling=GREEDY, quantize="int8")
    got_q = gen.generate_ids(model, params, PROMPTS, N_NEW, sampling=GREEDY, quantize="int8", mesh=mesh)
    assert got_q == want_q
