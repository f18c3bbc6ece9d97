"""Write a run directory with the code at commit e9a0ace (before the foundation change)."""
import json, os, shutil, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from configs import tiny
from llm.config import from_config_dict
from llm.train.loop import train
from llm.train.metrics import read_metrics

def cfg(steps):
    c = tiny.get_config()
    c.model.d_model = 32; c.model.n_layers = 1; c.model.max_seq_len = 32
    c.model.attention.n_heads = 2; c.model.attention.n_kv_heads = 2
    c.data.seq_len = 32
    c.train.steps = 8; c.train.log_every = 1; c.train.eval_every = 0; c.train.progress = False
    c.checkpoint.every = 4; c.checkpoint.keep = 1; c.checkpoint.async_save = False
    return from_config_dict(c)

out = sys.argv[1]
shutil.rmtree(out, ignore_errors=True)
train(cfg(8), out, stop_at=4)
# the continuation the old code computes from that checkpoint (in a copy)
cont = out + "_cont"
shutil.rmtree(cont, ignore_errors=True)
shutil.copytree(out, cont)
os.remove(os.path.join(cont, "metrics.jsonl"))
train(cfg(8), cont)
losses = {m["step"]: m["loss"] for m in read_metrics(cont) if "loss" in m}
json.dump({"commit": "e9a0ace", "losses_after_resume": losses}, open(os.path.join(out, "expected_resume.json"), "w"), indent=1)
print(losses)
