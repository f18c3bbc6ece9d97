"""Checkpoints written before the checkpoint layout and optimizer changed (commit e9a0ace, fixture
in tests/data/legacy_run_e9a0ace) still load, resume with the losses that commit computed, and
initialise new runs; params-only restore and `train.init_from` on today's checkpoints too."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import llm
from llm.checkpoint import Checkpointer
from llm.config import ConfigError, from_json
from llm.train import loop
from llm.train.metrics import read_metrics
from tests.test_train import tiny_cfg

LEGACY = os.path.join(os.path.dirname(__file__), "data", "legacy_run_e9a0ace")


@pytest.fixture
def legacy_run(tmp_path):
    """A writable copy of the fixture (a run resumes in place)."""
    wd = tmp_path / "legacy"
    shutil.copytree(LEGACY, wd)
    return str(wd)


def legacy_params_on_disk() -> dict:
    """The parameters as stored, read by orbax without any target: an independent reading."""
    raw = ocp.StandardCheckpointer().restore(os.path.join(LEGACY, "checkpoints", "4", "state"))
    return raw["params"]


def legacy_cfg():
    with open(os.path.join(LEGACY, "config.json")) as f:
        return from_json(f.read())


def test_load_reads_the_parameters_of_a_legacy_checkpoint(legacy_run):
    run = llm.load(legacy_run)
    assert run.step == 4 and run.config.model.d_model == 32
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params), legacy_params_on_disk())
    assert Checkpointer(os.path.join(legacy_run, "checkpoints")).is_legacy(4)
    text = run.generate("The", max_new_tokens=5, temperature=0)
    assert text.startswith("The") or len(text) > 0


def test_resume_from_a_legacy_checkpoint_continues_as_that_commit_did(legacy_run):
    """Optimizer state of the earlier layout (one AdamW per group) converted on restore: the
    losses of steps 5-8 equal those commit e9a0ace logged when it resumed the same checkpoint."""
    with open(os.path.join(LEGACY, "expected_resume.json")) as f:
        expected = {int(k): v for k, v in json.load(f)["losses_after_resume"].items()}
    loop.train(legacy_cfg(), legacy_run)
    got = {m["step"]: m["loss"] for m in read_metrics(legacy_run) if "loss" in m}
    # Bitwise equal on the AVX-512 host that wrote the fixture (seen); XLA:CPU picks other kernels
    # on other ISAs, whose last bits may differ over four steps: 1e-5 relative allows for that.
    np.testing.assert_allclose([got[s] for s in range(5, 9)], [expected[s] for s in range(5, 9)], rtol=1e-5)
    # The new checkpoint at step 8 is in today's layout and loads.
    ck = Checkpointer(os.path.join(legacy_run, "checkpoints"))
    assert 8 in ck.steps() and not ck.is_legacy(8)
    assert llm.load(legacy_run).step == 8


def test_init_from_a_legacy_run_starts_from_its_parameters(tmp_path):
    cfg = from_json(legacy_cfg().to_json().replace('"init_from": null', f'"init_from": "{LEGACY}:4"'))
    wd = str(tmp_path / "ft")
    state_params = _initial_params(cfg, wd)
    jax.tree.map(np.testing.assert_array_equal, state_params, legacy_params_on_disk())
    # its tokenizer came along (a run started from weights reads text as they were trained)
    assert (
        open(os.path.join(wd, "tokenizer.model"), "rb").read()
        == open(os.path.join(LEGACY, "tokenizer.model"), "rb").read()
    )
    meta = lambda d: json.load(open(os.path.join(d, "tokenizer.json")))  # noqa: E731 (today's meta adds `special`)
    assert {k: meta(wd)[k] for k in ("kind", "vocab_size")} == meta(LEGACY)


def _initial_params(cfg, wd):
    """The parameters a run starts from: train it for 0 steps and read the step-0 checkpoint."""
    import dataclasses

    loop.train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=0)), wd)
    return jax.device_get(llm.load(wd, step=0).params)


def test_init_from_a_run_with_another_shape_names_the_parameters(tmp_path):
    cfg = tiny_cfg(**{"train.init_from": LEGACY, "train.steps": 0})  # d_model 64 vs the fixture's 32
    with pytest.raises(ConfigError) as e:
        loop.train(cfg, str(tmp_path / "x"))
    msg = str(e.value)
    assert f"train.init_from={LEGACY}: its parameters do not fit this model" in msg
    assert "params.embed.embedding: saved (320, 32) float32, now (320, 64) float32" in msg


def test_init_from_todays_checkpoint_at_a_step_with_a_fresh_optimizer(tmp_path):
    src = str(tmp_path / "src")
    loop.train(tiny_cfg(**{"train.steps": 6, "checkpoint.every": 3, "train.eval_every": 0}), src)
    at3 = jax.device_get(llm.load(src, step=3).params)
    wd = str(tmp_path / "ft")
    cfg = tiny_cfg(
        **{"train.init_from": f"{src}:3", "train.steps": 2, "train.log_every": 1, "train.eval_every": 0}
    )
    jax.tree.map(np.testing.assert_array_equal, _initial_params(cfg, wd + "0"), at3)
    loop.train(cfg, wd)
    rows = [m for m in read_metrics(wd) if "loss" in m]
    assert [m["step"] for m in rows] == [1, 2]
    # A fresh optimizer: warmup starts again at learning rate 0 for the first step.
    assert rows[0]["learning_rate"] == 0.0
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 5; available: \\[3, 6\\]"):
        loop.train(tiny_cfg(**{"train.init_from": f"{src}:5"}), str(tmp_path / "bad"))
