"""Scale-out on 8 fake CPU devices: every mesh trains like one device, and checkpoints reshard.

The same tiny run (GPT-2 and Llama style) is trained for ten steps on meshes data x fsdp x tensor
and compared with a one-device run; parameters must really be split, not just replicated.
A checkpoint saved on one mesh restores on another (and on one device) and training goes on.
"""

import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.checkpoint import Checkpointer
from llm.config import ConfigError
from llm.data import pipeline
from llm.train import loop
from llm.train import state as state_lib
from llm.train import step as step_lib
from tests.test_train import tiny_cfg

STEPS = 10
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]
# fp32 throughout; sharded matmuls and all-reduces sum in another order than one device does, and
# ten Adam steps amplify those last-bit differences a little. Measured worst case 3.6e-7 relative.
RTOL = 1e-5


def mesh_overrides(mesh: tuple[int, int, int], arch: str | None = None) -> dict:
    """Mesh sizes, and rules that replicate the head dimensions tensor parallelism cannot split
    (the tiny models have 4 query and 2 (llama) or 4 kv heads; a rule that does not divide is an
    error, so a user asks for replication explicitly, as here)."""
    out = dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), mesh))
    heads, kv_heads = 4, 2 if arch == "llama" else 4
    if mesh[2] > heads:
        out.update({"mesh.rules.heads": "", "mesh.rules.act_heads": ""})
    if mesh[2] > kv_heads:
        out.update({"mesh.rules.kv_heads": "", "mesh.rules.act_kv_heads": ""})
    return out


# One workdir per architecture, so its tokenizer is trained once and shared by every mesh; removed
# when the test process exits.
_WORKDIRS = tempfile.TemporaryDirectory(prefix="test-sharding-")


def workdir_for(arch: str | None) -> str:
    return os.path.join(_WORKDIRS.name, str(arch))


@functools.cache
def experiment(arch: str, mesh: tuple[int, int, int]):
    """(Experiment, jitted train step) on the first data*fsdp*tensor devices, built once per session."""
    cfg = tiny_cfg(arch, **{"train.steps": STEPS, "train.eval_every": 0, **mesh_overrides(mesh, arch)})
    os.makedirs(workdir_for(arch), exist_ok=True)
    exp = loop.build(cfg, workdir_for(arch), devices=jax.devices()[: int(np.prod(mesh))])
    train_fn, _ = loop.compile_steps(exp)
    return exp, train_fn


def data_iterator(exp):
    ds = pipeline.train_dataset(
        exp.train_windows,
        exp.cfg.train.batch_size,
        exp.cfg.data.seed,
        shift_windows=exp.cfg.data.shift_windows,
    )
    return pipeline.train_iterator(ds, threads=0)


def train_steps(exp, train_fn, state, data_it, n: int):
    """Run n steps; returns (state, losses as Python floats)."""
    losses = []
    for _ in range(n):
        state, metrics = train_fn(state, loop.to_global(exp, next(data_it)))
        losses.append(float(metrics["loss"]))
    return state, losses


def create_state(exp):
    c = exp.cfg
    return state_lib.create_state(exp.model, exp.tx, c.data.seq_len, exp.mesh, exp.rules, c.train.seed)


@functools.cache
def initial_state_host(arch: str):
    """The initial state as host arrays, from a one-device init."""
    return jax.device_get(create_state(experiment(arch, (1, 1, 1))[0]))


def fresh_state(exp, arch: str):
    """The initial state placed on exp's mesh: device_put costs no compile, unlike a jitted init per
    mesh (~4 s each on 2 cores); test_born_sharded_init_matches checks both give the same state."""
    return jax.device_put(initial_state_host(arch), exp.state_shardings)


@functools.cache
def reference_losses(arch: str) -> tuple[float, ...]:
    """Ten losses of the same run on a single device (mesh 1x1x1)."""
    exp, train_fn = experiment(arch, (1, 1, 1))
    _, losses = train_steps(exp, train_fn, fresh_state(exp, arch), data_iterator(exp), STEPS)
    return tuple(losses)


def mlp_path(arch: str | None) -> tuple[str, ...]:
    return ("layer_0", "mlp", "fc_in" if arch is None else "gate", "kernel")


def mlp_kernel(params, arch: str | None):
    for key in mlp_path(arch):
        params = params[key]
    return params


def dict_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def n_distinct_shards(x: jax.Array) -> int:
    return len({tuple((s.start, s.stop) for s in shard.index) for shard in x.addressable_shards})


