"""LoRA: only adapters train (the frozen base keeps every bit), merge equals the adapted model,
adapter-only checkpoints and their size, resume, a sharded mesh equals one device, export merges."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.api import load
from llm.config import from_config_dict
from llm.model import Transformer, lora
from llm.model.config import AttentionConfig, LoRAConfig, ModelConfig
from llm.registry import ConfigError
from llm.train.loop import train
from tests.test_train import tiny_cfg


def _leaves(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def base_and_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = str(root / "base")
    train(tiny_cfg(**{"train.steps": 6, "checkpoint.every": 6}), base)
    run = str(root / "lora")
    cfg = tiny_cfg(**{"train.steps": 8, "checkpoint.every": 4, "train.init_from": base, "model.lora.rank": 4,
                      "model.lora.targets": ("all_linear",), "optim.lr": 1e-2})  # fmt: skip
    train(cfg, run)
    return base, run, cfg


def test_only_adapters_change_and_checkpoints_hold_them_alone(base_and_lora):
    base, run, cfg = base_and_lora
    b, r = _leaves(load(base).params), _leaves(load(run).params)
    adapters = {k for k in r if "lora_" in k}
    assert adapters and set(r) - adapters == set(b)
    for k in b:  # the frozen base keeps every bit
        assert np.array_equal(b[k], r[k]), k
    assert any(np.abs(r[k]).max() > 0 for k in adapters if "lora_b" in k)  # B left zero: it trained
    saved = os.listdir(os.path.join(run, "checkpoints", "8", "params"))
    size = lambda d: sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(d) for f in fs)  # noqa: E731
    assert size(os.path.join(run, "checkpoints", "8", "params")) < 0.5 * size(
        os.path.join(base, "checkpoints", "6", "params")
    )
    assert saved  # adapters only (the base is read back from train.init_from)


def test_resume_of_a_lora_run_restores_adapters_onto_the_base(base_and_lora, tmp_path):
    base, run, cfg = base_and_lora
    wd = str(tmp_path / "again")
    train(cfg, wd, stop_at=4)
    train(cfg, wd)  # resumes at 4 from an adapters-only checkpoint
    a, b = _leaves(load(run).params), _leaves(load(wd).params)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7)


def test_merge_equals_the_adapted_model_and_exports(base_and_lora, tmp_path):
    from llm import convert

    _, run, _ = base_and_lora
    r = load(run)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 200, (2, 16)))
    adapted = r.model.apply({"params": r.params}, tokens)
    merged_dir = convert.merge_lora(run, str(tmp_path / "merged"))
    m = load(merged_dir)
    assert m.config.model.lora.rank == 0 and m.config.train.init_from is None
    np.testing.assert_allclose(np.asarray(m.model.apply({"params": m.params}, tokens)), np.asarray(adapted),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    with pytest.raises(ConfigError, match="merge its adapters first"):
        train(
            tiny_cfg(**{"train.steps": 1, "train.init_from": run, "model.lora.rank": 2}), str(tmp_path / "x")
        )


def test_gradients_reach_only_adapters_and_the_step_skips_frozen_weight_grads():
    from llm.config import OptimConfig
    from llm.train import optimizer, step

    cfg = ModelConfig(vocab_size=61, d_model=24, n_layers=2, positional="rope", norm="rmsnorm", mlp="swiglu",
                      use_bias=False, attention=AttentionConfig(n_heads=3), lora=LoRAConfig(rank=2, targets=("attn_qv",)))  # fmt: skip
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 61)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), tokens)["params"])
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(p) else x, params)  # fmt: skip
    batch = {"tokens": tokens, "targets": tokens, "positions": jnp.broadcast_to(jnp.arange(9), (2, 9)),
             "segment_ids": jnp.ones((2, 9), jnp.int32), "loss_mask": jnp.ones((2, 9))}  # fmt: skip
    grads = jax.grad(lambda p: step._loss(p, model, batch, jax.random.PRNGKey(0), 18.0, 1.0)[0])(params)
    mask = optimizer.trainable_mask(OptimConfig(), lora.OPTIMIZER_GROUPS)(params)
    paths = {jax.tree_util.keystr(k): m for k, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert {k for k, m in paths.items() if m} == {k for k in paths if "lora_" in k}
    assert all(("query" in k or "value" in k) for k in paths if "lora_" in k)  # attn_qv: q and v only
    # the adapters get gradient; what the step keeps for the base is exactly zero
    g = _leaves(grads)
    assert all(np.abs(g[k]).max() > 0 for k in g if "lora_" in k)
    tx, sched = optimizer.make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10, lora.OPTIMIZER_GROUPS)
    from llm.train.state import TrainState

    zero = jnp.zeros((), jnp.int32)
    state = TrainState(
        step=zero, params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(0), skipped=zero
    )
    new, metrics = jax.jit(lambda s: step.train_step(
        s, batch, model=model, tx=tx, schedule=sched,
        trainable=optimizer.trainable_mask(OptimConfig(), lora.OPTIMIZER_GROUPS)))(state)  # fmt: skip
    changed = {k for k, v in _leaves(new.params).items() if not np.array_equal(v, _leaves(params)[k])}
    assert changed == {k for k in paths if "lora_" in k}
    # the logged gradient norm is the adapters' alone
    want = np.sqrt(sum(float(np.sum(g[k].astype(np.float64) ** 2)) for k in g if "lora_" in k))
    np.testing.assert_allclose(float(metrics["grad_norm"]), want, rtol=1e-4)


@pytest.mark.parametrize("base_quant", ["none", "int8"])
def test_lora_on_a_sharded_mesh_equals_one_device(tmp_path, base_quant):
    """fsdp 2 x tensor 4 (adapters sharded with their kernels' axes; an int8 base's values like its
    kernels, its scales without the contracted axes) against pure data parallelism over the 8 fake
    devices (every device holds the whole model: one device's arithmetic, the batch split), 4 LoRA
    steps, fp32."""
    from tests.test_sharding import mesh_overrides

    runs = {}
    base = str(tmp_path / "base")
    train(tiny_cfg(**{"train.steps": 2}), base)
    for name, mesh in (("one", mesh_overrides((8, 1, 1))), ("mesh", mesh_overrides((1, 2, 4)))):
        wd = str(tmp_path / name)
        train(
            tiny_cfg(
                **{
                    "train.steps": 4,
                    "train.init_from": base,
                    "model.lora.rank": 4,
                    "optim.lr": 1e-2,
                    "model.lora.base_quant": base_quant,
                    **mesh,
                }
            ),
            wd,
        )
        runs[name] = _leaves(load(wd).params)
        if name == "mesh" and base_quant == "int8":  # the int8 base is sharded like its kernels
            from llm import sharding
            from llm.train.builder import build_trainer

            c = tiny_cfg(
                **{
                    "train.init_from": base,
                    "model.lora.rank": 4,
                    "model.lora.base_quant": "int8",
                    "model.vocab_size": 320,
                    **mesh,
                }
            )
            down = build_trainer(c, sharding.make_mesh(c.mesh)).state_shardings.params["layer_0"]["mlp"][
                "fc_in"
            ]
            q, scale = down["kernel"].q.spec, down["kernel"].scale.spec
            assert q[1] is not None and (len(scale) < 1 or scale[0] is None) and scale[1:2] == q[1:2], (
                q,
                scale,
            )
    for k, v in runs["one"].items():
        np.testing.assert_allclose(runs["mesh"][k], v, rtol=2e-4, atol=2e-6, err_msg=k)


def test_adapter_bytes_on_the_default_model_at_rank_8():
    """Adapter-only checkpoint size vs the base's (float32 bytes of the parameters each holds)."""
    from configs import shakespeare

    c = shakespeare.get_config()
    c.model.vocab_size = 2048
    c.model.lora.rank = 8
    cfg = from_config_dict(c)
    model = Transformer(cfg.model)
    shapes = jax.eval_shape(
        lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    )
    adapters, base_params = lora.split(shapes)
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
    assert 0 < nbytes(adapters) <= 0.05 * nbytes(base_params), (nbytes(adapters), nbytes(base_params))


def test_config_errors():
    with pytest.raises(ConfigError, match="model.lora"):
        ModelConfig(lora=LoRAConfig(rank=-1))
    with pytest.raises(ConfigError, match="neither an alias"):
        ModelConfig(lora=LoRAConfig(rank=2, targets=("attn(",)))


# --- QLoRA: adapters on an int8 base -----------------------------------------------------------


def _int8_reference(w, contracted):
    """Symmetric per-output-channel int8, written in numpy (independent of llm/model/quant.py)."""
    w = np.asarray(w, np.float64)
    amax = np.max(np.abs(w), axis=contracted, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


@pytest.fixture(scope="module")
def qlora_run(base_and_lora, tmp_path_factory):
    base = base_and_lora[0]
    run = str(tmp_path_factory.mktemp("qlora") / "run")
    cfg = tiny_cfg(**{"train.steps": 8, "checkpoint.every": 4, "train.init_from": base, "model.lora.rank": 4,
                      "model.lora.targets": ("attention",), "model.lora.base_quant": "int8", "optim.lr": 1e-2})  # fmt: skip
    result = train(cfg, run)
    return base, run, cfg, result


def test_qlora_holds_the_base_in_int8_and_trains_only_adapters(qlora_run):
    from llm.model.quant import QTensor

    base, run, cfg, result = qlora_run
    assert np.isfinite(result["eval_loss"])
    b, r = load(base), load(run)
    is_q = lambda x: isinstance(x, QTensor)  # noqa: E731
    stored = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(r.params, is_leaf=is_q)
    }
    quantized = {k: v for k, v in stored.items() if is_q(v)}
    # every layer kernel (adapted or not: the MLP's too) is int8, with the reference's values
    layer_kernels = {k for k in _leaves(b.params) if k.endswith("['kernel']") and "layer" in k}
    assert set(quantized) == layer_kernels and layer_kernels
    for k, v in quantized.items():
        w = _leaves(b.params)[k]
        contracted = (0, 1) if "['out']" in k else (0,)
        q, scale = _int8_reference(w, contracted)
        assert v.q.dtype == jnp.int8
        assert np.mean(np.asarray(v.q) != q) < 1e-3, k  # (round-half ties in f32 vs f64)
        np.testing.assert_allclose(np.asarray(v.scale), scale, rtol=1e-6)
    # embeddings and norms are the base's bits; the adapters moved
    for k, v in _leaves(b.params).items():
        if k not in layer_kernels:
            assert np.array_equal(np.asarray(stored[k]), v), k
    assert any(np.abs(np.asarray(v)).max() > 0 for k, v in stored.items() if "lora_b" in k)


def _int8_and_float_steps(cfg, qcfg, tokens, qparams):
    """One jitted LoRA train step over the int8 base (`qcfg`) and one over its widened float copy
    (`cfg`), same batch, optimizer and initial state: ((state, metrics), (state, metrics))."""
    from llm.config import OptimConfig
    from llm.model.quant import dequantize
    from llm.train import optimizer, step
    from llm.train.state import TrainState

    t = tokens.shape[1]
    batch = {"tokens": tokens, "targets": tokens, "positions": jnp.broadcast_to(jnp.arange(t), tokens.shape),
             "segment_ids": jnp.ones(tokens.shape, jnp.int32), "loss_mask": jnp.ones(tokens.shape)}  # fmt: skip
    groups = lora.OPTIMIZER_GROUPS
    tx, sched = optimizer.make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10, groups)
    zero = jnp.zeros((), jnp.int32)
    widened = dequantize(qparams)
    out = []
    for model, p in ((Transformer(qcfg), qparams), (Transformer(cfg), widened)):
        state = TrainState(
            step=zero, params=p, opt_state=tx.init(widened), rng=jax.random.PRNGKey(0), skipped=zero
        )
        out.append(jax.jit(lambda s, model=model: step.train_step(
            s, batch, model=model, tx=tx, schedule=sched, trainable=optimizer.trainable_mask(OptimConfig(), groups)))(state))  # fmt: skip
    return out


