"""Mixture-of-Experts (llm/model/moe.py) against an independent per-token numpy reference, its
losses against hand-computed values, balancing, the model-level contracts (E=1 equals dense,
scanned equals unrolled, decode equals the full pass) and the published preset sizes."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.model import AttentionConfig, FFNConfig, ModelConfig, MoEConfig, Transformer, layout
from llm.model.moe import MoE

D, F = 16, 24


def moe_cfg(**moe):
    kw = dict(num_experts=4, top_k=2, expert_d_ff=F)
    kw.update(moe)
    return ModelConfig(vocab_size=64, d_model=D, n_layers=2, max_seq_len=16, use_bias=True,
                       attention=AttentionConfig(n_heads=2), ffn=FFNConfig(kind="moe", moe=MoEConfig(**kw)))  # fmt: skip


def init_layer(cfg, x, seed=0):
    layer = MoE(cfg)
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(seed), x)["params"])
    # Spread the router so choices are clear-cut (no near-ties between experts).
    params["router"] = params["router"] * 40.0
    return layer, params


# ---- the independent reference ------------------------------------------------------------------


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _silu(x):
    return x / (1 + np.exp(-x))


def reference(cfg, p, x_BTD):
    """Each token through its top-k experts in a plain loop, float64; capacity per sequence."""
    outs = [_reference_group(cfg, p, x_TD) for x_TD in np.asarray(x_BTD)]
    return np.concatenate([y for y, _ in outs]), np.concatenate([keep for _, keep in outs])


def _reference_group(cfg, p, x_ND):
    m = cfg.ffn.moe
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x_ND, np.float64)
    n, e, k = x.shape[0], m.num_experts, m.top_k
    logits = x @ p["router"]
    bias = p.get("router_bias", np.zeros(e))
    choices = []
    for i in range(n):
        lg = logits[i]
        if m.router == "softmax_topk":
            prob = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
            idx = np.argsort(-(prob + bias))[:k]
            gates = prob[idx]
        elif m.router == "topk_softmax":
            idx = np.argsort(-(lg + bias))[:k]
            z = np.exp(lg[idx] - lg[idx].max())
            gates = z / z.sum()
        else:  # sigmoid
            s = 1 / (1 + np.exp(-lg))
            idx = np.argsort(-(s + bias))[:k]
            gates = s[idx] / s[idx].sum()
        choices.append((idx, gates))
    cap = math.ceil(m.capacity_factor * n * k / e) if m.capacity_factor else None
    count = np.zeros(e, int)
    keep = np.ones((n, k), bool)
    for kk in range(k):  # first choices of every token before any second choice
        for i in range(n):
            ex = choices[i][0][kk]
            keep[i, kk] = cap is None or count[ex] < cap
            count[ex] += 1
    y = np.zeros_like(x)
    for i in range(n):
        for kk, (ex, g) in enumerate(zip(*choices[i])):
            if not keep[i, kk]:
                continue
            h = x[i] @ p["w_in"][ex] + (p["b_in"][ex] if "b_in" in p else 0)
            h = _silu(x[i] @ p["w_gate"][ex]) * h if cfg.mlp == "swiglu" else _gelu(h)
            y[i] += g * (h @ p["w_out"][ex] + (p["b_out"][ex] if "b_out" in p else 0))
    return y, keep


@pytest.mark.parametrize("impl", ["dropless", "dense"])
@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax", "sigmoid"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75], ids=["no-drop", "cap0.75"])
def test_layer_equals_the_per_token_reference(impl, router, capacity_factor):
    cfg = moe_cfg(impl=impl, router=router, capacity_factor=capacity_factor)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 12, D))
    layer, params = init_layer(cfg, x)
    y, state = layer.apply({"params": params}, x, mutable=["metrics", "intermediates"])
    want, keep = reference(cfg, params, x)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-4, atol=1e-5)
    drop = float(jax.tree.leaves(state["metrics"]["moe_drop_fraction"])[0])
    assert drop == pytest.approx(1 - keep.mean())
    if capacity_factor:
        assert 0 < drop < 0.5  # the capacity really dropped some assignments (and they add nothing)
    else:
        assert drop == 0


def test_blocked_grouped_matmul_equals_ragged_dot():
    """The CPU grouped matmul (blocks of one expert each) computes what lax.ragged_dot does,
    with an empty group and groups that are not multiples of the block."""
    from llm.model.moe import grouped_matmul_blocked

    sizes = np.array([5, 0, 9, 3], np.int32)
    m = int(sizes.sum())
    x = jax.random.normal(jax.random.PRNGKey(7), (m, 6))
    w = jax.random.normal(jax.random.PRNGKey(8), (4, 6, 5))
    expert = jnp.asarray(np.repeat(np.arange(4), sizes))
    want = jax.lax.ragged_dot(x, w, jnp.asarray(sizes))
    got = grouped_matmul_blocked(x, w, expert, jnp.asarray(sizes), block=4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g_want = jax.grad(lambda w: jnp.sum(jax.lax.ragged_dot(x, w, jnp.asarray(sizes)) ** 2))(w)
    g_got = jax.grad(
        lambda w: jnp.sum(grouped_matmul_blocked(x, w, expert, jnp.asarray(sizes), block=4) ** 2)
    )(w)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_dropless_equals_dense_with_room_for_every_token(mlp):
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, D))
    cfgs = [
        dataclasses.replace(moe_cfg(impl=i, capacity_factor=c), mlp=mlp)
        for i, c in (("dropless", None), ("dense", 4.0))
    ]
    layer, params = init_layer(cfgs[0], x)
    a = layer.apply({"params": params}, x)
    b = MoE(cfgs[1]).apply({"params": params}, x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_one_expert_top_one_equals_the_dense_model():
    dense = ModelConfig(
        vocab_size=64, d_model=D, n_layers=2, max_seq_len=16, d_ff=F, attention=AttentionConfig(n_heads=2)
    )
    moe = dataclasses.replace(dense, ffn=FFNConfig(kind="moe", moe=MoEConfig(num_experts=1, top_k=1)))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 10), 0, 64)
    p_dense = nn.meta.unbox(Transformer(dense).init(jax.random.PRNGKey(0), tokens)["params"])
    p_moe = nn.meta.unbox(Transformer(moe).init(jax.random.PRNGKey(0), tokens)["params"])
    for i in range(2):
        mlp, e = p_dense[f"layer_{i}"]["mlp"], p_moe[f"layer_{i}"]["mlp"]
        e.update(w_in=mlp["fc_in"]["kernel"][None], b_in=mlp["fc_in"]["bias"][None],
                 w_out=mlp["fc_out"]["kernel"][None], b_out=mlp["fc_out"]["bias"][None])  # fmt: skip
        p_moe[f"layer_{i}"] = {**p_dense[f"layer_{i}"], "mlp": e}
    a = Transformer(dense).apply({"params": p_dense}, tokens)
    b = Transformer(moe).apply({"params": p_moe}, tokens)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_aux_and_z_loss_equal_hand_computed_values():
    """Router logits fixed by the input: x = one-hot rows, router = a known matrix."""
    cfg = moe_cfg(num_experts=4, top_k=1, aux_loss_weight=0.5, z_loss_weight=0.25)
    logits = np.array(
        [[2.0, 0.0, 0.0, 0.0], [1.5, 0.5, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 1.0, 0.0, 0.2]]
    )
    x = np.zeros((1, 4, D), np.float32)
    x[0, :, :4] = np.eye(4)
    layer, params = init_layer(cfg, jnp.asarray(x))
    router = np.zeros((D, 4), np.float32)
    router[:4] = logits  # x_n @ router = logits[n]
    params["router"] = jnp.asarray(router)
    _, state = layer.apply({"params": params}, jnp.asarray(x), mutable=["losses"])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    chosen = probs.argmax(1)  # experts 0, 0, 2, 1
    f = np.bincount(chosen, minlength=4) / 4  # [0.5, 0.25, 0.25, 0]
    aux = 4 * np.sum(f * probs.mean(0))
    z = np.mean(np.log(np.exp(logits).sum(1)) ** 2)
    got = {k: float(v[0]) for k, v in state["losses"].items()}
    assert got["moe_aux_loss"] == pytest.approx(0.5 * aux, rel=1e-5)
    assert got["moe_z_loss"] == pytest.approx(0.25 * z, rel=1e-5)


def test_bias_balancing_evens_a_skewed_router_and_gets_no_gradient():
    """A router that sends almost everything to expert 0: only the balancing bias moves, by
    rate * sign(mean load - load) per step, and the load spreads out."""
    cfg = moe_cfg(num_experts=4, top_k=1, bias_balancing_rate=0.05)
    x = jax.random.normal(jax.random.PRNGKey(4), (4, 16, D)) + 1.0  # inputs with a positive mean ...
    layer, params = init_layer(cfg, x)
    params["router"] = params["router"] / 40 + jnp.zeros((D, 4)).at[:, 0].set(0.1)  # ... favour expert 0
    from llm.model import channels

    def step(p):
        (y, state) = layer.apply({"params": p}, x, mutable=["metrics", "param_updates"])
        load = state["metrics"]["moe_load"][0]
        return channels.apply_param_updates(p, {"router_bias": state["param_updates"]["router_bias"]}), load

    p1, load0 = step(params)
    load0 = np.asarray(load0)
    assert load0[0] > 0.6  # skewed at the start
    np.testing.assert_allclose(p1["router_bias"], 0.05 * np.sign(load0.mean() - load0), rtol=1e-6)
    np.testing.assert_array_equal(p1["router"], params["router"])  # nothing else moved
    p, loads = p1, [load0]
    for _ in range(30):
        p, load = step(p)
        loads.append(np.asarray(load))
    assert max(loads[-1]) < load0[0] - 0.25  # the load spread out
    # No gradient reaches the bias (selection only), whatever the loss.
    g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(params)
    assert float(jnp.abs(g["router_bias"]).max()) == 0.0


def test_scanned_and_unrolled_moe_every_second_layer_agree():
    cfg = dataclasses.replace(moe_cfg(every=2), n_layers=4)
    assert [s.ffn for s in layout.layer_specs(cfg)] == ["moe", "dense", "moe", "dense"]
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 10), 0, 64)
    p = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
    scanned = dataclasses.replace(cfg, scan_layers=True)
    ps = layout.to_layout(p, scanned)
    assert set(ps["layers"]) == {"block_0", "block_1"}  # a (moe, dense) super-block scanned twice
    a, sa = Transformer(cfg).apply({"params": p}, tokens, mutable=["losses"])
    b, sb = Transformer(scanned).apply({"params": ps}, tokens, mutable=["losses"])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    from llm.model.channels import total_losses

    for name, v in total_losses(sa["losses"]).items():
        assert float(v) == pytest.approx(float(total_losses(sb["losses"])[name]), rel=1e-5)


def test_cached_decode_equals_the_full_forward():
    from llm.infer import engine

    cfg = dataclasses.replace(moe_cfg(router="topk_softmax"), vocab_size=64)
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 12), 0, 64)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    full = model.apply({"params": params}, tokens)
    cache = engine.init_cache(model, 2, 12)
    logits, cache = engine.prefill(model, params, tokens[:, :5], jnp.array([5, 5]), cache)
    np.testing.assert_allclose(logits, full[:, :5], rtol=1e-4, atol=1e-5)
    for t in range(5, 12):
        step_logits, cache = engine.decode_step(model, params, tokens[:, t], jnp.array([t, t]), cache)
        np.testing.assert_allclose(step_logits, full[:, t], rtol=1e-4, atol=1e-5)


# ---- expert parallelism on 8 fake devices --------------------------------------------------------

MOE_STEPS = 10
# (data, fsdp, expert, tensor)
EP_MESHES = [(1, 1, 8, 1), (2, 1, 4, 1), (1, 2, 2, 2)]
# Sharded matmuls, the all-to-all-style dispatch and all-reduces sum in another order than one
# device: ten Adam steps amplify last-bit differences (measured worst case below 2e-6 relative).
EP_RTOL = 1e-5


def _ep_experiment(mesh, impl, workdir):
    from llm.train import loop
    from tests.test_train import tiny_cfg

    keys = ("mesh.data", "mesh.fsdp", "mesh.expert", "mesh.tensor")
    cfg = tiny_cfg("llama", **{"model.ffn.kind": "moe", "model.ffn.moe.num_experts": 8, "model.ffn.moe.top_k": 2,
                               "model.ffn.moe.expert_d_ff": 32, "model.ffn.moe.impl": impl,
                               "model.ffn.moe.capacity_factor": 2.0 if impl == "dense" else None,
                               "train.steps": MOE_STEPS, "train.eval_every": 0, **dict(zip(keys, mesh))})  # fmt: skip
    exp = loop.build(cfg, workdir, devices=jax.devices()[: int(np.prod(mesh))])
    return exp, loop.compile_steps(exp)[0]


def _ep_losses(exp, train_fn, state, n):
    from llm.data import pipeline
    from llm.train import loop

    ds = pipeline.train_dataset(exp.train_windows, exp.cfg.train.batch_size, exp.cfg.data.seed)
    losses = []
    for i in range(n):
        state, m = train_fn(state, loop.to_global(exp, ds[i]))
        losses.append(float(m["loss"]))
    return state, losses


@pytest.mark.parametrize("impl", ["dropless", "dense"])
def test_expert_parallel_meshes_train_like_one_device(impl, tmp_path):
    wd = str(tmp_path / "w")
    ref_exp, ref_fn = _ep_experiment((1, 1, 1, 1), impl, wd)
    init = jax.device_get(ref_exp.trainer.init_state())
    _, want = _ep_losses(ref_exp, ref_fn, jax.device_put(init, ref_exp.state_shardings), MOE_STEPS)
    assert want[-1] < want[0] - 0.3
    for mesh in EP_MESHES:
        exp, fn = _ep_experiment(mesh, impl, wd)
        w_in = jax.device_put(init, exp.state_shardings).params["layer_0"]["mlp"]["w_in"]
        assert (
            len({tuple((s.start, s.stop) for s in sh.index) for sh in w_in.addressable_shards})
            == mesh[2] * mesh[1] * mesh[3]
        )
        assert {sh.data.shape[0] for sh in w_in.addressable_shards} == {
            8 // mesh[2]
        }  # experts split over `expert`
        _, got = _ep_losses(exp, fn, jax.device_put(init, exp.state_shardings), MOE_STEPS)
        np.testing.assert_allclose(got, want, rtol=EP_RTOL, err_msg=f"mesh {mesh}")


def test_moe_checkpoint_restores_across_expert_meshes(tmp_path):
    from llm.checkpoint import Checkpointer

    wd = str(tmp_path / "w")
    exp_a, fn_a = _ep_experiment((1, 1, 8, 1), "dropless", wd)
    state, _ = _ep_losses(exp_a, fn_a, exp_a.trainer.init_state(), 3)
    ck = Checkpointer(str(tmp_path / "ck"), async_save=False)
    ck.save(3, state, None, exp_a.cfg.to_json())
    saved = jax.device_get(state.params)
    exp_b, _ = _ep_experiment((1, 2, 2, 2), "dropless", wd)
    restored, _ = ck.restore(3, exp_b.trainer.restore_target())
    ck.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), saved)
    w = restored.params["layer_1"]["mlp"]["w_out"]
    assert w.sharding.is_equivalent_to(exp_b.state_shardings.params["layer_1"]["mlp"]["w_out"], w.ndim)
