"""Training from prepared ArrayRecord shards (`data.kind=arrayrecord`): the same losses as the text
path on the same token stream, mixtures, per-set eval, the tokenizer check, exact resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from launch import local_multiprocess
from llm.data import pipeline, prepare, prepared, sources
from llm.registry import ConfigError
from llm.train.loop import build, train
from llm.train.metrics import read_metrics
from tests.test_train import losses, tiny_cfg

STEPS = 12
COMMON = {"train.steps": STEPS, "train.log_every": 1, "train.eval_every": 6, "checkpoint.every": 0}


@pytest.fixture(scope="module")
def verdict(tmp_path_factory):
    """The Verdict's train / held-out split as two files, a text run on them, and both prepared
    with that run's tokenizer."""
    d = tmp_path_factory.mktemp("verdict")
    docs = sources.read_documents("builtin:the-verdict.txt")
    train_docs, eval_docs = sources.split_documents(docs, 0.1)
    # (prepare strips outer whitespace: give both paths the same, stripped, text)
    (d / "train.txt").write_text(train_docs[0].strip())
    (d / "eval.txt").write_text(eval_docs[0].strip())
    text_run = str(d / "text_run")
    train(tiny_cfg(**COMMON, **{"data.corpus": str(d / "train.txt"), "data.eval_corpus": str(d / "eval.txt")}),
          text_run)  # fmt: skip
    opt = prepare.PrepareOptions(shards=3, record_tokens=300)
    for split in ("train", "eval"):
        prepare.prepare(str(d / f"{split}.txt"), str(d / split), text_run, opt, progress=False)
    return d, text_run


def arrayrecord_cfg(d, **kw):
    return tiny_cfg(**COMMON, **{"data.kind": "arrayrecord", "data.path": str(d / "train"),
                                 "data.eval_path": str(d / "eval"), **kw})  # fmt: skip


def test_same_losses_as_text_path(verdict, tmp_path):
    d, text_run = verdict
    wd = str(tmp_path / "ar")
    result = train(arrayrecord_cfg(d), wd)
    want, got = losses(text_run), losses(wd)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-6)
    text_eval = [m["eval_loss"] for m in read_metrics(text_run) if "eval_loss" in m]
    ar_eval = [m["eval_loss"] for m in read_metrics(wd) if "eval_loss" in m]
    np.testing.assert_allclose(ar_eval, text_eval, rtol=1e-6)
    assert result["eval_loss"] == pytest.approx(text_eval[-1], rel=1e-6)
    # llm.evaluate's `heldout` set: the held-out documents decoded from the shards.
    assert sources.source_for(arrayrecord_cfg(d).data).documents()[1] == [(d / "eval.txt").read_text()]
    # The run holds the data's tokenizer; resuming checks it against the manifest.
    with open(os.path.join(wd, "tokenizer.json")) as f:
        assert json.load(f)["kind"] == "sentencepiece"


def test_windows_equal_text_windows(verdict):
    """Every training window (with any offset) equals the text path's, field by field."""
    d, text_run = verdict
    from llm.data.tokenizers import load_tokenizer

    tok = load_tokenizer(text_run)
    text_w = pipeline.PackedWindows(*pipeline.tokenize([(d / "train.txt").read_text()], tok), 64, False)
    ar_w, _ = prepared.PreparedDataset(str(d / "train")).split(64, tok.eos_id, None)
    assert len(ar_w) == len(text_w)
    for i, off in [(0, 0), (3, 17), (len(ar_w) - 2, 63)]:
        a, b = ar_w.__getitem__(i, off), text_w.__getitem__(i, off)
        for k in pipeline.FIELDS:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} window {i} offset {off}")


def test_tokenizer_mismatch_is_one_line(verdict, tmp_path):
    d, _ = verdict
    wd = tmp_path / "other_tok"
    train(
        tiny_cfg(
            **{
                "train.steps": 1,
                "checkpoint.every": 0,
                "train.eval_every": 0,
                "data.tokenizer.vocab_size": 400,
            }
        ),
        str(wd),
    )  # another tokenizer
    with pytest.raises(
        ConfigError, match=r"the run's tokenizer .*sentencepiece:\w+.* is not the one .*sentencepiece:"
    ):
        build(arrayrecord_cfg(d), str(wd))
    with pytest.raises(ConfigError, match="tokenizer.kind=sentencepiece"):
        build(arrayrecord_cfg(d, **{"data.tokenizer.kind": "byte"}), str(tmp_path / "byte"))


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of --config.data.path"):
        tiny_cfg(**{"data.kind": "arrayrecord"})
    with pytest.raises(ConfigError, match="read by data.kind=arrayrecord"):
        tiny_cfg(**{"data.path": "/x"})
    with pytest.raises(ConfigError, match="name=<prepared dir>@<weight > 0>"):
        tiny_cfg(**{"data.kind": "arrayrecord", "data.mixture": ("web=/x",)})
    with pytest.raises(FileNotFoundError, match="not a prepared dataset.*llm.data.prepare"):
        build(
            tiny_cfg(**{"data.kind": "arrayrecord", "data.path": str(tmp_path / "none")}), str(tmp_path / "w")
        )


