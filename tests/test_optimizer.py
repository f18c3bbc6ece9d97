"""Optimizer parameter groups as rules (llm/train/optimizer.py): the built-in rules reproduce the
earlier fixed grouping exactly, frozen parameters get no update and no Adam moments, multipliers
and decay settings act per parameter, and bad rules are refused with the syntax."""

import dataclasses
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm.config import ConfigError, OptimConfig
from llm.model import ModelConfig, Transformer
from llm.sharding import path_str
from llm.train import optimizer as opt
from llm.train.legacy import _group, legacy_optimizer


def params_of(**kw):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, max_seq_len=16, **kw)
    return nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])


def paths(params):
    return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


@pytest.mark.parametrize("flags", [{}, {"decay_embeddings": True}, {"decay_norms_and_biases": True}])
@pytest.mark.parametrize("arch", [{}, {"positional": "rope", "norm": "rmsnorm", "mlp": "swiglu", "use_bias": False,
                                       "tie_embeddings": False}], ids=["gpt2", "llama"])  # fmt: skip
def test_builtin_rules_reproduce_the_earlier_grouping(flags, arch):
    cfg = OptimConfig(**flags)
    params = params_of(**arch)
    rule_list = opt.rules(cfg)
    decays_by_group = {
        "matrix": True,
        "embedding": cfg.decay_embeddings,
        "norm_or_bias": cfg.decay_norms_and_biases,
    }
    for p in paths(params):
        s = opt.settings_for(p, rule_list)
        assert s.decay == decays_by_group[_group(p)], p
        assert s.lr_mult == 1.0 and s.frozen is False


def _run(tx, params, grads_seq):
    state = tx.init(params)
    for g in grads_seq:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _grads(params, n=4, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return [jax.tree.map(lambda x, k=k: jax.random.normal(k, x.shape, x.dtype), params) for k in keys]


def test_default_optimizer_updates_bitwise_like_the_earlier_multi_transform():
    cfg = OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1)
    params = params_of()
    tx, schedule = opt.make_optimizer(cfg, total_steps=10)
    new, _ = _run(tx, params, _grads(params))
    old, _ = _run(legacy_optimizer(cfg, schedule), params, _grads(params))
    jax.tree.map(np.testing.assert_array_equal, new, old)
    assert not np.array_equal(
        new["layer_0"]["mlp"]["fc_in"]["kernel"], params["layer_0"]["mlp"]["fc_in"]["kernel"]
    )


def test_frozen_parameters_get_no_update_and_no_moments():
    cfg = OptimConfig(lr=1e-2, warmup_steps=1, groups=("^(embed|layer_0)/: frozen",))
    params = params_of()
    tx, _ = opt.make_optimizer(cfg, total_steps=10)
    new, state = _run(tx, params, _grads(params))
    frozen = [p for p in paths(params) if p.startswith(("embed/", "layer_0/"))]
    assert frozen and len(frozen) < len(paths(params))
    by_path = dict(zip(paths(params), jax.tree.leaves(params)))
    for p, x in zip(paths(new), jax.tree.leaves(new)):
        if p in frozen:
            np.testing.assert_array_equal(x, by_path[p])
        else:
            assert not np.array_equal(x, by_path[p]), p
    # Adam's moments exist for the trainable parameters only.
    mus = optax.tree_utils.tree_get_all_with_path(state, "mu")
    assert len(mus) == 1
    mu_paths = paths(mus[0][1])
    assert sorted(mu_paths) == sorted(set(paths(params)) - set(frozen))


def test_lr_mult_and_decay_act_per_parameter():
    base = OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.5, clip_norm=0.0)
    rules = dataclasses.replace(base, groups=("layer_1/mlp/fc_in/kernel: lr_mult=10",
                                              "layer_1/mlp/fc_out/kernel: decay=false"))  # fmt: skip
    params = params_of()
    g = _grads(params, n=1)
    step = lambda cfg: _run(opt.make_optimizer(cfg, 10)[0], params, g)[0]  # noqa: E731
    a, b = step(base), step(rules)
    delta = lambda t, *ks: np.asarray(
        t["layer_1"]["mlp"][ks[0]]["kernel"] - params["layer_1"]["mlp"][ks[0]]["kernel"]
    )  # noqa: E731
    np.testing.assert_allclose(delta(b, "fc_in"), 10 * delta(a, "fc_in"), rtol=1e-5, atol=1e-8)
    # fc_out without decay: the difference is exactly lr * wd * param (decoupled AdamW decay).
    lr = float(opt.make_schedule(base, 10)(0))
    want = lr * 0.5 * np.asarray(params["layer_1"]["mlp"]["fc_out"]["kernel"])
    np.testing.assert_allclose(delta(b, "fc_out") - delta(a, "fc_out"), want, rtol=1e-4, atol=1e-9)
    # Everything no rule names is updated exactly as without rules.
    np.testing.assert_array_equal(
        a["layer_0"]["attn"]["query"]["kernel"], b["layer_0"]["attn"]["query"]["kernel"]
    )


def test_changing_multipliers_or_decay_keeps_the_optimizer_state_tree():
    params = params_of()
    trees = [jax.tree.structure(opt.make_optimizer(OptimConfig(groups=g), 10)[0].init(params))
             for g in [(), ("attn: decay=false",)]]  # fmt: skip
    assert trees[0] == trees[1]


@pytest.mark.parametrize("rule,msg", [
    ("no colon", "write '<regex>: lr_mult=<x> decay=<true|false> frozen'"),
    ("attn: lr=3", "unknown setting 'lr'; valid: lr_mult, decay, frozen"),
    ("attn: lr_mult=fast", "lr_mult needs a number"),
    ("attn: decay=maybe", "decay is true or false"),
    ("(: frozen", "bad regex"),
    ("attn:", "sets nothing"),
])  # fmt: skip
def test_bad_rules_are_refused_with_the_syntax(rule, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        OptimConfig(groups=(rule,))


def test_groups_flag_through_the_real_cli(repo_root, tmp_path):
    r = subprocess.run([sys.executable, "-m", "llm.train", "--config=configs/tiny.py", f"--workdir={tmp_path}/w",
                        "--print_config", "--config.optim.groups=('^embed/: frozen', 'attn: lr_mult=2 decay=false')"],
                       cwd=repo_root, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["optim"]["groups"] == ["^embed/: frozen", "attn: lr_mult=2 decay=false"]
