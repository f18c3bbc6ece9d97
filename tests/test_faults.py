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
from llm.checkpoint import Checkpointer
from llm.config import ConfigError
from llm.train import loop
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
    # Damage step 12: remove the array data of the state item.
    state_dir = os.path.join(ck, "12", "state")
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
    more = run_cfg(**{"train.steps": 14})
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
