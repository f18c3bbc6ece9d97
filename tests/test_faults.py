"""Fault injection: every failure a run can meet gets a test of what happens and what it says."""

import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llm
from llm.checkpoint import Checkpointer, CheckpointMismatch
from llm.config import ConfigError
from llm.data import pipeline
from llm.train import loop
from llm.train import state as state_lib
from llm.train.metrics import read_metrics
from llm.train.workdir_lock import WorkdirLock
from tests.test_train import tiny_cfg

pytestmark = pytest.mark.faults


def run_cfg(**kw):
    base = {"train.steps": 12, "checkpoint.every": 4, "train.log_every": 1, "train.eval_every": 0}
    base.update(kw)
    return tiny_cfg(**base)


def test_second_run_on_same_workdir_refuses(tmp_path, repo_root):
    wd = tmp_path / "w"
    with WorkdirLock(str(wd)):
        r = subprocess.run(
            [sys.executable, "-m", "llm.train", "--config=configs/tiny.py", f"--workdir={wd}"],
            cwd=repo_root, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert r.returncode == 2
    assert f"another run (pid {os.getpid()}) is using {wd}" in r.stderr
    assert not (wd / "checkpoints").exists()


def test_corrupted_latest_checkpoint_falls_back(tmp_path, caplog):
    wd = str(tmp_path / "w")
    cfg = run_cfg()
    loop.train(cfg, wd)  # checkpoints at 4, 8, 12 (keep 3)
    ck = os.path.join(wd, "checkpoints")
    assert sorted(os.listdir(ck))[-3:] == ["12", "4", "8"] or {"4", "8", "12"} <= set(os.listdir(ck))
    # Damage step 12: remove the array data of its parameters item.
    state_dir = os.path.join(ck, "12", "params")
    for name in os.listdir(state_dir):
        p = os.path.join(state_dir, name)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    # A half-written step (no commit marker) must never count as a checkpoint.
    os.makedirs(os.path.join(ck, "16", "state"))
    c = Checkpointer(ck)
    assert 16 not in c.steps()
    c.close()
    caplog.set_level("ERROR")
    run = llm.load(wd, step=8)
    assert run.step == 8
    more = run_cfg(**{"train.steps": 14, "train.allow_schedule_change": True})
    loop.train(more, wd)  # resumes from 8 (12 is damaged), reaches 14
    assert "checkpoint" in caplog.text and "/12" in caplog.text
    steps = [m["step"] for m in read_metrics(wd) if "loss" in m]
    assert steps[-6:] == [9, 10, 11, 12, 13, 14]


def test_nan_policy_stop_keeps_last_good_state(tmp_path, monkeypatch):
    real = loop.train_step

    def poisoned(state, batch, **kw):
        # From step 6 on, the batch's loss is NaN (as a bad shard or an overflow would make it).
        bad = state.step >= 6
        batch = dict(batch, loss_mask=jnp.where(bad, batch["loss_mask"] * jnp.nan, batch["loss_mask"]))
        return real(state, batch, **kw)

    monkeypatch.setattr(loop, "train_step", poisoned)
    wd = str(tmp_path / "nan")
    with pytest.raises(SystemExit) as e:
        loop.train(run_cfg(**{"train.nan_policy": "stop", "checkpoint.every": 0}), wd)
    assert e.value.code == loop.EXIT_NONFINITE
    run = llm.load(wd)
    assert run.step == 7  # stopped at the first logged non-finite step, its update not applied
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(run.params))


def test_nan_policy_skip_counts_and_continues(tmp_path, monkeypatch):
    real = loop.train_step

    def poisoned(state, batch, **kw):
        bad = state.step == 3
        batch = dict(batch, loss_mask=jnp.where(bad, batch["loss_mask"] * jnp.nan, batch["loss_mask"]))
        return real(state, batch, **kw)

    monkeypatch.setattr(loop, "train_step", poisoned)
    wd = str(tmp_path / "skip")
    loop.train(run_cfg(**{"train.nan_policy": "skip"}), wd)
    rows = [m for m in read_metrics(wd) if "loss" in m]
    assert [m["nonfinite"] for m in rows][:5] == [0, 0, 0, 1, 0]
    assert rows[-1]["skipped_total"] == 1 and np.isfinite(rows[-1]["loss"])