def test_qlora_step_equals_lora_on_the_dequantized_base():
    """One jitted step with an int8 base vs the same step on its widened float copy: same loss,
    same adapter updates; the int8 base passes through bit for bit."""
    from llm.model.quant import QTensor

    lo = LoRAConfig(rank=2, targets=("all_linear",))
    cfg = ModelConfig(vocab_size=61, d_model=24, n_layers=3, positional="rope", norm="rmsnorm", mlp="swiglu",
                      use_bias=False, scan_layers=True, remat="full", attention=AttentionConfig(n_heads=3), lora=lo)  # fmt: skip
    qcfg = cfg.replace(lora=dataclasses.replace(lo, base_quant="int8"))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 61)
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(1), tokens)["params"])
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(p) else x, params)  # fmt: skip
    qparams = lora.quantize_base(params, qcfg.lora)
    n_q = sum(
        isinstance(x, QTensor) for x in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, QTensor))
    )
    assert n_q == 7  # q, k, v, out, gate, up, down of the scanned stack
    (qnew, qm), (fnew, fm) = _int8_and_float_steps(cfg, qcfg, tokens, qparams)
    np.testing.assert_allclose(float(qm["loss"]), float(fm["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(qm["grad_norm"]), float(fm["grad_norm"]), rtol=1e-5)
    qa, fa = _leaves(lora.split(qnew.params)[0]), _leaves(lora.split(fnew.params)[0])
    assert set(qa) == set(fa) and qa
    for k in qa:
        np.testing.assert_allclose(qa[k], fa[k], rtol=1e-5, atol=1e-7, err_msg=k)
        assert not np.array_equal(qa[k], _leaves(lora.split(params)[0])[k]), k  # it moved
    for k, v in _leaves(lora.split(qnew.params)[1]).items():
        assert np.array_equal(v, _leaves(lora.split(qparams)[1])[k]), k


def test_qlora_resume_and_merge(qlora_run, tmp_path):
    from llm import convert

    _, run, cfg, _ = qlora_run
    wd = str(tmp_path / "again")
    train(cfg, wd, stop_at=4)
    train(cfg, wd)  # resumes at 4: adapters from the checkpoint, the int8 base re-made from init_from
    a, b = _leaves(load(run).params), _leaves(load(wd).params)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)
    r = load(run)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 200, (2, 16)))
    adapted = r.model.apply({"params": r.params}, tokens)
    m = load(convert.merge_lora(run, str(tmp_path / "merged")))
    assert m.config.model.lora.base_quant == "none"
    # the KV-cached engine samples the QLoRA run as its merged form does
    kw = {"max_new_tokens": 6, "temperature": 0.0}
    assert r.generate("ROMEO:", **kw) == m.generate("ROMEO:", **kw)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(m.params))
    np.testing.assert_allclose(np.asarray(m.model.apply({"params": m.params}, tokens)), np.asarray(adapted),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_qlora_config_errors():
    with pytest.raises(ConfigError, match="base_quant"):
        ModelConfig(lora=LoRAConfig(rank=2, base_quant="nf4"))
    with pytest.raises(ConfigError, match="rank > 0"):
        ModelConfig(lora=LoRAConfig(rank=0, base_quant="int8"))
    with pytest.raises(ConfigError, match="train.init_from"):
        tiny_cfg(**{"model.lora.rank": 2, "model.lora.base_quant": "int8"})


# --- LoRA on MoE experts -----------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["dropless", "dense"])
def test_expert_adapters_equal_the_reference_on_merged_expert_weights(impl):
    """Both expert implementations run the per-expert adapters factored; the per-token float64
    reference (tests/test_moe.py) on W_e + alpha/rank * A_e B_e, merged in numpy, must agree."""
    from llm.model.moe import MoE
    from tests.test_moe import D, moe_cfg, reference

    cfg = moe_cfg(impl=impl).replace(mlp="swiglu", lora=LoRAConfig(rank=3, alpha=6.0, targets=("experts",)))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 12, D))

    class InMLP(nn.Module):  # the layer at path `mlp`, as in a block, so the `experts` alias finds it
        @nn.compact
        def __call__(self, x):
            return MoE(cfg, name="mlp")(x)

    params = nn.meta.unbox(InMLP().init(jax.random.PRNGKey(0), x)["params"])
    params["mlp"]["router"] = params["mlp"]["router"] * 40.0  # clear-cut choices (no near-ties)
    p = params["mlp"]
    assert {k for k in p if k.endswith("_lora")} == {"w_in_lora", "w_gate_lora", "w_out_lora"}
    assert p["w_in_lora"]["lora_a"].shape == (4, D, 3) and p["w_out_lora"]["lora_b"].shape == (4, 3, D)
    for i, n in enumerate(("w_in", "w_gate", "w_out")):  # B starts at 0: give it values
        b = p[f"{n}_lora"]["lora_b"]
        p[f"{n}_lora"]["lora_b"] = 0.3 * jax.random.normal(jax.random.PRNGKey(10 + i), b.shape)
    y = InMLP().apply({"params": params}, x, mutable=["metrics", "intermediates", "losses"])[0]
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    merged = {k: v for k, v in p.items() if not k.endswith("_lora")}
    for n in ("w_in", "w_gate", "w_out"):
        merged[n] = f64(p[n]) + 2.0 * np.matmul(f64(p[f"{n}_lora"]["lora_a"]), f64(p[f"{n}_lora"]["lora_b"]))
    want, _ = reference(cfg, merged, x)
    assert (
        np.abs(want - reference(cfg, {k: v for k, v in p.items() if not k.endswith("_lora")}, x)[0]).max()
        > 1e-2
    )
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-4, atol=1e-5)
    # lora.merge folds them the same way
    merged_tree = lora.merge({"mlp": p}, cfg.lora)["mlp"]
    for n in ("w_in", "w_gate", "w_out"):
        np.testing.assert_allclose(np.asarray(merged_tree[n]), merged[n], rtol=1e-5, atol=1e-6)


