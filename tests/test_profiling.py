"""train.profile_steps: a real jax.profiler trace of the chosen steps, for local and remote workdirs."""

import glob
import os

import jax
import jax.numpy as jnp

from llm import fs
from llm.train import profiling


def _trace(workdir):
    step = jax.jit(lambda x: x @ x)
    x = jnp.ones((64, 64))
    prof = profiling.StepProfiler(workdir, first=1, n=2)
    for i in range(4):  # steps 0..3: the trace covers 1 and 2
        prof.before_step(i, x)
        assert prof.active == (i in (1, 2))
        x = step(x) / 64
        prof.after_step(i + 1, x)
    prof.stop()
    return prof


def test_profile_of_the_chosen_steps_lands_in_the_workdir(tmp_path):
    prof = _trace(str(tmp_path))
    assert prof.dir == prof.dest == str(tmp_path / "profile")
    assert glob.glob(f"{tmp_path}/profile/**/*.xplane.pb", recursive=True)
    assert glob.glob(f"{tmp_path}/profile/**/perfetto_trace.json.gz", recursive=True)


def test_remote_workdir_traces_locally_then_uploads(tmp_path, monkeypatch):
    """An object-store workdir (stood in for by a local path the fs layer treats as remote): the
    profiler writes to a temporary directory, which is copied to <workdir>/profile and removed."""
    monkeypatch.setattr(fs, "is_remote", lambda p: True)
    prof = _trace(str(tmp_path / "bucket" / "run"))
    assert prof.dir != prof.dest and not os.path.exists(prof.dir)
    assert glob.glob(f"{tmp_path}/bucket/run/profile/**/perfetto_trace.json.gz", recursive=True)
