"""AOT compile check: the real train step compiles for TPU topologies without a TPU (libtpu)."""

import subprocess
import sys

import pytest

from launch import aot_check
from tests.test_train import tiny_cfg

needs_libtpu = pytest.mark.skipif(
    not aot_check.libtpu_available(),
    reason="the libtpu wheel is not installed (pip install -e .[aot]); the TPU compiler is needed",
)
TINY = {"model.vocab_size": 320}


@needs_libtpu
def test_tiny_compiles_and_fits_on_v5e():
    report = aot_check.check(
        tiny_cfg(**TINY, **{"mesh.fsdp": 2}), aot_check.parse_topology("v5e:2x2"), log=print
    )
    assert report["compiles"] and report["fits"] and report["backend"] == "tpu"
    assert report["device_kind"] == "TPU v5 lite" and report["mesh"] == {
        "data": 2,
        "fsdp": 2,
        "expert": 1,
        "tensor": 1,
    }
    mem = report["memory_bytes"]
    assert 0 < mem["peak"] < 1024**3 and mem["arguments"] > 0
    assert mem["aliased"] > 0  # the donated train state is updated in place
    assert 0 < report["state_bytes_per_device"] <= mem["arguments"]  # arguments = state + batch shards


@needs_libtpu
def test_multislice_puts_slices_on_dcn():
    report = aot_check.check(tiny_cfg(**TINY), aot_check.parse_topology("v4:2x2x1", num_slices=2), log=print)
    assert report["compiles"] and report["devices"] == 8 and report["device_kind"] == "TPU v4"
    assert report["mesh"] == {
        "data": 8,
        "fsdp": 1,
        "expert": 1,
        "tensor": 1,
    }  # 4 per slice x 2 slices (dcn_data=2)


@needs_libtpu
def test_too_big_does_not_fit(capsys):
    """2M parameters but 4096 x 128 x 32000 fp32 logits: the TPU compiler runs out of 16 GiB HBM."""
    cfg = tiny_cfg(**{"model.vocab_size": 32000, "train.batch_size": 4096, "data.seq_len": 128})
    report = aot_check.check(cfg, aot_check.parse_topology("v5e:2x2"), log=print)
    assert report["fits"] is False
    assert "does not fit" in capsys.readouterr().out


def test_cpu_fallback_and_replication_warning(capsys):
    """fsdp=3 with the embed dimension replicated by the rules (fsdp=3 divides none of d_model 64,
    ffn 256, vocab 320, which is an error unless the rule says so): the state stays whole on every
    device, and the report says so."""
    cfg = tiny_cfg(**TINY, **{"mesh.data": 1, "mesh.fsdp": 3, "train.batch_size": 9, "mesh.rules.embed": ""})
    report = aot_check.check(cfg, aot_check.parse_topology("v5p:3x1x1"), force_cpu=True, log=print)
    assert report["backend"] == "cpu" and report["compiles"] and report["devices"] == 3
    out = capsys.readouterr().out
    assert "via fake CPU devices" in out
    # Another compiler's memory plan: an estimate, never the words of a TPU verdict.
    assert report["verdict"].startswith("CPU estimate") and "not a TPU verdict" in out
    assert ": fits" not in out and "does not fit" not in out
    assert "warning: the train state is split only ~1 ways, not fsdp*tensor = 3" in out


def test_exit_codes_keep_a_cpu_estimate_apart_from_a_tpu_verdict():
    code = lambda **r: aot_check.exit_code({"compiles": True, "fits": True, "backend": "tpu", **r})  # noqa: E731
    assert (code(), code(fits=False), code(fits=False, backend="cpu"), code(backend="cpu")) == (0, 1, 3, 0)
    assert code(compiles=False, fits=None) == 4 and code(compiles=False, fits=False) == 1  # HBM exhausted