def test_moe_qlora_quantizes_experts_and_trains_only_their_adapters():
    """A scanned MoE model, LoRA on the experts over an int8 base: the experts' matrices are
    QTensors, one step moves only the adapters and matches the float model on the widened base."""
    from llm.model.quant import QTensor
    from tests.test_moe import moe_cfg

    lo = LoRAConfig(rank=2, targets=("experts",))
    cfg = moe_cfg().replace(mlp="swiglu", scan_layers=True, lora=lo)
    qcfg = cfg.replace(lora=dataclasses.replace(lo, base_quant="int8"))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 64)
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(1), tokens)["params"])
    qparams = lora.quantize_base(params, qcfg.lora)
    mlp = qparams["layers"]["mlp"]
    assert all(isinstance(mlp[n], QTensor) for n in ("w_in", "w_gate", "w_out"))
    assert mlp["w_in"].scale.shape == (2, 4, 1, 24)  # per layer, expert and output channel
    assert not isinstance(mlp["router"], QTensor) and "lora_a" in mlp["w_in_lora"]
    (qnew, qm), (fnew, fm) = _int8_and_float_steps(cfg, qcfg, tokens, qparams)
    np.testing.assert_allclose(float(qm["loss"]), float(fm["loss"]), rtol=1e-6)
    before, after = _leaves(qparams), _leaves(qnew.params)
    changed = {k for k in after if not np.array_equal(after[k], before[k])}
    assert changed and all("_lora" in k for k in changed)
    assert {k for k in changed if "lora_b" in k} == {k for k in after if "lora_b" in k}
    for k in changed:
        np.testing.assert_allclose(after[k], _leaves(fnew.params)[k], rtol=1e-5, atol=1e-7, err_msg=k)
