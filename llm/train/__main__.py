"""`python -m llm.train --config=configs/<file>.py[:arg] --workdir=<dir> [--config.a.b=v ...]`.

Re-running the same command resumes from the newest checkpoint in <workdir>.
"""

from __future__ import annotations

import logging
import os
import sys

# XLA:CPU runs one device's ops with too few threads to fill the cores; splitting the host into
# data-parallel CPU devices uses them better (+14% tokens/s on 2 cores, see README "Speed").
# Only the CPU platform is affected; GPUs/TPUs are untouched. Must be set before jax is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    _n = os.environ.get("LLM_CPU_DEVICES", "2")
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_n}".strip()
    )

from absl import app, flags
from ml_collections import config_flags

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
    from llm import runtime  # noqa: PLC0415

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
