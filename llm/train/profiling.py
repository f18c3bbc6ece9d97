"""`train.profile_steps`: a jax.profiler trace of N training steps, for TensorBoard or Perfetto."""

from __future__ import annotations

import shutil
import tempfile

import jax

from llm import fs


class StepProfiler:
    """Traces steps [first, first + n) into <workdir>/profile; n = 0 does nothing.

    `first` should be a step after the one that compiles, so the trace shows steady-state steps.
    Besides the TensorBoard `.xplane.pb`, a `perfetto_trace.json.gz` is written, which
    https://ui.perfetto.dev opens without installing anything (see docs/profiling.md).
    With a `gs://` workdir the trace is written to a local temporary directory and uploaded to
    <workdir>/profile when it stops (the profiler writes through local file APIs).
    """

    def __init__(self, workdir: str, first: int, n: int):
        self.dest = fs.join(workdir, "profile")
        self.dir = tempfile.mkdtemp(prefix="profile_") if fs.is_remote(workdir) and n > 0 else self.dest
        self.first, self.last = first, first + n
        self.active = False
        self.enabled = n > 0 and jax.process_index() == 0

    def before_step(self, step: int, state) -> None:
        """Call with the step about to run (the number of updates applied so far)."""
        if self.enabled and step == self.first and not self.active:
            jax.block_until_ready(state)  # keep earlier, still-running steps out of the trace
            jax.profiler.start_trace(self.dir, create_perfetto_trace=True)
            self.active = True

    def after_step(self, step: int, state) -> None:
        """Call with the step just finished (updates applied so far)."""
        if self.active and step >= self.last:
            self.stop(state)

    def stop(self, state=None) -> None:
        if not self.active:
            return
        if state is not None:
            jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.active = False
        if self.dir != self.dest:
            fs.copy_tree(self.dir, self.dest)
            shutil.rmtree(self.dir, ignore_errors=True)
        print(f"profile of steps {self.first}..{self.last - 1} written to {self.dest} "
              f"(tensorboard --logdir {self.dest}, or perfetto_trace.json.gz in ui.perfetto.dev)", flush=True)  # fmt: skip
