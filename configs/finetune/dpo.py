"""Preference tuning (DPO) of the instruction-tuned model on instruction-data-with-response.json:
110 instructions, the gold answer preferred over a model's answer (88 train / 22 held-out pairs).

    python -m llm.train --config=configs/finetune/instructions.py --workdir=runs/instruct   # the reference
    python -m llm.train --config=configs/finetune/dpo.py --workdir=runs/dpo

The reference model is the starting checkpoint (`train.init_from`; its log-probabilities are
computed once before training). beta = `train.dpo_beta`. Logged: implicit rewards of chosen and
rejected answers, their margin and the preference accuracy, in training (`model/dpo/*`) and on
the held-out pairs (`eval_reward_margin`, `eval_preference_accuracy`).
Arg `:base=<run dir>` starts from another run. Reaches (measured): held-out reward margin 0.049 at
step 10 -> 0.135 at step 60, preference accuracy 0.64 (14 of 22 pairs).
"""

from configs import shakespeare


def get_config(arg: str = ""):
    c = shakespeare.get_config()
    c.data.kind = "preferences"
    c.data.corpus = "builtin:instruction-data-with-response.json"
    c.data.seq_len = 256
    c.train.task = "dpo"
    c.train.dpo_beta = 0.1
    c.train.init_from = arg.partition("=")[2] if arg.startswith("base=") else "runs/instruct"
    c.model.dropout = 0.0
    c.train.steps, c.train.batch_size, c.train.eval_every, c.train.log_every = 60, 8, 10, 5
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 5e-5, 5, 0.0
    c.checkpoint.every = 30
    return c
