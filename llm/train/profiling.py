"""`train.profile_steps`: a jax.profiler trace of N training steps, for TensorBoard or Perfetto."""

from __future__ import annotations

import os

import jax


class StepProfiler:
    """Traces steps [first, first + n) into <workdir>/profile; n = 0 does nothing.

    `first` should be a step after the one that compiles, so the trace shows steady-state steps.
    Besides the TensorBoard `.xplane.pb`, a `perfetto_trace.json.gz` is written, which
    https://ui.perfetto.dev opens without installing anything (see docs/profiling.md).
    """

    def __init__(self, workdir: str, first: int, n: int):
        self.dir = os.path.join(workdir, "profile")
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
        print(f"profile of steps {self.first}..{self.last - 1} written to {self.dir} "
              f"(tensorboard --logdir {self.dir}, or perfetto_trace.json.gz in ui.perfetto.dev)", flush=True)  # fmt: skip
