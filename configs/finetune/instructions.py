"""Instruction fine-tuning of the default Shakespeare model on instruction-data.json (1,100
Alpaca-style records, llm/data/corpora/; the customary 935/55/110 split, in file order).

    bash scripts/quickstart.sh                                             # the pretrained runs/shakespeare
    python -m llm.train --config=configs/finetune/instructions.py --workdir=runs/instruct
    python -m llm.evaluate --workdir=runs/instruct                         # response loss + 110 answers (JSONL)

Alpaca prompt template (`data.instructions.template`), loss on the response tokens only
(`data.instructions.prompt_loss=true` scores the prompt too), one record per row padded to 256
tokens. The 3.7M-parameter Shakespeare model knows no English beyond plays: expect well-formed
Alpaca-shaped answers, not correct ones. Arg `:base=<run dir>` starts from another run.
Reaches (measured): response loss 3.24 nats/token on the 55 validation instructions, 3.23 on the
110 test ones, after 300 steps (from 3.58 at step 100).
"""

from configs import shakespeare


def get_config(arg: str = ""):
    c = shakespeare.get_config()  # the pretrained model's shape
    c.data.kind = "instructions"
    c.data.corpus = "builtin:instruction-data.json"
    c.data.seq_len = 256
    c.model.dropout = 0.1
    c.train.init_from = arg.partition("=")[2] if arg.startswith("base=") else "runs/shakespeare"
    c.train.steps, c.train.batch_size, c.train.eval_every = 300, 16, 100
    c.optim.lr, c.optim.warmup_steps = 5e-4, 20
    c.checkpoint.every = 100
    return c
