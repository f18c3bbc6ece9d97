"""Published architectures: `--config=configs/pretrain.py:<preset>`.

Presets: gpt2-124m, gpt2-355m, gpt2-774m, gpt2-1.5b, llama2-7b, llama2-13b, llama2-70b,
llama-1b, mixtral-8x7b, olmoe-1b-7b, tiny-gpt2, tiny-llama, tiny-moe (shapes in llm/model/presets.py).

Run (a pod; see README "Running on a TPU pod / GPU cluster"):
  python -m llm.train --config=configs/pretrain.py:gpt2-124m --workdir=gs://bucket/run \
      --config.data.corpus=/data/*.jsonl --config.data.tokenizer.path=/data/sp.model
Builds and initialises abstractly for every preset (tests/test_presets.py).
"""

from configs import base
from llm.model.presets import PRESETS
from llm.registry import ConfigError, did_you_mean


def get_config(preset: str = "gpt2-124m"):
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}."
                          + did_you_mean(preset, list(PRESETS)))  # fmt: skip
    c = base.get_config()
    base.apply_model_preset(c, PRESETS[preset])
    c.data.seq_len = min(1024, c.model.max_seq_len)
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.remat = "dots_no_batch"
    c.train.batch_size = 256
    c.train.steps = 100_000
    c.train.eval_every = 1000
    c.train.eval_batches = 20
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 2000
    c.checkpoint.every = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
