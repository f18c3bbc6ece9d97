"""End to end on real text: loss falls, exact resume, signals, grad accumulation, sampling."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import tiny
from llm.config import from_config_dict
from llm.train.loop import train
from llm.train.metrics import read_metrics


def tiny_cfg(arg=None, **overrides):
    c = tiny.get_config(arg)
    c.train.progress = False
    for path, value in overrides.items():
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_config_dict(c)


def losses(workdir):
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted tiny run (also reused by the sampling tests)."""
    wd = str(tmp_path_factory.mktemp("run") / "a")
    cfg = tiny_cfg(**{"train.log_every": 1, "train.steps": 20, "checkpoint.every": 5})
    result = train(cfg, wd)
    return wd, cfg, result


def test_loss_falls_on_real_text(trained):
    wd, _, result = trained
    ls = losses(wd)
    assert ls[1] > 5.0  # ~ln(320) at init
    assert ls[20] < ls[1] - 1.0
    assert result["eval_loss"] < ls[1] - 1.0 and 0 < result["eval_bpb"] < 10
    rows = read_metrics(wd)
    assert all(k in rows[0] for k in ("step", "loss", "learning_rate", "tokens_per_sec"))
    assert any("eval_bpb" in r for r in rows)
    assert os.listdir(os.path.join(wd, "tb"))


def test_resume_gives_bitwise_identical_losses(trained, tmp_path):
    wd_a, cfg, _ = trained
    wd_b = str(tmp_path / "b")
    train(cfg, wd_b, stop_at=10)  # "interrupted" after step 10 (checkpoint saved there)
    assert max(losses(wd_b)) == 10
    train(cfg, wd_b)  # resumes at 10 and finishes
    a, b = losses(wd_a), losses(wd_b)
    for step in range(11, 21):
        assert a[step] == b[step], (step, a[step], b[step])


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    one = tiny_cfg(**{"train.log_every": 1, "train.steps": 6, "train.eval_every": 0, "train.batch_size": 32})
    acc = tiny_cfg(
        **{
            "train.log_every": 1,
            "train.steps": 6,
            "train.eval_every": 0,
            "train.grad_accum": 4,
            "train.batch_size": 32,
        }
    )
    train(one, str(tmp_path / "one"))
    train(acc, str(tmp_path / "acc"))
    a, b = losses(str(tmp_path / "one")), losses(str(tmp_path / "acc"))
    np.testing.assert_allclose([a[s] for s in range(1, 7)], [b[s] for s in range(1, 7)], rtol=2e-5)


def test_sample_cli_and_load(trained, repo_root):
    wd, _, _ = trained
    cmd = [sys.executable, "-m", "llm.sample", f"--workdir={wd}", "--prompt=I had", "--max_new_tokens=20",
           "--temperature=0.8", "--top_k=50", "--top_p=0.95", "--seed=0"]  # fmt: skip
    r1 = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    r2 = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr
    assert r1.stdout.startswith("I had") and len(r1.stdout.strip()) > len("I had")
    assert r1.stdout == r2.stdout  # same seed, same text

    import llm

    run = llm.load(wd)
    assert run.step == 20 and run.config.model.vocab_size == 320
    assert isinstance(run.generate("I had", max_new_tokens=5, seed=1), str)
    # Host restore (what conversion uses), in groups of a few arrays: the same values, as numpy.
    host = llm.api.load(wd, host=True).params
    import jax

    from llm import sharding
    from llm.checkpoint import Checkpointer
    from llm.train.builder import params_target

    ckpt = Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
    target = params_target(run.config, mesh, run.model)
    grouped = ckpt.restore_params_host(run.step, target, group_bytes=1)  # one array per read
    ckpt.close()
    for tree in (host, grouped):
        assert jax.tree.structure(tree) == jax.tree.structure(run.params)
        assert all(isinstance(a, np.ndarray) and np.array_equal(a, b)
                   for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(run.params)))  # fmt: skip


def test_sigterm_saves_and_resumes(tmp_path, repo_root):
    wd = tmp_path / "sig"
    cmd = [sys.executable, "-m", "llm.train", "--config=configs/tiny.py", f"--workdir={wd}",
           "--config.train.steps=100000", "--config.checkpoint.every=0", "--config.train.log_every=1",
           "--config.train.eval_every=0", "--config.train.progress=false"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = wd / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "saving a checkpoint" in out
    saved = sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())
    last_logged = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert saved and saved[-1] >= last_logged >= 5
    # The same command resumes from that step (here with a finite step count).
    r = subprocess.run([*cmd[:-5], f"--config.train.steps={saved[-1] + 3}", "--config.train.progress=false",
                        "--config.train.allow_schedule_change=true"],
                       cwd=repo_root, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming at step {saved[-1]}" in r.stdout


def test_a_refused_resume_leaves_the_run_record_alone(trained, tmp_path):
    """Resuming with another model is refused, and config.json still describes the saved run."""
    import shutil

    from llm.registry import ConfigError

    wd, cfg, _ = trained
    copy = str(tmp_path / "copy")
    shutil.copytree(wd, copy)
    before = open(os.path.join(copy, "config.json")).read()
    with pytest.raises(ConfigError, match="different model"):
        train(tiny_cfg(**{"train.steps": 20, "checkpoint.every": 5, "model.positional": "rope"}), copy)
    assert open(os.path.join(copy, "config.json")).read() == before


def test_read_only_commands_create_nothing_and_notebook_objects_print_short(trained, tmp_path):
    from configs import tiny
    from llm.api import load

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load(str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ValueError, match="choose gpt2"):
        tiny.get_config("lama")
    r = repr(load(trained[0]))
    assert len(r) < 300 and "step=20" in r and "params=" in r


def test_bf16_on_a_cpu_without_native_bf16_warns(tmp_path, monkeypatch, capsys):
    from llm.train import history

    monkeypatch.setattr(history, "native_bf16", lambda: False)
    train(
        tiny_cfg(**{"train.steps": 1, "model.matmul_dtype": "bfloat16", "checkpoint.every": 0}),
        str(tmp_path / "w"),
    )
    assert "warning: bf16 matmuls on a CPU without AVX512-BF16/AMX" in capsys.readouterr().out
    monkeypatch.setattr(history, "native_bf16", lambda: True)
    train(
        tiny_cfg(**{"train.steps": 1, "model.matmul_dtype": "bfloat16", "checkpoint.every": 0}),
        str(tmp_path / "n"),
    )
    assert "warning: bf16" not in capsys.readouterr().out


def test_eval_every_need_not_be_a_multiple_of_log_every(tmp_path):
    wd = str(tmp_path / "w")
    train(
        tiny_cfg(**{"train.steps": 7, "train.log_every": 4, "train.eval_every": 3, "checkpoint.every": 0}), wd
    )
    rows = read_metrics(wd)
    assert sorted(r["step"] for r in rows if "eval_bpb" in r) == [3, 6, 7]  # 7: the final evaluation
    assert {r["step"] for r in rows if "loss" in r} >= {3, 4, 6, 7}
