"""Bad configuration is rejected before compiling, with messages that name the field and the fix."""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import base, shakespeare, tiny
from llm.config import ConfigError, from_config_dict
from llm.sharding import MeshConfig


def cfg_with(**overrides):
    c = tiny.get_config()
    for path, value in overrides.items():
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def test_defaults_convert():
    for c in (
        base.get_config(),
        shakespeare.get_config(),
        shakespeare.get_config("gpt2"),
        tiny.get_config(),
        tiny.get_config("llama"),
    ):
        from_config_dict(c)


def test_unknown_key_has_did_you_mean():
    d = tiny.get_config().to_dict()
    d["model"]["positionl"] = "rope"
    with pytest.raises(ConfigError, match=r"unknown config key 'model.positionl'.*Did you mean 'positional'"):
        from_config_dict(d)


@pytest.mark.parametrize(
    "field,value,expect",
    [
        ("model.positional", "rotary", r"valid choices: alibi, learned, none, rope, sinusoidal"),
        ("model.norm", "batchnorm", r"unknown norm 'batchnorm'.*layernorm, rmsnorm"),
        ("model.mlp", "swishglu", r"Did you mean 'swiglu'"),
        ("model.remat", "everything", r"valid choices: attention_out, dots, dots_no_batch, full, none"),
        ("model.norm_position", "middle", r"model.norm_position.*pre, post"),
        ("model.attention.impl", "flash", r"einsum, fused, jax"),
        ("data.tokenizer.kind", "bpe", r"sentencepiece, byte"),
        ("train.nan_policy", "ignore", r"stop, skip"),
    ],
)
def test_unknown_variant_lists_choices(field, value, expect):
    with pytest.raises(ConfigError, match=expect):
        from_config_dict(cfg_with(**{field: value}))


@pytest.mark.parametrize(
    "overrides,expect",
    [
        ({"model.d_model": 66}, r"d_model=66 is not divisible by model.attention.n_heads=4"),
        ({"model.attention.n_kv_heads": 3}, r"n_heads=4 is not divisible by model.attention.n_kv_heads=3"),
        ({"data.seq_len": 512}, r"data.seq_len=512 exceeds model.max_seq_len=128"),
        ({"train.grad_accum": 3}, r"train.batch_size=8 is not divisible by train.grad_accum=3"),
    ],
)
def test_shapes_that_do_not_divide(overrides, expect):
    with pytest.raises(ConfigError, match=expect):
        from_config_dict(cfg_with(**overrides))


def test_wrong_type_is_rejected():
    d = tiny.get_config().to_dict()
    d["train"]["steps"] = "many"
    with pytest.raises(ConfigError, match=r"'train.steps' must be int"):
        from_config_dict(d)


def test_mesh_sizes_vs_devices():
    with pytest.raises(ConfigError, match=r"data\*fsdp\*expert\*tensor = 6 but there are 8 devices"):
        MeshConfig(data=3, fsdp=2, tensor=1).resolved_shape(8)
    with pytest.raises(ConfigError, match=r"do not divide"):
        MeshConfig(data=-1, fsdp=3).resolved_shape(8)
    assert MeshConfig(data=-1, fsdp=2, tensor=2).resolved_shape(8)[0] == (
        2,
        2,
        1,
        2,
    )  # data fsdp expert tensor
    with pytest.raises(ConfigError, match=r"unknown mesh axis 'tensr'"):
        MeshConfig(rules={"embed": "tensr"})


def test_cli_rejects_typos_before_compiling(repo_root, tmp_path):
    """The real command line: a typo in a flag path or a value fails at once, naming the fix."""
    cmd = [sys.executable, "-m", "llm.train", "--config=configs/tiny.py", f"--workdir={tmp_path}/w"]
    r = subprocess.run(cmd + ["--config.model.positinal=rope"], cwd=repo_root, capture_output=True, text=True)
    assert r.returncode != 0 and "Did you mean" in r.stderr and "positional" in r.stderr
    r = subprocess.run(cmd + ["--config.model.positional=rop"], cwd=repo_root, capture_output=True, text=True)
    assert r.returncode == 2 and "valid choices: alibi, learned, none, rope, sinusoidal" in r.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


