"""Sweep: dense vs Mixture-of-Experts at equal active parameters, and MoE balancing, on Shakespeare.

Arms (each at 2 seeds): the default dense model; MoE (4 experts of d_ff 512, top-2: 1,024 active
FFN columns per token like the dense d_ff 1,024) with no balancing, with the Switch aux loss
(weight 0.01), and with DeepSeek-V3 bias balancing (rate 0.001) instead of the aux loss.
MoE runs are dropless (impl=dropless, the default; benchmarks/results/moe_shakespeare_fp32.md has
its speed on this CPU next to the dense dispatch).
Run:  python -m launch.sweep --sweep_file=configs/sweeps/shakespeare_moe.py --workdir=runs/shakespeare_moe
Then: python -m llm.compare runs/shakespeare_moe --out=docs/sweeps/shakespeare_moe
Reaches: the README's MoE section (table, plot); 400 steps per run.
"""

MOE = {"model.ffn.kind": "moe", "model.ffn.moe.num_experts": 4, "model.ffn.moe.top_k": 2,
       "model.ffn.moe.expert_d_ff": 512}  # fmt: skip


def get_sweep():
    return {
        "config": "configs/shakespeare.py:gpt2",  # the default model when this sweep ran
        "arms": {
            "dense": {},
            "moe-none": {**MOE, "model.ffn.moe.aux_loss_weight": 0.0, "model.ffn.moe.z_loss_weight": 0.0},
            "moe-aux": {**MOE, "model.ffn.moe.aux_loss_weight": 0.01},
            "moe-bias": {
                **MOE,
                "model.ffn.moe.aux_loss_weight": 0.0,
                "model.ffn.moe.bias_balancing_rate": 0.001,
            },
        },
        "axes": {"train.seed": [0, 1]},
        "set": {"train.steps": 400, "train.eval_every": 100, "checkpoint.every": 0},
    }