def test_failed_checkpoint_write_stops_and_keeps_earlier(tmp_path, monkeypatch, capsys):
    real_save = Checkpointer.save

    def flaky(self, step, *a, **kw):
        if step >= 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *a, **kw)

    monkeypatch.setattr(Checkpointer, "save", flaky)
    wd = str(tmp_path / "disk")
    with pytest.raises(SystemExit) as e:
        loop.train(run_cfg(), wd)
    assert e.value.code == loop.EXIT_CHECKPOINT_FAILED
    out = capsys.readouterr().out
    assert "writing the checkpoint for step 8" in out and "No space left" in out and "[4]" in out
    assert llm.load(wd).step == 4


def test_checkpoint_from_another_model_is_refused(tmp_path):
    wd = str(tmp_path / "m")
    loop.train(run_cfg(**{"train.steps": 4}), wd)
    with pytest.raises(ConfigError, match=r"different model: model.n_layers=2 \(now 3\)"):
        loop.train(run_cfg(**{"train.steps": 8, "model.n_layers": 3}), wd)


def test_tokenizer_kind_mismatch_is_refused(tmp_path):
    wd = str(tmp_path / "t")
    loop.train(run_cfg(**{"train.steps": 2}), wd)
    with pytest.raises(ConfigError, match="holds a sentencepiece tokenizer but data.tokenizer.kind=byte"):
        loop.train(run_cfg(**{"train.steps": 4, "data.tokenizer.kind": "byte"}), wd)


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
    with pytest.raises(ConfigError, match=r"not divisible by the data-parallel size 8"):
        loop.train(run_cfg(**{"train.batch_size": 12}), str(tmp_path / "b"))


def test_corpus_smaller_than_a_batch(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("just a few words\n" * 30)
    with pytest.raises(ValueError, match="fewer than one batch"):
        loop.train(run_cfg(**{"data.corpus": str(small), "data.tokenizer.kind": "byte"}), str(tmp_path / "c"))


@pytest.mark.slow
def test_kill9_at_random_moments_resumes_exactly(repo_root):
    """One run of the soak script (tests/kill9_soak.py; the README reports the 20-run figure)."""
    r = subprocess.run([sys.executable, "tests/kill9_soak.py", "--runs=1", "--seed=3"], cwd=repo_root,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["all_equal_to_uninterrupted"] and summary["total_kills"] >= 1
    assert summary["all_restarts_from_newest_committed"] and summary["restarts_checked"] >= 1


def _spike_setup(tmp_path, window=4):
    """A built tiny experiment with the loss-spike monitor on, its jitted step and one batch."""
    cfg = run_cfg(**{"train.spike_window": window, "train.spike_sigmas": 3.0})
    exp = loop.build(cfg, str(tmp_path))
    state = state_lib.create_state(exp.model, exp.tx, cfg.data.seq_len, exp.mesh, exp.rules, 0, window)
    train_fn, _ = loop.compile_steps(exp)
    ds = pipeline.train_dataset(exp.train_windows, cfg.train.batch_size, cfg.data.seed)
    return exp, state, train_fn, loop.to_global(exp, ds[0])


def _with_window(state, losses):
    monitor = dict(state.monitor, losses=jnp.asarray(losses, jnp.float32), count=jnp.int32(len(losses)))
    return state.replace(monitor=jax.device_put(monitor, jax.tree.map(lambda x: x.sharding, state.monitor)))


def test_loss_spike_is_skipped_and_moments_do_not_move(tmp_path):
    exp, state, train_fn, batch = _spike_setup(tmp_path)
    # A freshly initialised model scores ~ln(vocab) nats; a window of losses near 1.0 makes it a spike.
    state = _with_window(state, [1.0, 1.02, 0.98, 1.0])
    before = jax.device_get(state)
    after, metrics = train_fn(state, batch)
    after = jax.device_get(after)
    assert float(metrics["loss"]) > 3.0 and int(metrics["loss_spike"]) == 1 and int(metrics["nonfinite"]) == 0
    for name in ("params", "opt_state"):  # Adam's mu/nu/count untouched, not just the params
        for a, b in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name))):
            np.testing.assert_array_equal(a, b)
    assert int(after.step) == 1 and int(after.skipped) == 1 and int(after.monitor["spikes"]) == 1
    np.testing.assert_array_equal(after.monitor["losses"], before.monitor["losses"])  # spikes stay out
    assert int(after.monitor["count"]) == 4


