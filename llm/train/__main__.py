"""`python -m llm.train --config=configs/<file>.py[:arg] --workdir=<dir> [--config.a.b=v ...]`.

Re-running the same command resumes from the newest checkpoint in <workdir>.
"""

from __future__ import annotations

import logging
import sys

from llm import runtime

# CPU hosts: data-parallel CPU devices and host-memory reuse (see runtime.configure_cpu). Must run
# before JAX creates its backends; GPUs/TPUs are untouched.
runtime.configure_cpu()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/shakespeare.py", "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, tokenizer).")
_STOP_AT = flags.DEFINE_integer(
    "stop_at",
    None,
    "End this invocation at this step with a checkpoint, as a preemption would; the schedule "
    "still follows config.train.steps, and the same command without --stop_at resumes.",
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    runtime.setup()
    from llm.config import ConfigError, from_config_dict  # noqa: PLC0415
    from llm.train.loop import train  # noqa: PLC0415

    distributed = False
    try:
        cfg = from_config_dict(_CONFIG.value)
        if cfg.train.distributed:
            runtime.init_distributed()
            distributed = True
        train(cfg, _WORKDIR.value, stop_at=_STOP_AT.value)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if distributed:
            # Leave together: a process that exits while its peers still finish a save makes the
            # coordination service abort them.
            import jax  # noqa: PLC0415

            jax.distributed.shutdown()


if __name__ == "__main__":
    app.run(main)


def run():
    """Console entry point `llm-train`."""
    app.run(main)