@pytest.fixture(scope="module")
def two_sets(verdict, tmp_path_factory):
    """Two prepared datasets with the same tokenizer: The Verdict and a slice of Shakespeare."""
    d, text_run = verdict
    s = tmp_path_factory.mktemp("mix")
    (s / "shakespeare.txt").write_text(
        open(os.path.join(sources.CORPORA_DIR, "tinyshakespeare.txt")).read()[:60_000]
    )
    prepare.prepare(str(s / "shakespeare.txt"), str(s / "shakespeare"), text_run, progress=False)
    return str(d / "train"), str(s / "shakespeare")


def test_mixture_proportions_and_resume(two_sets, verdict):
    from llm.data.tokenizers import load_tokenizer

    tok = load_tokenizer(verdict[1])
    parts = [prepared.PreparedDataset(p).split(64, tok.eos_id, 0.1)[0] for p in two_sets]
    mix = prepared.Mixture(["verdict", "shakespeare"], parts, [0.8, 0.2])
    ds = pipeline.train_dataset(mix, 32, seed=0, shift_windows=True)
    it = pipeline.train_iterator(ds, 2)
    batches = [next(it) for _ in range(10_000 // 32 + 1)]
    share = np.mean(np.concatenate([b[pipeline.MIXTURE_FIELD] for b in batches])[:10_000] == 0)
    assert abs(share - 0.8) < 0.02, share
    # Exact resume: an iterator restored from a state continues the same stream.
    it = pipeline.train_iterator(ds, 2)
    for _ in range(7):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it2 = pipeline.train_iterator(ds, 2)
    it2.set_state(state)
    for a, b in zip(want, (next(it2) for _ in range(3))):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_mixture_run_logs_shares_and_evaluates_each_set(two_sets, tmp_path):
    a, b = two_sets
    cfg = tiny_cfg(**{"train.steps": 6, "train.log_every": 3, "train.eval_every": 3, "checkpoint.every": 0,
                      "train.eval_batches": 0,
                      "data.kind": "arrayrecord", "data.mixture": (f"verdict={a}@3", f"shakespeare={b}@1")})  # fmt: skip
    result = train(cfg, str(tmp_path / "mix"))
    rows = read_metrics(str(tmp_path / "mix"))
    last = [r for r in rows if "mix_verdict" in r][-1]
    assert (
        last["mix_verdict"] == pytest.approx(0.75, abs=0.05)
        and last["mix_verdict"] + last["mix_shakespeare"] == 1
    )
    for name in ("verdict", "shakespeare"):
        assert np.isfinite(result[f"eval_{name}_loss"]) and result[f"eval_{name}_tokens"] > 0
    # The aggregate is the token-weighted mean of the two sets.
    n = [result[f"eval_{k}_tokens"] for k in ("verdict", "shakespeare")]
    agg = (result["eval_verdict_loss"] * n[0] + result["eval_shakespeare_loss"] * n[1]) / sum(n)
    assert result["eval_loss"] == pytest.approx(agg, rel=1e-4)


READER = """
import json, sys
import jax
from llm import runtime
from llm.data import pipeline, prepared
runtime.init_distributed()
path, out, B = sys.argv[1], sys.argv[2], int(sys.argv[3])
w, _ = prepared.PreparedDataset(path).split(16, 0, None)
p, P = jax.process_index(), jax.process_count()
ds = pipeline.train_dataset(w, B, seed=3, process_index=p, process_count=P)
n_batches = len(w) // B
it = pipeline.train_iterator(ds, 2)
first = [next(it)["tokens"].tolist() for _ in range(n_batches)]  # one epoch
state = it.get_state()
cont = [next(it)["tokens"].tolist() for _ in range(2)]
it2 = pipeline.train_iterator(ds, 2)
it2.set_state(state)
resumed = [next(it2)["tokens"].tolist() for _ in range(2)]
json.dump({"rows": [r for b in first for r in b], "cont": cont, "resumed": resumed, "P": P},
          open(f"{out}/p{p}.json", "w"))
"""


def test_two_processes_read_disjoint_windows_covering_an_epoch(tmp_path, repo_root):
    """2 processes (jax.distributed on localhost) read disjoint windows that together are every
    window of the stream once per epoch; a restored iterator continues the exact stream."""
    # 1,024 random letters + EOS, byte-tokenized: 64 windows of 16 tokens, all different.
    src = tmp_path / "letters.txt"
    src.write_text("".join(chr(97 + int(c)) for c in np.random.default_rng(0).integers(0, 26, 16 * 64)))
    out = tmp_path / "prep"
    prepare.prepare(
        str(src), str(out), "byte", prepare.PrepareOptions(shards=4, record_tokens=50), progress=False
    )
    script = tmp_path / "reader.py"
    script.write_text(READER)
    port = local_multiprocess.free_port()
    procs = []
    for i in range(2):
        env = local_multiprocess.process_env(dict(os.environ), i, 2, 1, port)
        env["PYTHONPATH"] = repo_root
        procs.append(subprocess.Popen([sys.executable, str(script), str(out), str(tmp_path), "8"], env=env,
                                      cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
    for p in procs:
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, log[-3000:]
    r = [json.load(open(tmp_path / f"p{i}.json")) for i in range(2)]
    assert r[0]["P"] == 2
    w, _ = prepared.PreparedDataset(str(out)).split(16, 0, None)
    assert len(w) == 64
    every = sorted(tuple(w[i]["tokens"].tolist()) for i in range(len(w)))
    mine = [sorted(map(tuple, x["rows"])) for x in r]
    assert not set(mine[0]) & set(mine[1])  # disjoint
    assert sorted(mine[0] + mine[1]) == every  # together: each window of the epoch once
    for x in r:
        assert x["resumed"] == x["cont"]
