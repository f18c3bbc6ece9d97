"""Multi-process training on one machine: 2 processes x 4 fake CPU devices vs one 8-device process.

launch/local_multiprocess.py starts the processes as hosts of a pod would run (jax.distributed over
127.0.0.1); the first launch stops at step 4 with an Orbax checkpoint, a second launch resumes it.
"""

import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from launch import local_multiprocess
from llm.checkpoint import Checkpointer
from llm.data import pipeline
from llm.train import loop
from llm.train import state as state_lib
from llm.train.metrics import read_metrics
from tests.test_train import tiny_cfg

STEPS, STOP = 8, 4
FLAGS = {"train.steps": STEPS, "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 1,
         "checkpoint.every": 0, "mesh.data": 2, "mesh.fsdp": 4}  # fmt: skip
# fp32; gloo's cross-process all-reduce may sum in another order than one process does.
RTOL = 1e-5


def cli_args(workdir) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in FLAGS.items()]
    return ["--config=configs/tiny.py", f"--workdir={workdir}", "--config.train.progress=false", *flags]


def tail(log: str, n: int = 60) -> str:
    """The end of the launch output without gloo's connection chatter, for failure messages."""
    return "\n".join([ln for ln in log.splitlines() if "[Gloo]" not in ln][-n:])


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run in this single process on all 8 devices."""
    wd = str(tmp_path_factory.mktemp("single"))
    result = loop.train(tiny_cfg(**FLAGS), wd)
    return wd, losses(wd), result


def test_two_processes_match_one_and_resume(reference, tmp_path, repo_root):
    _, ref, ref_result = reference
    wd = tmp_path / "mp"
    out = io.StringIO()
    code = local_multiprocess.launch([*cli_args(wd), f"--stop_at={STOP}"], processes=2, devices_per_process=4,
                                     out=out, cwd=repo_root)  # fmt: skip
    log = out.getvalue()
    assert code == 0, tail(log)
    assert "[p0] model:" in log and "[p1] model:" not in log  # only process 0 reports
    assert "{'data': 2, 'fsdp': 4, 'expert': 1, 'tensor': 1}" in log
    assert sorted(losses(wd)) == list(range(1, STOP + 1))
    # Every process wrote its part of the checkpoint, including its own data-iterator state.
    data_dir = wd / "checkpoints" / str(STOP) / "data"
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
    assert not [f for f in os.listdir(wd) if f.startswith("metrics") and f != "metrics.jsonl"]

    out = io.StringIO()
    code = local_multiprocess.launch(cli_args(wd), processes=2, devices_per_process=4, out=out, cwd=repo_root)
    log = out.getvalue()
    assert code == 0, tail(log)
    assert f"resuming at step {STOP}" in log
    got = losses(wd)
    assert sorted(got) == list(range(1, STEPS + 1))  # one row per step: process 1 writes none
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=RTOL)
    final = [m for m in read_metrics(wd) if "eval_loss" in m][-1]
    np.testing.assert_allclose(final["eval_loss"], ref_result["eval_loss"], rtol=RTOL)

    # The 2-process checkpoint also restores in this single process (another process count):
    # its data iterator continues with the batch the uninterrupted run saw next.
    exp = loop.build(tiny_cfg(**FLAGS), str(wd))
    target = state_lib.sharded_target(exp.abstract_state, exp.state_shardings)
    ds = pipeline.train_dataset(
        exp.train_windows,
        exp.cfg.train.batch_size,
        exp.cfg.data.seed,
        shift_windows=exp.cfg.data.shift_windows,
    )
    it = pipeline.train_iterator(ds, threads=0)
    ckpt = Checkpointer(str(wd / "checkpoints"), async_save=False)
    state, _ = ckpt.restore(STOP, target, it)
    ckpt.close()
    assert int(state.step) == STOP
    np.testing.assert_array_equal(next(it)["tokens"], ds[STOP]["tokens"])


def test_a_failing_process_fails_the_launch(tmp_path, repo_root):
    out = io.StringIO()
    args = [*cli_args(tmp_path / "bad"), "--config.model.n_layers=0"]  # a config error in every process
    code = local_multiprocess.launch(args, processes=2, devices_per_process=1, out=out, cwd=repo_root)
    assert code == 2, out.getvalue()
    assert "[p0] error: model.d_model and model.n_layers must be > 0" in out.getvalue()


def test_dry_run_prints_one_command_per_process(capsys):
    argv = ["--processes=3", "--devices_per_process=2", "--port=1234", "--dry-run", "--",
            "--config=configs/tiny.py", "--workdir=/tmp/w"]  # fmt: skip
    assert local_multiprocess.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[-1] == "wait"
    for i, line in enumerate(lines[:3]):
        assert f"JAX_PROCESS_ID={i} " in line and "JAX_NUM_PROCESSES=3 " in line
        assert "JAX_COORDINATOR_ADDRESS=127.0.0.1:1234 " in line and "JAX_PLATFORMS=cpu " in line
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=2 " in line
        assert line.endswith("-m llm.train --config=configs/tiny.py --workdir=/tmp/w "
                             "--config.train.distributed=true &")  # fmt: skip


def test_sigterm_to_one_process_stops_every_process_at_one_step(tmp_path, repo_root):
    """Preemption on a pod: one host gets SIGTERM; JAX's preemption sync point makes every process
    save the same step and exit 143, and the launch resumes from it."""
    wd = tmp_path / "pre"
    flags = dict(FLAGS, **{"train.steps": 2000})
    args = ["--config=configs/tiny.py", f"--workdir={wd}", "--config.train.progress=false"]
    args += [f"--config.{k}={v}" for k, v in flags.items()]
    with open(tmp_path / "launch.log", "w") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "launch.local_multiprocess", "--processes=2", "--devices_per_process=4", "--"]
            + args,
            cwd=repo_root, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.time() + 240
            while not (wd / "metrics.jsonl").exists() or len(losses(wd)) < 3:
                assert launcher.poll() is None and time.time() < deadline, (
                    tmp_path / "launch.log"
                ).read_text()
                time.sleep(0.2)
            workers = psutil.Process(launcher.pid).children()
            second = next(w for w in workers if w.environ().get("JAX_PROCESS_ID") == "1")
            second.send_signal(signal.SIGTERM)  # process 0 is not signalled
            code = launcher.wait(timeout=300)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    text = (tmp_path / "launch.log").read_text()
    assert code == 143, tail(text)
    assert "[launch] exit codes [143, 143]" in text, tail(text)
    assert "[p0] signal received: saving a checkpoint at step" in text, tail(text)
    ckpt = Checkpointer(str(wd / "checkpoints"), async_save=False)
    saved = ckpt.steps()
    ckpt.close()
    assert len(saved) == 1 and 3 <= saved[0] < flags["train.steps"], saved
    stop = saved[0]
    assert max(losses(wd)) == stop  # nobody ran past the agreed step
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
        os.listdir(wd / "checkpoints" / str(stop) / "data")
    )

    out = io.StringIO()
    code = local_multiprocess.launch([*args, f"--stop_at={stop + 2}"], processes=2, devices_per_process=4,
                                     out=out, cwd=repo_root)  # fmt: skip
    assert code == 0, tail(out.getvalue())
    assert f"resuming at step {stop}" in out.getvalue()
    assert max(losses(wd)) == stop + 2
