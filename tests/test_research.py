"""Research workflow: sweeps, run comparison, the evaluation suite and the introspection API."""

import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from launch import sweep
from llm import compare, evaluate, introspect
from llm.config import from_config_dict
from llm.model import ModelConfig, Transformer
from llm.model.config import AttentionConfig
from llm.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(devices: int = 2) -> dict:
    """The test process fakes 8 CPU devices; tiny subprocess runs are faster on 2."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


# ---- sweeps and comparison ---------------------------------------------------------------------


def test_sweep_grid_names_and_dry_run(capsys):
    assert sweep.parse_axis("model.positional=[learned,rope,alibi]") == (
        "model.positional", ["learned", "rope", "alibi"])  # fmt: skip
    assert sweep.parse_axis("--config.model.attention.n_kv_heads=1,2") == (
        "model.attention.n_kv_heads",
        ["1", "2"],
    )
    runs = sweep.expand(
        {"model.positional": ["learned", "rope"], "model.attention.n_kv_heads": ["1", "2"]},
        "/r",
        {"train.steps": "5"},
    )
    assert [r.name for r in runs] == [
        "positional=learned,n_kv_heads=1",
        "positional=learned,n_kv_heads=2",
        "positional=rope,n_kv_heads=1",
        "positional=rope,n_kv_heads=2",
    ]
    assert runs[3].workdir == "/r/positional=rope,n_kv_heads=2"
    # Two keys with the same last component keep their full paths in the name.
    assert sweep.run_name({"model.dropout": "0.1", "model.attention.dropout": "0.2"}) == (
        "model.dropout=0.1,model.attention.dropout=0.2")  # fmt: skip

    assert sweep.main(["--workdir=/tmp/never", "--sweep_file=configs/sweeps/positional_heads.py",
                       "--set", "train.steps=7", "--dry_run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    cmds = [line for line in out.splitlines() if line.startswith("python -m llm.train")]
    assert len(cmds) == 9 and all("--config.train.steps=7" in c for c in cmds)
    assert "--config.model.positional=alibi --config.model.attention.n_kv_heads=4" in cmds[-1]
    assert not os.path.exists("/tmp/never")

    assert sweep.main(["--workdir=gs://bucket/sw", "--sweep=model.positional=[rope]", "--emit=pod",
                       "--tpu=my-tpu", "--zone=us-central2-b"]) == 0  # fmt: skip
    pod = capsys.readouterr().out.splitlines()[-1]
    assert pod.startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all")
    assert "--workdir=gs://bucket/sw/positional=rope" in pod and "--config.train.distributed=true" in pod


@pytest.mark.parametrize("args, message", [
    (["--sweep=model.positional"], "expected key=[v1,v2,...]"),
    (["--sweep=model.positional=[rope,rope]"], "repeated value"),
    ([], "nothing to sweep"),
    (["--sweep=train.steps=[1,2]", "--set", "train.steps=3"], "both swept and --set"),
])  # fmt: skip
def test_sweep_bad_input(args, message, capsys):
    assert sweep.main(["--workdir=/tmp/never", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--dry_run", "--emit=local"])
def test_sweep_validates_every_grid_point_first(flag, tmp_path, capsys):
    """A misspelt value or key in any grid point: exit 2 naming it, nothing launched or created."""
    args = [f"--workdir={tmp_path}/sw", "--sweep=model.positional=[learned,rotary]",
            "--sweep=model.attention.n_kv_heads=[1,3]", flag]  # fmt: skip
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert "grid point positional=rotary,n_kv_heads=1: unknown positional encoding 'rotary'" in err
    assert "n_kv_heads=3: model.attention.n_heads=4 is not divisible" in err
    assert "3 of 4 grid points are invalid; nothing launched" in err
    assert not os.path.exists(tmp_path / "sw")
    assert sweep.main([f"--workdir={tmp_path}/sw", "--sweep=model.positionl=[rope]", flag]) == 2
    assert "unknown config field 'positionl'. Did you mean 'positional'?" in capsys.readouterr().err


def test_sweep_arms_cross_named_variants_with_the_axes(repo_root, capsys):
    """Named arms (e.g. dense vs MoE balancing variants) x axes (seeds): every run carries its
    arm's overrides; the MoE sweep file expands to 4 arms x 2 seeds."""
    runs = sweep.expand(
        {"train.seed": ["0", "1"]}, "/r", arms={"dense": {}, "moe": {"model.ffn.kind": "moe"}}
    )
    assert [r.name for r in runs] == [
        "arm=dense,seed=0",
        "arm=dense,seed=1",
        "arm=moe,seed=0",
        "arm=moe,seed=1",
    ]
    assert runs[2].overrides == {"model.ffn.kind": "moe", "train.seed": "0"} and runs[0].overrides == {
        "train.seed": "0"
    }
    with pytest.raises(ValueError, match="set twice"):
        sweep.expand({"model.ffn.kind": ["dense"]}, "/r", arms={"moe": {"model.ffn.kind": "moe"}})
    path = os.path.join(repo_root, "configs", "sweeps", "shakespeare_moe.py")
    assert sweep.main(["--sweep_file", path, "--workdir", "/tmp/x", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "sweep: 8 runs" in out and "arm=moe-bias,seed=1" in out and "bias_balancing_rate=0.001" in out


def test_sweep_runs_grid_and_compare_prints_table_and_plot(tmp_path):
    root = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "launch.sweep", "--config=configs/tiny.py", f"--workdir={root}",
           "--sweep=model.positional=[learned,rope,alibi]", "--sweep=model.attention.n_kv_heads=[1,4]",
           "--set", "train.steps=3", "--set", "train.log_every=1", "--set", "train.eval_batches=1",
           "--set", "checkpoint.every=0"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "sweep done: 6/6 runs ok" in r.stdout
    names = sorted(os.listdir(root))
    assert len(names) == 6 and "positional=rope,n_kv_heads=1" in names
    rec = json.loads((root / "positional=rope,n_kv_heads=1" / "overrides.json").read_text())
    assert rec["overrides"] == {"model.positional": "rope", "model.attention.n_kv_heads": 1}
    assert rec["set"]["train.steps"] == 3
    saved = json.loads((root / "positional=rope,n_kv_heads=1" / "config.json").read_text())
    assert saved["model"]["positional"] == "rope" and saved["model"]["attention"]["n_kv_heads"] == 1

    # Re-running the same command skips the finished runs.
    again = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("already finished, skipped") == 6

    c = subprocess.run([sys.executable, "-m", "llm.compare", str(root)], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert c.returncode == 0, c.stderr
    lines = c.stdout.splitlines()
    header = lines[0].split()
    for col in ("run", "eval_loss", "best_loss", "eval_bpb", "best_bpb", "tok/s", "params", "wall_s",
                "positional", "n_kv_heads"):  # fmt: skip
        assert col in header, header
    rows = [line.split() for line in lines[2:8]]
    assert len(rows) == 6 and {row[0] for row in rows} == set(names)
    # Sorted by final held-out loss, every value finite; the differing overrides are shown.
    losses = [float(row[1]) for row in rows]
    assert losses == sorted(losses) and all(math.isfinite(v) for v in losses)
    assert {row[header.index("positional")] for row in rows} == {"learned", "rope", "alibi"}
    png = root / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = json.loads((root / "comparison.json").read_text())
    assert len(table) == 6 and all(row["n_params"] > 0 for row in table)
    # MQA has fewer key/value parameters than MHA; learned positions add a table.
    params = {row["name"]: row["n_params"] for row in table}
    assert params["positional=rope,n_kv_heads=1"] < params["positional=rope,n_kv_heads=4"]
    assert params["positional=learned,n_kv_heads=4"] > params["positional=rope,n_kv_heads=4"]


def test_compare_reads_curves_and_diffs(tmp_path):
    """Summaries from hand-written metrics files: final/best eval, steady tokens/s, differing keys."""
    for name, lr, evals in (
        ("a", 1e-3, [(2, 3.0, 4.0), (4, 2.5, 3.5)]),
        ("b", 2e-3, [(2, 2.8, 3.9), (4, 2.9, 4.1)]),
    ):
        wd = tmp_path / name
        wd.mkdir()
        rows = [{"step": s, "time": 100.0 + s, "loss": 4.0 - s / 10, "tokens_per_sec": tps}
                for s, tps in ((1, 10.0), (2, 1000.0), (3, 1200.0), (4, 1100.0))]  # fmt: skip
        rows += [{"step": s, "eval_loss": loss, "eval_bpb": bpb} for s, loss, bpb in evals]
        rows.append({"step": 4, "eval_loss": evals[-1][1], "eval_bpb": evals[-1][2], "n_params": 123})
        (wd / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (wd / "config.json").write_text(json.dumps({"optim": {"lr": lr}, "model": {"d_model": 64}}))
    runs, text = compare.compare([str(tmp_path / "a"), str(tmp_path / "b")], out=str(tmp_path / "out"))
    a, b = sorted(runs, key=lambda r: r.name)
    assert (a.final_eval_loss, a.best_eval_loss, a.final_eval_bpb, a.best_eval_bpb) == (2.5, 2.5, 3.5, 3.5)
    assert (b.final_eval_loss, b.best_eval_loss, b.best_eval_bpb) == (2.9, 2.8, 3.9)
    assert a.tokens_per_sec == 1100.0  # median after dropping the first (compiling) window
    assert a.wall_s == 3.0 and a.n_params == 123 and a.curves["eval_loss"] == [(2, 3.0), (4, 2.5)]
    assert compare.differing_keys(runs) == ["optim.lr"]
    assert text.splitlines()[0].split()[-1] == "lr" and [r.name for r in runs] == ["a", "b"]
    assert (tmp_path / "out" / "comparison.png").exists()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        compare.find_runs([str(tmp_path / "out")])


def test_compare_metric_columns_and_per_arm_seed_spread(tmp_path):
    """--metrics reads the mean over the last 10% of logged steps; --seeds groups runs that differ
    only in the seed: mean and max - min of final bits/byte per arm."""
    for arm, seed, bpb in (("a", 0, 2.0), ("a", 1, 2.4), ("b", 0, 3.0), ("b", 1, 3.1)):
        wd = tmp_path / f"arm={arm},seed={seed}"
        wd.mkdir()
        rows = [{"step": s, "loss": 1.0, "tokens_per_sec": 100.0 * (seed + 1), "model/m": float(s)}
                for s in range(1, 21)]  # fmt: skip
        rows.append({"step": 20, "eval_loss": bpb, "eval_bpb": bpb})
        (wd / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (wd / "config.json").write_text(
            json.dumps({"optim": {"lr": 1.0 if arm == "a" else 2.0}, "train": {"seed": seed}})
        )
    runs, text = compare.compare([str(tmp_path)], out=str(tmp_path / "out"), metrics=("model/m",), seeds="train.seed",
                                 plot=False)  # fmt: skip
    assert all(r.extra["model/m"] == 19.5 for r in runs)  # last 10% of 20 logged steps: 19, 20
    arms = {a["arm"]: a for a in json.loads((tmp_path / "out" / "arms.json").read_text())}
    assert set(arms) == {"arm=a", "arm=b"}
    assert arms["arm=a"]["eval_bpb"] == pytest.approx(2.2) and arms["arm=a"]["bpb_spread"] == pytest.approx(
        0.4
    )
    assert arms["arm=b"]["bpb_spread"] == pytest.approx(0.1) and arms["arm=b"]["tokens_per_sec"] == 150.0
    assert arms["arm=a"]["model/m"] == 19.5 and "per arm" in text


# ---- evaluation --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run (20 steps) whose final eval used 2 held-out batches of 8."""
    c = tiny.get_config()
    c.train.progress = False
    c.train.steps = 20
    c.checkpoint.every = 0
    wd = str(tmp_path_factory.mktemp("eval") / "run")
    result = train(from_config_dict(c), wd)
    return wd, result


def test_next_line_task_is_deterministic_and_true():
    a = evaluate.next_line_task(n_examples=20, n_choices=4, seed=0)
    b = evaluate.next_line_task(n_examples=20, n_choices=4, seed=0)
    assert a == b and len(a) == 20
    text = open(os.path.join(ROOT, "llm/data/corpora/tinyshakespeare.txt")).read()
    tail = text[int(len(text) * 0.9) - 200 :]
    for ex in a:
        assert len(ex.choices) == 4 and len(set(ex.choices)) == 4
        assert ex.context + ex.choices[ex.gold] + "\n" in tail  # the gold line truly follows the context
        assert sum(ex.context + ch + "\n" in tail for ch in ex.choices) == 1
    assert len({ex.gold for ex in a}) > 1  # the answer position varies
    assert evaluate.next_line_task(n_examples=20, seed=1) != a


def test_word_order_task_shuffles_only_the_true_line():
    a = evaluate.word_order_task(n_examples=20, n_choices=4, seed=0)
    assert a == evaluate.word_order_task(n_examples=20, n_choices=4, seed=0) and len(a) == 20
    text = open(os.path.join(ROOT, "llm/data/corpora/tinyshakespeare.txt")).read()
    tail = text[int(len(text) * 0.9) - 200 :]
    for ex in a:
        gold = ex.choices[ex.gold]
        assert ex.context + gold + "\n" in tail and len(gold.split()) >= 6
        assert len(set(ex.choices)) == 4
        # Every distractor: the same multiset of words, so the same bytes; only the order differs.
        assert all(sorted(ch.split()) == sorted(gold.split()) and len(ch) == len(gold) for ch in ex.choices)
    assert len({ex.gold for ex in a}) > 1
    with pytest.raises(ValueError, match="ask for fewer"):
        evaluate.word_order_task(n_examples=10**6)


def test_multiple_choice_scores_match_a_plain_forward_pass(trained):
    import llm

    run = llm.load(trained[0])
    examples = evaluate.next_line_task(n_examples=5, n_choices=3, context_lines=2, seed=0)
    max_len = run.config.data.seq_len
    pairs = [(ex.context, ch) for ex in examples for ch in ex.choices]
    got = evaluate.score_continuations(run.model, run.params, run.tokenizer, pairs, max_len, batch_size=4)

    # Independent: one unpadded sequence at a time, full-vocab log-softmax in float64.
    want = []
    for ctx, cont in pairs:
        c_ids, x_ids = run.tokenizer.encode(ctx), run.tokenizer.encode(cont)
        c_ids = c_ids[-(max_len + 1 - len(x_ids)) :]
        ids = np.asarray(c_ids + x_ids)
        logits = np.asarray(run.model.apply({"params": run.params}, ids[None, :-1]), np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        want.append(sum(logp[t, ids[t + 1]] for t in range(len(c_ids) - 1, len(ids) - 1)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)  # fp32 vs fp64 sums of ~60 terms

    res = evaluate.multiple_choice(run.model, run.params, run.tokenizer, examples, max_len)
    ll = np.asarray(want).reshape(5, 3)
    assert res["acc"] == np.mean(ll.argmax(1) == [ex.gold for ex in examples])
    n_bytes = np.array([[len(ch.encode()) for ch in ex.choices] for ex in examples])
    assert res["acc_norm"] == np.mean((ll / n_bytes).argmax(1) == [ex.gold for ex in examples])
    probs = np.exp(ll - ll.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose([e["confidence"] for e in res["examples"]], probs.max(1), rtol=1e-4)


def test_expected_calibration_error_hand_example():
    conf = np.array([0.95, 0.88, 0.82, 0.58, 0.52, 0.28, 0.22])
    correct = np.array([1, 1, 0, 1, 0, 0, 1])
    ece, bins = evaluate.expected_calibration_error(conf, correct, n_bins=10)
    # Bins (0.9,1]: {.95} acc 1; (0.8,0.9]: {.88,.82} acc .5; (0.5,0.6]: {.58,.52} acc .5;
    # (0.2,0.3]: {.28,.22} acc .5.  ECE = sum |B|/N * |acc - conf|.
    want = (1 * abs(1 - 0.95) + 2 * abs(0.5 - 0.85) + 2 * abs(0.5 - 0.55) + 2 * abs(0.5 - 0.25)) / 7
    assert ece == pytest.approx(want, abs=1e-12) and want == pytest.approx(1.35 / 7)
    assert [b["count"] for b in bins] == [0, 0, 2, 0, 0, 2, 0, 0, 2, 1]
    assert bins[8]["accuracy"] == 0.5 and bins[8]["confidence"] == pytest.approx(0.85)
    # Calibrated (3 of 4 right at 0.75) and certain-and-right are both 0.
    assert evaluate.expected_calibration_error(np.full(4, 0.75), np.array([1, 1, 1, 0]))[0] == pytest.approx(
        0
    )
    assert evaluate.expected_calibration_error(np.ones(3), np.ones(3))[0] == 0
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        evaluate.expected_calibration_error(np.array([1.5]), np.array([1]))


def test_evaluate_cli_writes_json_and_reliability_png(trained):
    wd, result = trained
    cmd = [
        sys.executable,
        "-m",
        "llm.evaluate",
        f"--workdir={wd}",
        "--eval_sets=heldout,builtin:the-verdict.txt",
        "--max_batches=2",
        "--batch_size=8",
        "--mc_examples=12",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "shakespeare_next_line: 12 questions x 4 choices" in r.stdout and "ECE" in r.stdout
    assert "shakespeare_word_order: 12 questions x 4 choices" in r.stdout
    out = json.loads(open(os.path.join(wd, "eval", "step_20.json")).read())
    held = out["eval_sets"]["heldout"]
    # The same 2 batches of 8 that training's final evaluation scored: the same numbers.
    assert held["loss"] == pytest.approx(result["eval_loss"], rel=1e-5)
    assert held["bits_per_byte"] == pytest.approx(result["eval_bpb"], rel=1e-5)
    assert held["perplexity"] == pytest.approx(math.exp(held["loss"]))
    assert set(out["eval_sets"]) == {"heldout", "the-verdict.txt"}
    mc = out["multiple_choice"]["shakespeare_next_line"]
    assert (
        mc["n"] == 12
        and 0 <= mc["acc"] <= 1
        and 0 <= mc["ece"] <= 1
        and sum(b["count"] for b in mc["bins"]) == 12
    )
    with open(mc["reliability_png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    bad = subprocess.run([sys.executable, "-m", "llm.evaluate", f"--workdir={wd}/missing"], cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "no checkpoint" in bad.stderr


# ---- introspection -----------------------------------------------------------------------------


def _rope_np(x_BTNH, positions_T, theta=10000.0):
    """Rotate channel pairs (i, i + H/2) by position * theta^(-2i/H) (NeoX/Llama layout)."""
    h = x_BTNH.shape[-1]
    ang_TI = positions_T[:, None] * theta ** (-np.arange(0, h, 2) / h)[None]
    cos, sin = np.cos(ang_TI)[None, :, None], np.sin(ang_TI)[None, :, None]
    x1, x2 = x_BTNH[..., : h // 2], x_BTNH[..., h // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


@pytest.mark.parametrize("positional", ["learned", "rope", "alibi"])
def test_captured_attention_is_causal_and_matches_qk_reference(positional):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, max_seq_len=16, positional=positional,
                      attention=AttentionConfig(n_heads=4, n_kv_heads=2))  # fmt: skip
    model = Transformer(cfg)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, 64)
    params = model.init(jax.random.PRNGKey(0), tokens_BT)["params"]
    cap = introspect.capture(model, params, tokens_BT, module_outputs=("query", "key"))
    b, t, n, k, h = 2, 10, 4, 2, 8
    pos = np.arange(t, dtype=np.float64)
    causal = np.tril(np.ones((t, t), bool))
    for layer in range(2):
        probs = cap.attention(layer).astype(np.float64)
        assert probs.shape == (b, n, t, t)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
        assert np.all(probs[..., ~causal] == 0.0)
        # Reference from the captured projections (before any rotation): GQA head i reads kv head i // 2.
        q = np.asarray(cap.values[f"layer_{layer}/attn/query/out"], np.float64)
        kk = np.asarray(cap.values[f"layer_{layer}/attn/key/out"], np.float64)
        if positional == "rope":
            q, kk = _rope_np(q, pos), _rope_np(kk, pos)
        kk = np.repeat(kk, n // k, axis=2)
        scores = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(h)
        if positional == "alibi":
            slopes = 2.0 ** (-8.0 * np.arange(1, n + 1) / n)
            scores += slopes[None, :, None, None] * (pos[None, :] - pos[:, None])[None, None]
        scores = np.where(causal, scores, -np.inf)
        ref = np.exp(scores - scores.max(-1, keepdims=True))
        ref /= ref.sum(-1, keepdims=True)
        np.testing.assert_allclose(probs, ref, atol=1e-6)  # fp32 softmax of O(1) scores
        logits = cap.values[f"layer_{layer}/attn/attn_logits"]
        assert np.all(logits[..., ~causal] <= -1e29)
        np.testing.assert_allclose(logits[..., causal], scores[..., causal], atol=1e-5)
    # heads= / layers= / names= select on the device.
    sel = introspect.capture(model, params, tokens_BT, names=["attn_probs"], layers=[1], heads=[3])
    assert list(sel.values) == ["layer_1/attn/attn_probs"]
    np.testing.assert_array_equal(sel.attention(1), cap.attention(1)[:, 3:4])


def test_capture_and_stats_on_a_sharded_model_match_one_device(trained):
    import llm
    from llm import sharding

    wd, _ = trained
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    sharded, single = llm.load(wd, mesh=mesh), llm.load(wd)
    wq = sharded.params["layer_0"]["attn"]["query"]["kernel"]
    assert len(wq.sharding.device_set) == 8 and not wq.sharding.is_fully_replicated
    tokens_BT = np.asarray([sharded.tokenizer.encode("I had always thought Jack Gisburn rather")[:12]] * 4)
    rules = sharded.config.mesh.rules
    a = introspect.capture(sharded.model, sharded.params, tokens_BT, mesh=mesh, rules=rules)
    ref = introspect.capture(single.model, single.params, tokens_BT)
    assert set(a.values) == set(ref.values) and all(isinstance(v, np.ndarray) for v in a.values.values())
    for key in ref.values:
        np.testing.assert_allclose(a.values[key], ref.values[key], atol=2e-5, err_msg=key)
    s = introspect.stats(sharded.model, sharded.params, tokens_BT, mesh=mesh, rules=rules)
    assert set(s) == {"layer_0/attn", "layer_0/out", "layer_1/attn", "layer_1/out"}
    np.testing.assert_allclose(
        s["layer_1/attn"]["entropy"], introspect.attention_entropy(ref.attention(1)), rtol=1e-4
    )
    np.testing.assert_allclose(s["layer_0/out"]["rms"], np.sqrt(np.mean(ref.residual(0) ** 2)), rtol=1e-4)


def test_capture_splits_scanned_layers_and_uses_einsum_for_fused_attention():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, max_seq_len=16, scan_layers=True,
                      attention=AttentionConfig(n_heads=4, impl="jax"))  # fmt: skip
    model = Transformer(cfg)
    tokens_BT = jnp.ones((1, 6), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), tokens_BT)["params"]
    cap = introspect.capture(model, params, tokens_BT)
    assert sorted(cap.per_layer("attn_probs")) == [0, 1, 2] and cap.residual(2).shape == (1, 6, 32)
    np.testing.assert_allclose(
        cap.logits_BTV, np.asarray(model.apply({"params": params}, tokens_BT)), atol=1e-5
    )


class _ToyRouter(nn.Module):
    """Stands in for a future MoE layer: sows router probabilities like any other kind would."""

    @nn.compact
    def __call__(self, x):
        self.sow("intermediates", "router_probs", jax.nn.softmax(nn.Dense(4, name="router")(x)))
        return x + nn.Dense(x.shape[-1])(x)


class _ToyModel(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, tokens_BT, positions_BT, segment_ids_BT, deterministic=True):
        x = nn.Embed(16, 8)(tokens_BT)
        for i in range(self.cfg.n_layers):
            x = _ToyRouter(name=f"layer_{i}")(x)
        return x


def test_capture_finds_any_sown_value():
    """The mechanism is kind-agnostic: whatever a layer sows comes back under its path."""
    cfg = SimpleNamespace(n_layers=2, scan_layers=False, attention=SimpleNamespace(impl="einsum"))
    model = _ToyModel(cfg)
    tokens_BT = jnp.arange(6)[None]
    params = model.init(jax.random.PRNGKey(0), tokens_BT, None, None)["params"]
    cap = introspect.capture(model, params, tokens_BT, names=["router_probs"])
    assert list(cap.values) == ["layer_0/router_probs", "layer_1/router_probs"]
    assert list(cap.per_layer("router_probs")) == [0, 1]
    np.testing.assert_allclose(cap.values["layer_1/router_probs"].sum(-1), 1.0, atol=1e-6)
    s = introspect.stats(model, params, tokens_BT)
    assert s["layer_0/router_probs"]["mean"] == pytest.approx(0.25, abs=1e-6)