@pytest.mark.parametrize("arch", [None, "llama"], ids=["gpt2", "llama"])
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_mesh_matches_single_device(arch, mesh):
    exp, train_fn = experiment(arch, mesh)
    assert dict(exp.mesh.shape) == {**dict(zip(("data", "fsdp", "tensor"), mesh)), "expert": 1}
    state = fresh_state(exp, arch)

    # The MLP input kernel [embed, mlp] is split fsdp-ways over D and tensor-ways over F (64 and
    # the FFN width divide by every size here), and its Adam moment is split the same way.
    _, fsdp, tensor = mesh
    kernel_DF = mlp_kernel(state.params, arch)
    d, f = kernel_DF.shape
    assert n_distinct_shards(kernel_DF) == fsdp * tensor
    assert {s.data.shape for s in kernel_DF.addressable_shards} == {(d // fsdp, f // tensor)}
    moments = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
               if dict_keys(path)[-4:] == mlp_path(arch)]  # fmt: skip
    assert len(moments) == 2  # Adam's mu and nu
    assert all(m.sharding.is_equivalent_to(kernel_DF.sharding, 2) for m in moments)
    # Embedding table [vocab, embed]: vocab over tensor, embed over fsdp.
    emb_VD = state.params["embed"]["embedding"]
    assert n_distinct_shards(emb_VD) == fsdp * tensor
    # The batch is split over every data-parallel device.
    batch = loop.to_global(exp, next(data_iterator(exp)))
    assert n_distinct_shards(batch["tokens"]) == mesh[0] * mesh[1]

    _, losses = train_steps(exp, train_fn, state, data_iterator(exp), STEPS)
    ref = reference_losses(arch)
    np.testing.assert_allclose(losses, ref, rtol=RTOL)
    assert losses[-1] < losses[0] - 0.3  # it is really training, not comparing two constants


def test_checkpoint_reshards_across_meshes(tmp_path):
    """Save on 2x4x1; restore on 1x2x4 and on one device: same params, same continued losses."""
    arch, half = None, STEPS // 2
    exp_a, train_a = experiment(arch, (2, 4, 1))
    data_a = data_iterator(exp_a)
    state, _ = train_steps(exp_a, train_a, fresh_state(exp_a, arch), data_a, half)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=1, async_save=True)
    ckpt.save(half, state, data_a, exp_a.cfg.to_json())
    ckpt.wait()  # the state is donated by the next step: the async copy must be done first
    saved = jax.device_get(state.params)
    _, uninterrupted = train_steps(exp_a, train_a, state, data_a, STEPS - half)

    for mesh in [(1, 2, 4), (1, 1, 1)]:
        exp_b, train_b = experiment(arch, mesh)
        target = state_lib.sharded_target(exp_b.abstract_state, exp_b.state_shardings)
        data_b = data_iterator(exp_b)
        restored, cfg = ckpt.restore(half, target, data_b)
        assert cfg["mesh"]["fsdp"] == 4  # the config saved with the checkpoint is the writer's
        assert int(restored.step) == half
        # Restored arrays carry the new mesh's shardings (really resharded, not copied as saved).
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(exp_b.state_shardings)):
            assert got.sharding.is_equivalent_to(want, got.ndim)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), saved)
        _, resumed = train_steps(exp_b, train_b, restored, data_b, STEPS - half)
        np.testing.assert_allclose(resumed, uninterrupted, rtol=RTOL, err_msg=f"mesh {mesh}")
    ckpt.close()


def test_born_sharded_init_matches():
    """Initialising straight into the 2x2x2 shardings gives the one-device values, already split."""
    exp, _ = experiment("llama", (2, 2, 2))
    state = create_state(exp)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(exp.state_shardings)):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    assert n_distinct_shards(mlp_kernel(state.params, "llama")) == 4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), initial_state_host("llama"))


def test_a_rule_that_does_not_divide_a_parameter_is_an_error_naming_it(tmp_path):
    """fsdp=3 does not divide d_model 64: not silently replicated (3x the memory) but refused."""
    cfg = tiny_cfg(**{"mesh.data": 1, "mesh.fsdp": 3, "train.batch_size": 9})
    with pytest.raises(ConfigError) as e:
        loop.build(cfg, str(tmp_path), devices=jax.devices()[:3])
    msg = str(e.value)
    assert msg.startswith("parameter embed/embedding (320, 64): its 'embed' dimension (64) is not divisible by "
                          "mesh axis 'fsdp' (size 3)"), msg  # fmt: skip
    assert "--config.mesh.rules.embed=''" in msg
    # MQA's single kv head has nothing to split: tensor parallelism leaves it whole, no error.
    cfg = tiny_cfg("llama", **{"mesh.data": 1, "mesh.tensor": 2, "model.attention.n_kv_heads": 1})
    exp = loop.build(cfg, str(tmp_path / "mqa"), devices=jax.devices()[:2])
    key_spec = exp.state_shardings.params["layer_0"]["attn"]["key"]["kernel"].spec
    assert tuple(key_spec) in ((None, None, None), (None,), ())  # replicated


def test_every_device_sums_the_loss_normaliser_before_its_forward_pass():
    """The normaliser's all-reduce is tied to the batch (an optimization barrier), so no device runs
    ahead into its forward pass while the other blocks a shared pool thread in that all-reduce
    (benchmarks/README.md, fifth pass: ~200 ms of an idle core in 1 of 4 default-model steps)."""
    exp, _ = experiment("llama", (2, 1, 1))
    batch = loop.to_global(exp, next(data_iterator(exp)))
    fn = functools.partial(step_lib.train_step, model=exp.model, tx=exp.tx, schedule=exp.schedule)
    jaxpr = jax.make_jaxpr(fn)(fresh_state(exp, "llama"), batch).jaxpr
    batch_vars = dict(zip(jaxpr.invars[-len(batch) :], sorted(batch)))  # dict leaves: sorted keys
    users = {name: [e for e in jaxpr.eqns if var in e.invars] for var, name in batch_vars.items()}
    barrier = [e for e in users["tokens"] if e.primitive.name == "optimization_barrier"]
    assert [e.primitive.name for e in users["tokens"]] == ["optimization_barrier"], users["tokens"]
    # ... together with the summed normaliser (an f32 scalar) and every other batch field
    scalars = [v for v in barrier[0].invars if v.aval.shape == () and v.aval.dtype == jnp.float32]
    assert len(scalars) == 1 and set(batch_vars) <= set(barrier[0].invars)