def test_slices_go_on_dcn_or_fold_into_fake_devices():
    topo = aot_check.parse_topology("v5e:2x2", num_slices=2)
    mesh = aot_check.with_slices(tiny_cfg(**{"mesh.fsdp": 2}), topo, fake=False).mesh
    assert (mesh.data, mesh.fsdp, mesh.dcn_data, mesh.dcn_fsdp) == (-1, 2, 2, 1)
    mesh = aot_check.with_slices(tiny_cfg(**{"mesh.fsdp": 2}), topo, fake=True).mesh
    assert (mesh.data, mesh.fsdp, mesh.dcn_data) == (4, 2, 1)  # same 8-device mesh, no DCN
    with pytest.raises(ValueError, match="multiply to 4 but --num_slices=2"):
        aot_check.with_slices(tiny_cfg(**{"mesh.dcn_fsdp": 4}), topo, fake=False)


def test_topology_names():
    assert aot_check.parse_topology("v5p:4x4x4").n_devices == 64
    assert aot_check.parse_topology("v5litepod:16x16", num_slices=2).n_devices == 512
    assert aot_check.parse_topology("v6e:8x8").chip.hbm_gib == 32
    with pytest.raises(ValueError, match="v5e topologies have 2 dimensions"):
        aot_check.parse_topology("v5e:4x4x4")
    with pytest.raises(ValueError, match="unknown topology 'v9:2x2'"):
        aot_check.parse_topology("v9:2x2")


def test_cli_reports_bad_topology(repo_root):
    r = subprocess.run([sys.executable, "-m", "launch.aot_check", "--config=configs/tiny.py", "--topology=v5e:4x4x4"],
                       cwd=repo_root, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "v5e topologies have 2 dimensions" in r.stderr


@needs_libtpu
def test_moe_compiles_for_a_tpu_topology_with_an_expert_axis():
    """The mixtral-8x7b report (v5p:4x4x4, fsdp 8 x expert 8) is in the README; CI compiles the tiny
    MoE the same way, experts split over the expert axis."""
    cfg = tiny_cfg("llama", **{**TINY, "model.ffn.kind": "moe", "model.ffn.moe.num_experts": 4,
                               "mesh.data": 1, "mesh.expert": 4})  # fmt: skip
    report = aot_check.check(cfg, aot_check.parse_topology("v5e:2x2"), log=print)
    assert report["compiles"] and report["fits"] and report["mesh"]["expert"] == 4


@needs_libtpu
def test_attention_variants_compile_for_a_tpu_topology():
    """The mistral-7b report (v5p, every layer a 4,096 window) is in the README; CI compiles a tiny
    Gemma-2-style local/global model with QK-norm, soft-capping and sinks, tensor-parallel heads."""
    cfg = tiny_cfg("llama", **{**TINY, "model.attention.pattern": ("local", "causal"),
                               "model.attention.local.window": 16, "model.attention.qk_norm": True,
                               "model.attention.logit_softcap": 50.0, "model.attention.sinks": True,
                               "model.final_logit_softcap": 30.0, "mesh.data": 2, "mesh.tensor": 2})  # fmt: skip
    report = aot_check.check(cfg, aot_check.parse_topology("v5e:2x2"), log=print)
    assert report["compiles"] and report["fits"] and report["mesh"]["tensor"] == 2


def test_optimizer_state_bytes_per_parameter(capsys):
    """AdamW keeps two fp32 moments (8 bytes per parameter), Lion one (4); Adafactor's factored
    second moments are a row and a column per matrix (~1 byte per parameter in this tiny model,
    vectors included)."""
    per = {}
    for name in ("adamw", "lion", "adafactor"):
        cfg = tiny_cfg(**TINY, **{"optim.name": name, "optim.adafactor.min_dim_size_to_factor": 32})
        per[name] = aot_check.check(cfg, aot_check.parse_topology("v5e:2x2"), force_cpu=True)[
            "opt_state_bytes_per_param"
        ]
    assert per["adamw"] == pytest.approx(8.0, abs=0.01) and per["lion"] == pytest.approx(4.0, abs=0.01)
    assert per["adafactor"] < per["adamw"] / 5
    assert "optimizer state (adafactor):" in capsys.readouterr().out