# ---- one config truth: fields <-> flags ---------------------------------------------------------


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "rules":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_every_dataclass_field_is_a_flag_and_every_flag_a_field():
    from llm.config import RunConfig, field_paths

    flags = _flat(base.get_config().to_dict())
    fields = field_paths()
    assert sorted(flags) == sorted(fields), set(flags) ^ set(fields)
    # ... with the dataclass defaults (base.py holds no default of its own)
    assert from_config_dict(base.get_config()) == RunConfig()
    rules = base.get_config().mesh.rules.to_dict()
    assert rules == dict(RunConfig().mesh.rules) and rules  # every logical axis is a flag too


def _cli(repo_root, *args, module="llm.train"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=repo_root, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--config.train.stpes=8"], "train has no field 'stpes'. Did you mean 'steps'?"),
        (["--config.trian.steps=8"], "the config has no field 'trian'. Did you mean 'train'?"),
        (["--config.model.d_model=1.5"], "flag --config.model.d_model=1.5: invalid literal for int()"),
        (
            ["--config.model.positional=rop"],
            "valid choices: alibi, learned, none, rope, sinusoidal. Did you mean 'rope'?",
        ),
        (["--config.model.d_model=66"], "model.d_model=66 is not divisible by model.attention.n_heads=4"),
        (["--config=configs/nope.py"], "cannot load the config file: [Errno 2] No such file or directory"),
        (["--config=configs/pretrain.py:gpt3"], "unknown preset 'gpt3'; valid: gpt2-124m"),
    ],
)
def test_config_errors_are_one_line_and_exit_2(repo_root, tmp_path, args, expect):
    """Through the real command line: one line on stderr, no traceback, exit status 2, nothing written."""
    r = _cli(repo_root, "--config=configs/tiny.py", f"--workdir={tmp_path}/w", *args)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_aot_check_config_errors_are_one_line(repo_root):
    r = _cli(repo_root, "--config=configs/pretrain.py:gpt2-124m", "--topology=v5p:2x2x1",
             "--config.train.stpes=3", module="launch.aot_check")  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: unknown config flag --config.train.stpes: train has no field 'stpes'. Did you mean 'steps'?"
    ]


