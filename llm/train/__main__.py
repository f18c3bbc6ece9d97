"""`python -m llm.train --config=configs/<file>.py[:arg] --workdir=<dir> [--config.a.b=v ...]`.

Re-running the same command resumes from the newest checkpoint in <workdir>.
"""

from __future__ import annotations

import logging

from llm import runtime

# CPU hosts: data-parallel CPU devices and host-memory reuse (see runtime.configure_cpu). Must run
# before JAX creates its backends; GPUs/TPUs are untouched.
runtime.configure_cpu()

from absl import flags  # noqa: E402

from llm import cli  # noqa: E402

_CONFIG = cli.define_config("config", "configs/shakespeare.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, tokenizer).")
_STOP_AT = flags.DEFINE_integer(
    "stop_at",
    None,
    "End this invocation at this step with a checkpoint, as a preemption would; the schedule "
    "still follows config.train.steps, and the same command without --stop_at resumes.",
)
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config as JSON and exit (nothing is trained or written)."
)
flags.register_multi_flags_validator(
    ["workdir", "print_config"],
    lambda f: bool(f["workdir"]) or f["print_config"],
    message="--workdir is required (a run directory), except with --print_config",
)


def main(argv):
    del argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    runtime.setup()
    from llm.config import from_config_dict  # noqa: PLC0415
    from llm.train.loop import train  # noqa: PLC0415

    distributed = False
    try:  # ConfigError / FileNotFoundError: one line on stderr, exit 2 (cli.run)
        cfg = from_config_dict(cli.config_value(_CONFIG))
        if _PRINT_CONFIG.value:
            print(cfg.to_json())
            return
        if cfg.train.distributed:
            runtime.init_distributed()
            distributed = True
        train(cfg, _WORKDIR.value, stop_at=_STOP_AT.value)
    finally:
        if distributed:
            # Leave together: a process that exits while its peers still finish a save makes the
            # coordination service abort them.
            import jax  # noqa: PLC0415

            jax.distributed.shutdown()


def run():
    """Console entry point `llm-train` (and `python -m llm.train`)."""
    cli.run(main)


if __name__ == "__main__":
    run()
