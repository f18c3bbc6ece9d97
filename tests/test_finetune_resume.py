"""Every fine-tuning task resumes bitwise from an interruption (stop_at: the checkpoint an
interruption or SIGTERM leaves) and trains on a sharded mesh (data 2 x fsdp 2 x tensor 2)."""

import numpy as np
import pytest

from llm.train.loop import train
from llm.train.metrics import read_metrics
from tests.test_train import tiny_cfg

BYTE = {"data.tokenizer.kind": "byte", "train.log_every": 1, "checkpoint.every": 2, "train.eval_every": 0,
        "train.batch_size": 8}  # fmt: skip
TASKS = {
    "classify": {"data.kind": "classification", "data.corpus": "builtin:sms-spam-collection.tsv",
                 "train.task": "classify", "model.head": "classifier", "data.seq_len": 48},
    "instructions": {"data.kind": "instructions", "data.corpus": "builtin:instruction-data.json",
                     "data.seq_len": 192, "model.max_seq_len": 192},
    "dpo": {"data.kind": "preferences", "data.corpus": "builtin:instruction-data-with-response.json",
            "train.task": "dpo", "data.seq_len": 192, "model.max_seq_len": 192},
}  # fmt: skip


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("base") / "run")
    train(tiny_cfg(**BYTE, **{"train.steps": 2, "model.max_seq_len": 192}), wd)
    return wd


def _losses(wd):
    return {m["step"]: m["loss"] for m in read_metrics(wd) if "loss" in m}


@pytest.mark.parametrize("task", list(TASKS))
def test_task_resumes_bitwise_and_trains_sharded(task, base_run, tmp_path):
    over = {**BYTE, **TASKS[task], "train.steps": 4}
    if task == "dpo":
        over["train.init_from"] = base_run
    cfg = tiny_cfg(**over)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(cfg, a)
    train(cfg, b, stop_at=2)
    train(cfg, b)
    la, lb = _losses(a), _losses(b)
    assert sorted(lb) == list(range(1, 5))
    for step in (3, 4):
        assert la[step] == lb[step], (task, step, la[step], lb[step])
    sharded = tiny_cfg(**{**over, "train.steps": 1, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    result = train(sharded, str(tmp_path / "mesh"))
    assert np.isfinite(result["eval_loss"])
