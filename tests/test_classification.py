"""Classification fine-tuning: stratified deterministic splits, balanced sampling, the metrics
against hand-computed ones, a classifier started from a language model (its base restored, the
head fresh, the LM head dropped), training that beats the majority class, and LoRA with the head."""

import jax
import numpy as np
import pytest

from llm.api import load
from llm.data.classification import ClassificationSource, balanced_order, stratified_split
from llm.train import loop
from llm.train.loop import train
from llm.train.tasks import classification_metrics
from tests.test_train import tiny_cfg

SMS = {"data.kind": "classification", "data.corpus": "builtin:sms-spam-collection.tsv",
       "data.classification.labels": ("ham", "spam"), "train.task": "classify", "model.head": "classifier",
       "model.n_classes": 2}  # fmt: skip


def test_stratified_split_is_deterministic_disjoint_and_keeps_proportions():
    labels = np.r_[np.zeros(900, np.int32), np.ones(100, np.int32)]
    a, b = stratified_split(labels, (0.7, 0.1, 0.2), 0), stratified_split(labels, (0.7, 0.1, 0.2), 0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not any(
        np.array_equal(a["train"], stratified_split(labels, (0.7, 0.1, 0.2), 1)["train"]) for _ in [0]
    )
    allidx = np.concatenate(list(a.values()))
    assert len(allidx) == 1000 and len(np.unique(allidx)) == 1000
    for name, frac in (("train", 0.7), ("validation", 0.1), ("test", 0.2)):
        assert np.sum(labels[a[name]] == 1) == round(100 * frac) and np.sum(labels[a[name]] == 0) == round(
            900 * frac
        )


def test_sms_source_reads_5574_messages_and_balanced_order_equalises_classes():
    cfg = tiny_cfg(**SMS)
    src = ClassificationSource(cfg.data)
    texts, labels = src._load()
    assert len(texts) == 5574 and np.bincount(labels).tolist() == [4827, 747]
    order = balanced_order(labels[src.split_index["train"]], 0)
    counts = np.bincount(labels[src.split_index["train"]][order])
    assert counts[0] == counts[1] == 3379


def test_metrics_match_a_hand_computed_confusion_matrix():
    # rows true, columns predicted: 50 ham right, 2 ham called spam, 3 spam missed, 7 spam caught
    m = classification_metrics([[50, 2], [3, 7]], 0.25)
    assert m["accuracy"] == pytest.approx(57 / 62)
    assert m["precision"] == pytest.approx([50 / 53, 7 / 9])
    assert m["recall"] == pytest.approx([50 / 52, 7 / 10])
    f1_spam = 2 * (7 / 9) * (7 / 10) / (7 / 9 + 7 / 10)
    assert m["f1"][1] == pytest.approx(f1_spam) and m["confusion"] == [[50, 2], [3, 7]]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("lm") / "lm")
    train(tiny_cfg(**{"train.steps": 4, "model.tie_embeddings": False}), wd)  # an untied LM head to drop
    return wd


def test_classifier_starts_from_a_language_model_and_beats_the_majority_class(lm_run, tmp_path):
    cfg = tiny_cfg(**SMS, **{"model.tie_embeddings": False, "train.init_from": lm_run, "train.steps": 60,
                             "train.batch_size": 32, "train.eval_every": 0, "optim.lr": 3e-3,
                             "data.seq_len": 48})  # fmt: skip
    exp = loop.build(cfg, str(tmp_path / "probe"))
    fresh = exp.trainer.init_state().params
    params, _ = loop.init_params_from(lm_run, exp.trainer, fresh)
    lm = load(lm_run).params
    assert "lm_head" not in params and "cls_head" in params
    np.testing.assert_array_equal(
        np.asarray(params["embed"]["embedding"]), np.asarray(lm["embed"]["embedding"])
    )
    np.testing.assert_array_equal(
        np.asarray(params["cls_head"]["kernel"]), np.asarray(fresh["cls_head"]["kernel"])
    )
    result = train(cfg, str(tmp_path / "clf"))
    majority = 4827 / 5574
    assert result["eval_accuracy"] > majority + 0.01, result
    assert 0.0 <= result["eval_macro_f1"] <= 1.0
    # llm.evaluate: validation (what training evaluated) and test, with the confusion matrix
    from llm.evaluate import format_result, run_suite

    suite = run_suite(str(tmp_path / "clf"))
    val, test = suite["classification"]["validation"], suite["classification"]["test"]
    # 483 + 75 and 965 + 149 (stratified 70/10/20); training evaluated tiny.py's first batches only
    assert val["examples"] == 558 and val["accuracy"] > majority
    assert (
        test["examples"] == 1114 and sum(map(sum, test["confusion"])) == 1114 and test["accuracy"] > majority
    )
    assert "test: accuracy" in format_result(suite)


def test_lora_classifier_trains_adapters_and_head_only(lm_run, tmp_path):
    cfg = tiny_cfg(**SMS, **{"model.tie_embeddings": False, "train.init_from": lm_run, "train.steps": 6,
                             "checkpoint.every": 3, "model.lora.rank": 2, "data.seq_len": 32})  # fmt: skip
    wd = str(tmp_path / "lora")
    train(cfg, wd, stop_at=3)
    train(cfg, wd)  # resume: adapters and head from the checkpoint, base from init_from
    run, lm = load(wd).params, load(lm_run).params
    np.testing.assert_array_equal(np.asarray(run["embed"]["embedding"]), np.asarray(lm["embed"]["embedding"]))
    leaves = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(run)}
    assert any("cls_head" in k for k in leaves) and any("lora_a" in k for k in leaves)
