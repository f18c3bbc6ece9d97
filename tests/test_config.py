"""Bad configuration is rejected before compiling, with messages that name the field and the fix."""

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
    for c in (base.get_config(), shakespeare.get_config(), tiny.get_config(), tiny.get_config("llama")):
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
    with pytest.raises(ConfigError, match=r"data\*fsdp\*tensor = 6 but there are 8 devices"):
        MeshConfig(data=3, fsdp=2, tensor=1).resolved_shape(8)
    with pytest.raises(ConfigError, match=r"do not divide"):
        MeshConfig(data=-1, fsdp=3).resolved_shape(8)
    assert MeshConfig(data=-1, fsdp=2, tensor=2).resolved_shape(8)[0] == (2, 2, 2)
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