def test_loss_within_the_window_is_applied_and_recorded(tmp_path):
    exp, state, train_fn, batch = _spike_setup(tmp_path)
    probe = jax.tree.map(lambda x: x.copy(), state)  # the step donates its input
    loss0 = float(train_fn(probe, batch)[1]["loss"])  # this batch's loss at init (window not full)
    state = _with_window(state, [loss0 + d for d in (0.1, -0.1, 0.05, -0.05)])
    before = jax.device_get(state)
    after, metrics = jax.device_get(train_fn(state, batch))
    assert int(metrics["loss_spike"]) == 0 and int(after.skipped) == 0
    # threshold = mean + 3 * std of the window, checked against numpy
    window = before.monitor["losses"]
    np.testing.assert_allclose(metrics["spike_threshold"], window.mean() + 3 * window.std(), rtol=1e-5)
    # Applied: Adam's moments moved (the params not yet: warmup's learning rate at step 0 is 0).
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(before.opt_state), jax.tree.leaves(after.opt_state))
    ]
    assert sum(moved) > len(moved) // 2
    assert int(after.monitor["count"]) == 5
    np.testing.assert_allclose(after.monitor["losses"][0], metrics["loss"])  # ring slot 4 % 4 = 0


def test_spike_monitor_resumes_exactly(tmp_path):
    flags = {"train.spike_window": 3, "train.spike_sigmas": 4.0, "train.steps": 10}
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    loop.train(run_cfg(**flags), full)
    loop.train(run_cfg(**flags), part, stop_at=5)
    loop.train(run_cfg(**flags), part)
    rows = {m["step"]: m for m in read_metrics(full) if "loss" in m}
    assert [m["loss"] for m in read_metrics(part) if "loss" in m][-5:] == [
        rows[s]["loss"] for s in range(6, 11)
    ]
    assert "spikes_total" in rows[10] and "spike_threshold" in rows[10]
    assert llm.load(part).config.train.spike_window == 3


def test_checkpoint_with_another_train_state_is_refused_not_quarantined(tmp_path):
    wd = str(tmp_path / "s")
    loop.train(run_cfg(**{"train.steps": 4}), wd)
    with pytest.raises(CheckpointMismatch) as e:  # the spike monitor adds leaves to the state
        loop.train(
            run_cfg(**{"train.steps": 8, "train.spike_window": 4, "train.allow_schedule_change": True}), wd
        )
    assert "missing in the checkpoint: monitor.count" in str(e.value) and "config.json" in str(e.value)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4"]  # nothing renamed or deleted
    loop.train(
        run_cfg(**{"train.steps": 8, "train.allow_schedule_change": True}), wd
    )  # still resumes (no spike window)
    assert llm.load(wd).step == 8


@pytest.mark.parametrize("window, sigmas, msg", [(1, 6.0, "spike_window=1"), (-2, 6.0, "spike_window=-2"),
                                                 (8, 0.0, "spike_sigmas=0.0")])  # fmt: skip
def test_bad_spike_flags_are_rejected(window, sigmas, msg):
    with pytest.raises(ConfigError, match=msg):
        run_cfg(**{"train.spike_window": window, "train.spike_sigmas": sigmas})


def test_checkpoints_with_or_without_an_empty_state_field_restore(tmp_path):
    """Checkpoints written before the train state had `monitor` (no such key on disk) and ones
    written with it empty both restore; an empty field is not saved at all. (Step 5 is written in
    the single-item layout of the earlier checkpoints, with the field saved empty.)"""
    import orbax.checkpoint as ocp
    from etils import epath

    wd = str(tmp_path / "w")
    loop.train(run_cfg(**{"train.steps": 4}), wd)
    ck = os.path.join(wd, "checkpoints")
    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(os.path.join(ck, "4", "train")))
    assert "monitor" not in meta.tree and "step" in meta.tree  # the pre-monitor layout
    run = llm.load(wd)
    # The layout of a checkpoint saved with the empty field present, as step 5:
    c = Checkpointer(ck, async_save=False)
    state, _ = c.restore(4, _abstract_state(wd))
    tree = {f: getattr(state, f) for f in ("step", "params", "opt_state", "rng", "skipped")} | {"monitor": {}}
    c.mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), config=ocp.args.JsonSave(
        json.loads(open(os.path.join(wd, "config.json")).read()))), force=True)  # fmt: skip
    c.close()
    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(os.path.join(ck, "5", "state")))
    assert meta.tree["monitor"] == {}
    again = llm.load(wd, step=5)
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(a, b)


def _abstract_state(wd):
    """The abstract train state (with shardings) of the run in `wd`."""
    exp = loop.build(run_cfg(**{"train.steps": 4}), wd)
    return state_lib.sharded_target(exp.abstract_state, exp.state_shardings)
