"""`python -m llm.train --config=configs/<file>.py[:arg] --workdir=<dir> [--config.a.b=v ...]`.

Re-running the same command resumes from the newest checkpoint in <workdir>.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare.py", "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, tokenizer).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from llm import runtime  # noqa: PLC0415

    runtime.setup()
    from llm.config import ConfigError, from_config_dict  # noqa: PLC0415
    from llm.train.loop import train  # noqa: PLC0415

    try:
        cfg = from_config_dict(_CONFIG.value)
        if cfg.train.distributed:
            runtime.init_distributed()
        train(cfg, _WORKDIR.value)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
