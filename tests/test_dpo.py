"""DPO: the loss against a hand computation on fixed log-probabilities, the reference filled from
the starting checkpoint (so the first step's rewards are 0 and the loss log 2), and a short run in
which held-out preference accuracy and reward margin rise."""

import math

import numpy as np
import pytest

from llm.data.preferences import PreferenceSource
from llm.train.dpo import dpo_loss
from llm.train.loop import train
from llm.train.metrics import read_metrics
from tests.test_train import tiny_cfg

PREF = {"data.kind": "preferences", "data.corpus": "builtin:instruction-data-with-response.json",
        "train.task": "dpo", "data.tokenizer.kind": "byte", "model.max_seq_len": 384, "data.seq_len": 384}  # fmt: skip


def test_dpo_loss_equals_a_hand_computation():
    pc, pr, rc, rr, beta = (
        np.array([-10.0, -4.0]),
        np.array([-12.0, -3.0]),
        np.array([-11.0, -4.5]),
        np.array([-11.5, -2.0]),
        0.5,
    )
    loss, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta)
    # pair 0: r_c = 0.5*(-10+11) = 0.5, r_r = 0.5*(-12+11.5) = -0.25 -> -log sigmoid(0.75)
    # pair 1: r_c = 0.5*(-4+4.5) = 0.25, r_r = 0.5*(-3+2) = -0.5  -> -log sigmoid(0.75)
    want = math.log(1 + math.exp(-0.75))
    np.testing.assert_allclose(np.asarray(loss), [want, want], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r_c), [0.5, 0.25]) and np.testing.assert_allclose(
        np.asarray(r_r), [-0.25, -0.5]
    )


def test_pairs_come_from_gold_and_model_responses():
    src = PreferenceSource(tiny_cfg(**PREF).data)
    p = src.pairs()
    assert len(p["train"]) == 88 and len(p["validation"]) == 22
    prompt, chosen, rejected = p["train"][0]
    assert prompt.endswith("### Response:\n") and chosen != rejected


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("sft") / "run")
    train(tiny_cfg(**{"data.tokenizer.kind": "byte", "model.max_seq_len": 384, "data.seq_len": 384,
                      "train.steps": 4}), wd)  # fmt: skip
    return wd


def test_dpo_starts_at_log2_and_learns_the_preference(sft, tmp_path):
    wd = str(tmp_path / "dpo")
    cfg = tiny_cfg(**PREF, **{"train.init_from": sft, "train.steps": 30, "train.batch_size": 8, "train.eval_every": 15,
                              "optim.lr": 3e-3, "train.dpo_beta": 0.5, "optim.warmup_steps": 1, "train.log_every": 1,
                              "train.eval_batches": 0})  # fmt: skip
    train(cfg, wd)
    rows = read_metrics(wd)
    first = next(r for r in rows if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=2e-3)  # reference = start: rewards 0
    evals = [r for r in rows if "eval_preference_accuracy" in r]
    assert len(evals) >= 2
    assert evals[-1]["eval_reward_margin"] > 0 and evals[-1]["eval_preference_accuracy"] >= 0.5
    from llm.evaluate import format_result, run_suite  # the same held-out numbers from the checkpoint

    suite = run_suite(wd, batch_size=8)
    assert suite["preferences"]["reward_margin"] == pytest.approx(
        evals[-1]["eval_reward_margin"], rel=1e-4, abs=1e-6
    )
    assert "preference accuracy" in format_result(suite)


def test_dpo_needs_a_reference():
    from llm.registry import ConfigError
    from llm.train import tasks

    with pytest.raises(ConfigError, match="init_from"):
        tasks.get("dpo", tiny_cfg(**PREF))