# A non-default value for every flag the README's flag table names (the test fails when the table
# gains a flag this map lacks): each is parsed by the real CLI and must reach the resolved config.
README_FLAG_VALUES = {
    "model.positional": "rope", "model.rope_theta": 500000.0, "model.norm": "rmsnorm", "model.norm_eps": 1e-6,
    "model.norm_position": "post", "model.mlp": "swiglu", "model.d_ff": 96, "model.attention.n_heads": 8,
    "model.attention.n_kv_heads": 2, "model.attention.impl": "einsum", "model.attention.query_block": 64,
    "model.use_bias": False,
    "model.tie_embeddings": False, "model.dropout": 0.1, "model.attention.dropout": 0.05,
    "model.dtype": "bfloat16", "model.param_dtype": "bfloat16", "model.matmul_dtype": "bfloat16",
    "model.d_model": 128, "model.n_layers": 3, "model.max_seq_len": 96, "model.scan_layers": True,
    "model.remat": "full", "train.steps": 7, "train.batch_size": 16, "train.grad_accum": 2,
    "train.eval_every": 3, "train.log_every": 2, "train.nan_policy": "skip", "train.spike_window": 8,
    "train.spike_sigmas": 4.0, "data.corpus": "builtin:tinyshakespeare.txt",
    "data.eval_corpus": "builtin:the-verdict.txt", "data.eval_fraction": 0.2, "data.seq_len": 48,
    "data.tokenizer.kind": "byte", "data.tokenizer.vocab_size": 512, "data.tokenizer.model_type": "unigram",
    "data.tokenizer.byte_fallback": False, "data.tokenizer.path": "/tmp/sp.model", "optim.lr": 3e-4,
    "optim.warmup_steps": 3, "optim.min_lr_ratio": 0.05, "optim.weight_decay": 0.05,
    "optim.decay_embeddings": True, "optim.decay_norms_and_biases": True, "optim.clip_norm": 0.5,
    "checkpoint.every": 5, "checkpoint.keep": 2, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
    "mesh.dcn_data": 2, "mesh.rules.embed": "fsdp,tensor", "mesh.expert": 2,
    "model.attention.kind": "causal", "model.attention.pattern": ("causal", "causal"), "model.ffn.kind": "moe",
    "train.init_from": "/tmp/some/run:200", "train.task": "dpo", "data.kind": "classification",
    "data.tokenizer.special_tokens": ("<pause>",), "optim.groups": ("^embed/: frozen", "attn: lr_mult=2 decay=false"),
    "model.ffn.moe.num_experts": 4, "model.ffn.moe.top_k": 1, "model.ffn.moe.every": 2,
    "model.ffn.moe.first_dense": 1, "model.ffn.moe.shared_experts": 1, "model.ffn.moe.expert_d_ff": 48,
    "model.ffn.moe.router": "sigmoid", "model.ffn.moe.router_jitter": 0.01, "model.ffn.moe.capacity_factor": 1.25,
    "model.ffn.moe.impl": "dense", "model.ffn.moe.aux_loss_weight": 0.02, "model.ffn.moe.z_loss_weight": 0.0005,
    "model.ffn.moe.bias_balancing_rate": 0.001,
    "model.attention.local.window": 32, "model.attention.nope_every": 3, "model.attention.qk_norm": True,
    "model.attention.logit_softcap": 50.0, "model.attention.sinks": True, "model.attention.mla.q_lora_rank": 32,
    "model.attention.mla.kv_lora_rank": 24, "model.attention.mla.qk_nope_head_dim": 16,
    "model.attention.mla.qk_rope_head_dim": 8, "model.attention.mla.v_head_dim": 16, "model.attention.mla.absorb": True,
    "model.final_logit_softcap": 30.0, "model.monitor_logits": True,
    "model.attention.infini.segment_len": 16, "model.attention.infini.update_rule": "delta",
    "model.attention.infini.gate_init": -1.0, "model.attention.infini.memory_positional": True,
    "model.attention.infini.first_segment": "eps", "model.attention.infini.bptt_segments": 2,
    "model.attention.infini.chunk_segments": 2, "model.rope_scaling.kind": "llama3", "model.rope_scaling.factor": 4.0,
    "model.rope_scaling.low_freq_factor": 2.0, "model.rope_scaling.high_freq_factor": 8.0,
    "model.rope_scaling.original_max_len": 64, "model.lora.rank": 4, "model.lora.alpha": 8.0,
    "model.lora.dropout": 0.1, "model.lora.targets": ("all_linear",), "model.lora.base_quant": "int8",
    "model.head": "classifier", "model.n_classes": 3, "model.pool": "mean",
    "data.classification.labels": ("ham", "spam"), "data.classification.split": (0.8, 0.1, 0.1),
    "data.classification.balanced": True, "data.classification.label_field": "y",
    "train.dpo_beta": 0.2, "data.instructions.template": "phi3", "data.instructions.prompt_loss": True,
    "data.instructions.split": (0.8, 0.1, 0.1), "data.preference_split": (0.9, 0.1), "data.pause.rate": 0.05,
    "data.pause.k": 2,
    "optim.name": "lion", "optim.schedule": "wsd", "optim.wsd.decay_fraction": 0.3, "optim.wsd.decay_shape": "sqrt",
    "optim.b1": 0.8, "optim.b2": 0.9, "optim.eps": 1e-6,
    "optim.muon.momentum": 0.9, "optim.muon.nesterov": False, "optim.muon.ns_steps": 4,
    "optim.muon.consistent_rms": 0.0, "optim.muon.lr_ratio": 20.0, "optim.lion.b1": 0.95, "optim.lion.b2": 0.98,
    "optim.adafactor.decay_rate": 0.7, "optim.adafactor.min_dim_size_to_factor": 64,
    "optim.adafactor.clipping_threshold": 0.5, "optim.adafactor.momentum": 0.9,
    "optim.adafactor.multiply_by_parameter_scale": True,
    # (with train.task=dpo / data.kind=classification above: the values that leave them off)
    "train.z_loss": 0.0, "data.path": "", "data.mixture": (), "data.eval_path": "",
    "train.allow_schedule_change": True, "checkpoint.ocdbt": False,
}  # fmt: skip


