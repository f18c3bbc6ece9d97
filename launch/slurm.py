"""Train on a SLURM GPU cluster: write an sbatch script that srun's `python -m llm.train` and submit it.

  python -m launch.slurm --nodes=4 --gpus_per_node=8 --partition=gpu --time=24:00:00 -- \\
      --config=configs/pretrain.py:llama-1b --workdir=/shared/runs/llama-1b

--per=gpu (default) starts one process per GPU (JAX picks the GPU from SLURM_LOCALID); --per=node
starts one process per node that drives all its GPUs (JAX_LOCAL_DEVICE_IDS lists them, since JAX's
SLURM detection would otherwise give each process only GPU 0). jax.distributed.initialize() reads
the coordinator, process count and rank from SLURM's variables. `srun --label` prefixes each line
with its task number; --kill-on-bad-exit stops the job when one process fails. SLURM sends SIGTERM
two minutes before the time limit, so the run checkpoints; resubmitting resumes. The workdir must
be on a filesystem all nodes share. --dry-run prints the script and the sbatch command only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from launch import split_train_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def render(a: argparse.Namespace, train_args: list[str]) -> str:
    """The sbatch script text."""
    per_gpu = a.per == "gpu"
    tasks = a.gpus_per_node if per_gpu else 1
    args = [x for x in train_args if not x.startswith("--config.train.distributed")]
    python = a.python or os.path.join(REPO, ".venv", "bin", "python")
    train = shlex.join([python, "-m", "llm.train", *args, "--config.train.distributed=true",
                        "--config.train.progress=false"])  # fmt: skip
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={a.job_name}",
        f"#SBATCH --nodes={a.nodes}",
        f"# one process per {'GPU' if per_gpu else 'node'}",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --gpus-per-node={a.gpus_per_node}",
        f"#SBATCH --cpus-per-task={a.cpus_per_task}",
        f"#SBATCH --time={a.time}",
        f"#SBATCH --output={a.output}",
        "# SIGTERM to every task 2 min before the time limit: the run checkpoints and exits 143",
        "#SBATCH --signal=TERM@120",
    ]
    lines += [f"#SBATCH --partition={a.partition}"] if a.partition else []
    lines += [f"#SBATCH --account={a.account}"] if a.account else []
    lines += ["", "set -euo pipefail", f"cd {shlex.quote(REPO)}"]
    if not per_gpu:
        lines.append(f"export JAX_LOCAL_DEVICE_IDS={','.join(map(str, range(a.gpus_per_node)))}")
    lines += [
        "# Leave XLA's GPU memory pool some room for NCCL and cuDNN workspaces.",
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}",
        f"srun --label --kill-on-bad-exit=1 {train}",
    ]
    return "\n".join(lines) + "\n"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, train_args = split_train_args(argv)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage="%(prog)s [options] -- <llm.train flags>"
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one process per GPU or per node")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--cpus_per_task", type=int, default=8)
    p.add_argument("--job_name", default="llm")
    p.add_argument("--output", default="slurm-%j.out")
    p.add_argument("--python", default=None, help="interpreter on the nodes (default: this repo's .venv)")
    p.add_argument(
        "--script", default=None, help="where to write the sbatch script (default: slurm-<job>.sbatch)"
    )
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print, do not submit")
    a = p.parse_args(argv)
    if not train_args:
        p.error("give the llm.train flags after `--` (at least --config and a shared --workdir)")
    if a.nodes < 1 or a.gpus_per_node < 1:
        p.error("--nodes and --gpus_per_node must be >= 1")
    return a, train_args


def main(argv: list[str] | None = None, out=None) -> int:
    out = out or sys.stdout
    a, train_args = parse(sys.argv[1:] if argv is None else argv)
    script = render(a, train_args)
    path = a.script or f"slurm-{a.job_name}.sbatch"
    submit = ["sbatch", path]
    if a.dry_run:
        print(f"cat > {shlex.quote(path)} <<'EOF'\n{script}EOF", file=out)
        print(shlex.join(submit), file=out)
        return 0
    with open(path, "w") as f:
        f.write(script)
    print(f"wrote {path}\n+ {shlex.join(submit)}", file=out, flush=True)
    return subprocess.run(submit).returncode


if __name__ == "__main__":
    sys.exit(main())
