"""The default Shakespeare model with MoE feed-forward layers at equal *active* parameters.

Dense default: d_ff = 4 * 256 = 1024. Here: 4 experts of d_ff 512, top-2, so each token passes
through 2 x 512 = 1024 FFN columns as in the dense model (2x the FFN parameters in all).
Run:  python -m llm.train --config=configs/shakespeare_moe.py --workdir=runs/shakespeare_moe
      [--config.model.ffn.moe.aux_loss_weight=0 --config.model.ffn.moe.bias_balancing_rate=0.001]
The README's MoE section has the measured ablation (dense vs MoE, balancing variants).
"""

from configs import shakespeare


def get_config():
    c = shakespeare.get_config()
    c.model.ffn.kind = "moe"
    c.model.ffn.moe.num_experts = 4
    c.model.ffn.moe.top_k = 2
    c.model.ffn.moe.expert_d_ff = 512
    return c