def readme_flags(repo_root) -> set[str]:
    """Dotted config paths named in the README's flag table (`mesh.dcn_*`, `<logical>` made concrete)."""
    text = open(os.path.join(repo_root, "README.md"), encoding="utf-8").read()
    table = text.split("## Configuration and flags", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| `")]
    names = set()
    for row in rows:
        for name in re.findall(r"`([a-z_]+\.[a-z_.*<>]+)`", row):
            name = name.replace("dcn_*", "dcn_data").replace("<logical>", "embed")
            if name.split(".")[0] in ("model", "data", "train", "optim", "checkpoint", "mesh"):
                names.add(name)
    return names


def test_every_readme_flag_parses_through_the_real_cli(repo_root, tmp_path):
    names = readme_flags(repo_root)
    assert len(names) > 40 and "train.spike_window" in names
    assert names <= set(README_FLAG_VALUES), f"add values for {sorted(names - set(README_FLAG_VALUES))}"
    args = [f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in README_FLAG_VALUES.items()
            if k in names]  # fmt: skip
    assert "--config.optim.groups=('^embed/: frozen', 'attn: lr_mult=2 decay=false')" in args
    r = _cli(repo_root, "--config=configs/tiny.py", f"--workdir={tmp_path}/w", "--print_config", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    resolved = json.loads(r.stdout)
    for name in names:
        node = resolved
        for part in name.split("."):
            node = node[part]
        want = README_FLAG_VALUES[name]
        assert node == (list(want) if isinstance(want, tuple) else want), (name, node)
    assert not (tmp_path / "w").exists()


def test_spike_window_works_from_the_command_line(repo_root, tmp_path):
    """Was documented but unreachable (AttributeError): now a run with it trains and logs spikes."""
    r = _cli(repo_root, "--config=configs/tiny.py", f"--workdir={tmp_path}/w", "--config.train.steps=4",
             "--config.train.spike_window=2", "--config.train.log_every=2", "--config.train.eval_every=0",
             "--config.train.progress=false")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    assert "spikes_total" in rows[0]


def test_print_config_needs_no_workdir_but_training_does(repo_root):
    r = _cli(repo_root, "--config=configs/tiny.py", "--print_config", "--config.model.attention.kind=local")
    assert r.returncode == 0 and json.loads(r.stdout)["model"]["attention"]["kind"] == "local"
    r = _cli(repo_root, "--config=configs/tiny.py")
    assert r.returncode != 0 and "--workdir is required" in r.stderr


def test_aot_check_has_help_and_a_missing_topology_is_one_line(repo_root):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "launch.aot_check", *a], cwd=repo_root, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)  # fmt: skip
    h = run("--help")
    assert h.returncode == 0 and "--topology" in h.stdout and "Traceback" not in h.stderr
    m = run("--config=configs/tiny.py")
    assert m.returncode == 2 and m.stderr.strip().count("\n") == 0 and "topology" in m.stderr


@pytest.mark.parametrize("config", ["finetune/sms_spam.py:lora", "finetune/instructions.py", "finetune/dpo.py",
                                    "infini_passkey.py:local"])  # fmt: skip
def test_task_configs_resolve_through_the_real_cli(repo_root, tmp_path, config):
    """In a fresh process (no test module has imported the data sources or tasks yet)."""
    r = _cli(repo_root, f"--config=configs/{config}", f"--workdir={tmp_path}/w", "--print_config")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["train"]["task"] in ("lm", "classify", "dpo")
