"""Sweep: the attention variants on Shakespeare, each against the same baseline, at 2 seeds.

Arms: the default model (causal MHA, RoPE); QK-norm; attention-logit soft-capping at 20;
Gemma-2's alternating local (window 64 of 256) / global layers; MLA (kv latent 64, 48 + 16
query/key channels, v 64: 80 cached values per token and layer against MHA's 512); differential
attention; a learned sink per head. Every arm logs the largest attention and output logit
(model.monitor_logits), the statistic QK-norm and capping exist to bound.
Run:  python -m launch.sweep --sweep_file=configs/sweeps/shakespeare_attention.py --workdir=runs/shakespeare_attention
Then: python -m llm.compare runs/shakespeare_attention --out=docs/sweeps/shakespeare_attention \
          --metrics=model/attn_logit_max,model/logit_max --seeds=train.seed
Reaches: the README's attention-variants section (table, plot); 150 steps per run (~3 min each on an idle 2-core CPU).
"""

A = "model.attention."


def get_sweep():
    return {
        "config": "configs/shakespeare.py:gpt2",  # the default model when this sweep ran
        "arms": {
            "baseline": {},
            "qk-norm": {A + "qk_norm": True},
            "softcap": {A + "logit_softcap": 20.0},
            "local-global": {A + "pattern": ("local", "causal"), A + "local.window": 64},
            "mla": {
                A + "kind": "mla",
                A + "mla.kv_lora_rank": 64,
                A + "mla.qk_nope_head_dim": 48,
                A + "mla.qk_rope_head_dim": 16,
                A + "mla.v_head_dim": 64,
            },  # fmt: skip
            "differential": {A + "kind": "differential"},
            "sinks": {A + "sinks": True},
        },
        "axes": {"train.seed": [0, 1]},
        "set": {
            "train.steps": 150,
            "train.eval_every": 75,
            "checkpoint.every": 0,
            "model.monitor_logits": True,
        },
    }
