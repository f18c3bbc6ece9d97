"""Cloud TPU pod and SLURM launchers in --dry-run mode: the exact commands they would run."""

import io
import shlex

import pytest

from launch import slurm, tpu_pod

TRAIN = ["--", "--config=configs/pretrain.py:gpt2-1.5b", "--workdir=gs://bucket/run"]


def dry(module, argv: list[str]) -> list[str]:
    """Printed lines of a dry run (--dry-run goes before `--`: after it, it is an llm.train flag)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    out = io.StringIO()
    assert module.main([*argv[:cut], "--dry-run", *argv[cut:]], out=out) == 0
    return out.getvalue().splitlines()


def test_tpu_pod_all_queued_spot():
    lines = dry(tpu_pod, ["all", "--name=pod", "--zone=us-east5-a", "--project=proj", "--accelerator_type=v5p-128",
                          "--queued", "--spot", *TRAIN])  # fmt: skip
    loc = "--zone=us-east5-a --project=proj"
    assert lines[0] == (f"gcloud compute tpus queued-resources create pod {loc} --node-id=pod "
                        f"--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --spot")  # fmt: skip
    assert lines[1].startswith('until [ "$(gcloud compute tpus queued-resources describe pod')
    assert lines[1].endswith(" = ACTIVE ]; do sleep 30; done")
    assert lines[2].startswith("git -C ")
    assert lines[2].endswith("archive --format=tar.gz -o /tmp/pod-code.tar.gz HEAD")  # the committed code
    scp = f"gcloud compute tpus tpu-vm scp /tmp/pod-code.tar.gz 'pod:~/llm.tar.gz' {loc} --worker=all"
    assert lines[3] == scp
    setup = shlex.split(lines[4])
    assert setup[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in setup
    assert "pip install -q -r requirements.txt -e '.[tpu]'" in setup[-1]  # the pinned versions + jax[tpu]
    run = shlex.split(lines[5])
    assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in run
    remote = run[-1].removeprefix("--command=")
    assert (".venv/bin/python -m llm.train --config=configs/pretrain.py:gpt2-1.5b --workdir=gs://bucket/run "
            "--config.train.distributed=true") in remote  # fmt: skip
    assert 'sed -u "s/^/[$(hostname)] /"' in remote and "exit ${PIPESTATUS[0]}" in remote
    assert lines[6] == f"gcloud compute tpus queued-resources delete pod {loc} --force --quiet"
    assert len(lines) == 7


def test_tpu_pod_single_vm_and_multislice():
    lines = dry(tpu_pod, ["create", "--name=p", "--zone=z", "--accelerator_type=v4-32"])
    assert lines == ["gcloud compute tpus tpu-vm create p --zone=z --accelerator-type=v4-32 "
                     "--version=tpu-ubuntu2204-base"]  # fmt: skip
    lines = dry(tpu_pod, ["delete", "--name=p", "--zone=z"])
    assert lines == ["gcloud compute tpus tpu-vm delete p --zone=z --quiet"]
    lines = dry(tpu_pod, ["create", "--name=p", "--zone=z", "--accelerator_type=v6e-256", "--num_slices=2"])
    assert "queued-resources create p --zone=z --node-count=2 --node-prefix=p " in lines[0]
    assert "--runtime-version=v2-alpha-tpuv6e" in lines[0]
    lines = dry(tpu_pod, ["run", "--name=p", "--zone=z", "--num_slices=2", *TRAIN])
    assert [shlex.split(x)[5] for x in lines[:2]] == ["p-0", "p-1"]  # every slice's workers, at once
    assert lines[0].endswith(" &") and lines[1].endswith(" &") and lines[2] == "wait"


def test_tpu_pod_errors():
    with pytest.raises(SystemExit):
        tpu_pod.main(["run", "--name=p", "--zone=z", "--dry-run"])  # no llm.train flags
    with pytest.raises(SystemExit, match="unknown accelerator type"):
        dry(tpu_pod, ["create", "--name=p", "--zone=z", "--accelerator_type=v9-8"])


def test_tpu_pod_refuses_a_dirty_tree(monkeypatch, capsys):
    """`git archive HEAD` would silently ship the last commit, not the edited files."""
    from llm.train import history

    monkeypatch.setattr(history, "git_state", lambda: {"commit": "0123456789abcdef", "dirty": True})
    ran = []
    monkeypatch.setattr(tpu_pod.Runner, "__call__", lambda self, cmds, parallel=False: ran.append(cmds) or 0)
    assert tpu_pod.main(["setup", "--name=p", "--zone=z"]) == 2
    assert "uncommitted changes" in capsys.readouterr().err and not ran
    assert tpu_pod.main(["setup", "--name=p", "--zone=z", "--allow_dirty"]) == 0 and ran


@pytest.mark.parametrize("per", ["gpu", "node"])
def test_slurm_script(per):
    lines = dry(slurm, ["--nodes=4", "--gpus_per_node=8", f"--per={per}", "--partition=gpu", "--time=2:00:00",
                        "--script=/tmp/job.sbatch", *TRAIN])  # fmt: skip
    assert lines[0] == "cat > /tmp/job.sbatch <<'EOF'" and lines[-2] == "EOF"
    assert lines[-1] == "sbatch /tmp/job.sbatch"
    script = lines[1:-2]
    assert script[0] == "#!/bin/bash"
    for directive in ("--nodes=4", f"--ntasks-per-node={8 if per == 'gpu' else 1}", "--gpus-per-node=8",
                      "--partition=gpu", "--time=2:00:00", "--signal=TERM@120"):  # fmt: skip
        assert f"#SBATCH {directive}" in script
    # One process per node must see all 8 GPUs; per GPU, JAX picks SLURM_LOCALID's.
    assert ("export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in script) == (per == "node")
    srun = script[-1]
    assert srun.startswith("srun --label --kill-on-bad-exit=1 ")
    assert srun.endswith("-m llm.train --config=configs/pretrain.py:gpt2-1.5b --workdir=gs://bucket/run "
                         "--config.train.distributed=true --config.train.progress=false")  # fmt: skip


def test_slurm_needs_train_flags():
    with pytest.raises(SystemExit):
        slurm.main(["--nodes=2", "--dry-run"])
