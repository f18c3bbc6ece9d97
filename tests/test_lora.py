"""LoRA: only adapters train (the frozen base keeps every bit), merge equals the adapted model,
adapter-only checkpoints and their size, resume, a sharded mesh equals one device, export merges."""

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


def test_lora_on_a_sharded_mesh_equals_one_device(tmp_path):
    """fsdp 2 x tensor 4 (adapters sharded with their kernels' axes) against pure data parallelism
    over the 8 fake devices (every device holds the whole model: one device's arithmetic, the batch
    split), 4 LoRA steps, fp32."""
    from tests.test_sharding import mesh_overrides

    runs = {}
    base = str(tmp_path / "base")
    train(tiny_cfg(**{"train.steps": 2}), base)
    for name, mesh in (("one", mesh_overrides((8, 1, 1))), ("mesh", mesh_overrides((1, 2, 4)))):
        wd = str(tmp_path / name)
        train(
            tiny_cfg(
                **{"train.steps": 4, "train.init_from": base, "model.lora.rank": 4, "optim.lr": 1e-2, **mesh}
            ),
            wd,
        )
        runs[name] = _leaves(load(wd).params)
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
