"""The run record tells the truth: runs.jsonl per launch (provenance, step range, training time),
schedule changes on resume refused or recorded, no stale lock pid, compare's training time and
output place, the step llm.sample loaded."""

import json
import os
import subprocess
import sys

import pytest

from llm import compare
from llm.registry import ConfigError
from llm.train import history
from llm.train.loop import train
from llm.train.metrics import read_metrics
from tests.test_train import tiny_cfg

BASE = {"train.steps": 6, "train.eval_every": 0, "checkpoint.every": 3, "train.log_every": 1}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("records") / "run")
    train(tiny_cfg(**BASE), wd, stop_at=3)  # a first launch stops at step 3 (as a preemption would)
    train(tiny_cfg(**BASE), wd)  # the second resumes it to the end
    return wd


def test_history_has_one_start_and_end_per_launch(run_dir):
    recs = history.read(run_dir)
    assert [r["event"] for r in recs] == ["start", "end", "resume", "end"]
    assert [r["step"] for r in recs] == [0, 3, 3, 6]
    start = recs[0]
    assert start["git"] is None or set(start["git"]) == {"commit", "dirty"}
    assert start["versions"]["jax"] and start["host"]["devices"] == 8 and start["host"]["cpu_isa"]
    assert isinstance(start["argv"], list)
    assert all(r["exit_code"] == 0 and r["train_seconds"] > 0 for r in recs if r["event"] == "end")
    assert history.training_seconds(run_dir) == pytest.approx(sum(r["train_seconds"] for r in recs[1::2]))
    with open(os.path.join(run_dir, ".lock")) as f:
        assert f.read() == ""  # no pid of a finished run left behind


def test_schedule_change_on_resume_is_refused_then_recorded(run_dir, tmp_path):
    wd = str(tmp_path / "r")
    train(tiny_cfg(**BASE), wd, stop_at=3)
    before = open(os.path.join(wd, "config.json")).read()
    for flags, named in [({"train.steps": 10}, "train.steps=6 (now 10)"), ({"optim.lr": 0.5}, "optim.lr=0.001 (now 0.5)"),
                         ({"optim.schedule": "wsd"}, "optim.schedule='cosine' (now 'wsd')")]:  # fmt: skip
        with pytest.raises(
            ConfigError,
            match=r"would change its learning-rate schedule: "
            + named.replace("(", r"\(").replace(")", r"\)"),
        ):
            train(tiny_cfg(**{**BASE, **flags}), wd)
    assert open(os.path.join(wd, "config.json")).read() == before  # the refused config was not written
    assert [r["event"] for r in history.read(wd)] == ["start", "end"]  # nor a launch recorded
    train(tiny_cfg(**{**BASE, "train.steps": 8, "train.allow_schedule_change": True}), wd)
    resume = history.read(wd)[2]
    assert resume["event"] == "resume" and resume["schedule_change"] == {"train.steps": [6, 8]}
    assert max(r["step"] for r in read_metrics(wd) if "loss" in r) == 8


def test_compare_uses_training_time_and_writes_next_to_the_run(run_dir, capsys):
    assert compare.main([run_dir, "--no_plot"]) == 0
    assert f"wrote {os.path.join(run_dir, 'comparison.json')}" in capsys.readouterr().out
    with open(os.path.join(run_dir, "comparison.json")) as f:
        row = json.load(f)[0]
    assert row["wall_s"] == pytest.approx(history.training_seconds(run_dir))
    assert not os.path.exists(os.path.join(os.path.dirname(run_dir), "comparison.json"))


def test_sample_says_which_step_it_loaded(run_dir, repo_root):
    p = subprocess.run([sys.executable, "-m", "llm.sample", f"--workdir={run_dir}", "--max_new_tokens=4", "--step=3"],
                       capture_output=True, text=True, cwd=repo_root, env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"sampling {run_dir} at step 3" in p.stderr


ENTRY_POINTS = ("llm.train", "llm.sample", "llm.evaluate", "llm.compare", "llm.convert", "llm.data.prepare",
                "llm.data.passkey", "launch.sweep", "launch.aot_check", "launch.tpu_pod", "launch.slurm",
                "launch.local_multiprocess")  # fmt: skip


def test_every_entry_point_has_help_and_a_bad_flag_is_usage_error_2(repo_root, tmp_path):
    """--help: usage on stdout, exit 0. An unknown flag (or a missing required one): an error line
    on stderr, exit 2 (not 1, which commands use for "does not fit" / "failed"). Nothing is
    created in the working directory."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": repo_root}
    run = lambda m, a: subprocess.run([sys.executable, "-m", m, a], capture_output=True, text=True,  # noqa: E731
                                      cwd=tmp_path, env=env, timeout=120)  # fmt: skip
    bad = {}
    for m in ENTRY_POINTS:
        h, u = run(m, "--help"), run(m, "--no_such_flag=1")
        if h.returncode or "--" not in h.stdout or "Traceback" in h.stderr:
            bad[m] = ("--help", h.returncode, h.stderr[-300:])
        elif u.returncode != 2 or "Traceback" in u.stderr or "error" not in u.stderr.strip().splitlines()[-1]:
            bad[m] = ("bad flag", u.returncode, u.stderr[-300:])
    assert not bad
    assert os.listdir(tmp_path) == []
