"""Tiny Mixture-of-Experts run for tests and smoke runs: 4 experts, top-2, every layer (seconds).

Run:  python -m llm.train --config=configs/moe_tiny.py --workdir=/tmp/moe_tiny
      (--config.model.ffn.moe.impl=dense --config.model.ffn.moe.capacity_factor=1.25 for GShard-style
      capacity; --config.model.ffn.moe.bias_balancing_rate=0.001 for DeepSeek-V3 balancing)
Reaches: loss falls from ~ln(vocab) well below it within 30 steps; metrics.jsonl carries
model/moe_load/layer_<i>/<e>, model/moe_max_load, model/moe_drop_fraction, aux/moe_aux_loss.
"""

from configs import base
from configs import tiny as tiny_config
from llm.model.presets import PRESETS


def get_config():
    c = tiny_config.get_config()
    base.apply_model_preset(c, PRESETS["tiny-moe"])
    return c
