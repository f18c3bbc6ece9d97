"""Train on a Cloud TPU pod slice with gcloud: create it, install the pinned environment on every
worker, run `python -m llm.train` on all workers at once, stream their logs, tear it down.

  python -m launch.tpu_pod all --name=llm-v5p --zone=us-east5-a --accelerator_type=v5p-128 \\
      --queued --spot -- --config=configs/pretrain.py:gpt2-1.5b --workdir=gs://bucket/runs/gpt2-1.5b
  python -m launch.tpu_pod run --name=llm-v5p --zone=us-east5-a -- <llm.train flags>   # re-run = resume
  python -m launch.tpu_pod delete --name=llm-v5p --zone=us-east5-a --queued

Steps: `create` (a TPU VM, or with --queued a queued resource, waiting until ACTIVE; --num_slices>1
makes a multi-slice queued resource), `setup` (ships `git archive HEAD` to every worker and installs
requirements.txt plus jax[tpu] in a venv there), `run` (all workers, each line prefixed with its
host name; jax.distributed.initialize() finds the pod by itself), `logs`, `delete`, or `all`.
Add --dry-run to print every command instead of running it. The workdir should be a gs:// bucket
(or another filesystem every worker shares): Orbax writes one checkpoint from all hosts.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

from launch import split_train_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "llm"  # on each worker, under the ssh user's home
RUNTIME_VERSIONS = {  # default TPU VM software per generation (override with --runtime_version)
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
STEPS = ("create", "setup", "run", "logs", "delete", "all")


def runtime_version(accelerator_type: str) -> str:
    gen = accelerator_type.split("-")[0]
    if gen not in RUNTIME_VERSIONS:
        raise SystemExit(f"error: unknown accelerator type {accelerator_type!r}; expected e.g. v4-32, "
                         f"v5litepod-64, v5p-128, v6e-256 (or pass --runtime_version)")  # fmt: skip
    return RUNTIME_VERSIONS[gen]


class Pod:
    """gcloud command lines for one pod (or, with slices, several nodes of one queued resource)."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.loc = [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])

    @property
    def nodes(self) -> list[str]:
        # Multi-slice queued resources name their nodes <node-prefix>-<i>.
        return (
            [f"{self.a.name}-{i}" for i in range(self.a.num_slices)]
            if self.a.num_slices > 1
            else [self.a.name]
        )

    def create(self) -> list[list[str]]:
        a = self.a
        rt = a.runtime_version or runtime_version(a.accelerator_type)
        kind = ["--spot"] if a.spot else []
        if not a.queued and a.num_slices == 1:
            return [["gcloud", "compute", "tpus", "tpu-vm", "create", a.name, *self.loc,
                     f"--accelerator-type={a.accelerator_type}", f"--version={rt}", *kind]]  # fmt: skip
        nodes = [f"--node-count={a.num_slices}", f"--node-prefix={a.name}"] if a.num_slices > 1 else [
            f"--node-id={a.name}"]  # fmt: skip
        return [["gcloud", "compute", "tpus", "queued-resources", "create", a.name, *self.loc, *nodes,
                 f"--accelerator-type={a.accelerator_type}", f"--runtime-version={rt}", *kind]]  # fmt: skip

    def wait_active(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.a.name, *self.loc,
                "--format=value(state.state)"]  # fmt: skip

    def ssh(self, node: str, command: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *self.loc, "--worker=all",
                f"--command={command}"]  # fmt: skip

    def setup(self, archive: str) -> list[list[str]]:
        install = (
            f"set -e; rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} && tar -xzf ~/llm.tar.gz -C ~/{REMOTE_DIR}"
            f" && cd ~/{REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip"
            f" && .venv/bin/pip install -q -r requirements.txt -e '.[tpu]'"
            f" && .venv/bin/python -c 'import jax; print(jax.device_count(), \"TPU devices\")'"
        )
        cmds = [["git", "-C", REPO, "archive", "--format=tar.gz", "-o", archive, "HEAD"]]
        for node in self.nodes:
            cmds.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{node}:~/llm.tar.gz", *self.loc,
                         "--worker=all"])  # fmt: skip
            cmds.append(self.ssh(node, install))
        return cmds

    def run(self, train_args: list[str]) -> list[list[str]]:
        args = [a for a in train_args if not a.startswith("--config.train.distributed")]
        train = shlex.join([".venv/bin/python", "-m", "llm.train", *args, "--config.train.distributed=true",
                            "--config.train.progress=false"])  # fmt: skip
        # Every worker's lines go to ~/train.log and, prefixed with its host name, to this terminal.
        remote = (f"cd ~/{REMOTE_DIR} && {train} 2>&1 | tee -a ~/train.log | sed -u \"s/^/[$(hostname)] /\"; "
                  f"exit ${{PIPESTATUS[0]}}")  # fmt: skip
        return [self.ssh(node, remote) for node in self.nodes]

    def logs(self) -> list[list[str]]:
        return [self.ssh(node, 'tail -n 50 ~/train.log | sed "s/^/[$(hostname)] /"') for node in self.nodes]

    def delete(self) -> list[list[str]]:
        if self.a.queued or self.a.num_slices > 1:
            return [["gcloud", "compute", "tpus", "queued-resources", "delete", self.a.name, *self.loc,
                     "--force", "--quiet"]]  # fmt: skip
        return [["gcloud", "compute", "tpus", "tpu-vm", "delete", self.a.name, *self.loc, "--quiet"]]


class Runner:
    """Runs (or with --dry-run prints) commands; several at once for multi-slice runs."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run, self.out = dry_run, out or sys.stdout

    def __call__(self, cmds: list[list[str]], parallel: bool = False) -> int:
        if self.dry_run:
            for c in cmds:
                print(shlex.join(c) + (" &" if parallel and len(cmds) > 1 else ""), file=self.out)
            if parallel and len(cmds) > 1:
                print("wait", file=self.out)
            return 0
        if parallel:
            procs = [subprocess.Popen(c) for c in cmds]
            return max((p.wait() for p in procs), default=0)
        for c in cmds:
            print("+ " + shlex.join(c), file=self.out, flush=True)
            code = subprocess.run(c).returncode
            if code:
                return code
        return 0

    def wait_active(self, cmd: list[str], timeout_s: float) -> int:
        """Poll a queued resource until ACTIVE (it may wait for capacity)."""
        if self.dry_run:
            print(f'until [ "$({shlex.join(cmd)})" = ACTIVE ]; do sleep 30; done', file=self.out)
            return 0
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            state = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
            print(f"queued resource state: {state or '?'}", file=self.out, flush=True)
            if state == "ACTIVE":
                return 0
            if state in ("FAILED", "SUSPENDED"):
                return 1
            time.sleep(30)
        return 1


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, train_args = split_train_args(argv)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage="%(prog)s STEP [options] -- <llm.train flags>"
    )
    p.add_argument("step", choices=STEPS)
    p.add_argument("--name", required=True, help="TPU VM / queued resource name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--accelerator_type", default="v5p-8", help="e.g. v4-32, v5litepod-64, v5p-128, v6e-256")
    p.add_argument("--runtime_version", default=None, help="TPU VM software version (default by generation)")
    p.add_argument(
        "--queued", action="store_true", help="create through a queued resource (waits for capacity)"
    )
    p.add_argument(
        "--spot", action="store_true", help="spot capacity: cheaper, preemptible (re-run `run` to resume)"
    )
    p.add_argument("--num_slices", type=int, default=1, help="multi-slice: nodes joined over DCN")
    p.add_argument("--wait_s", type=float, default=6 * 3600, help="how long to wait for a queued resource")
    p.add_argument("--keep", action="store_true", help="with `all`: do not delete the pod at the end")
    p.add_argument(
        "--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the commands only"
    )
    p.add_argument("--allow_dirty", action="store_true",
                   help="ship HEAD even though tracked files have uncommitted changes (they do not travel)")  # fmt: skip
    a = p.parse_args(argv)
    if a.step in ("run", "all") and not train_args:
        p.error("give the llm.train flags after `--` (at least --config and a shared --workdir)")
    return a, train_args


def main(argv: list[str] | None = None, out=None) -> int:
    a, train_args = parse(sys.argv[1:] if argv is None else argv)
    pod, run = Pod(a), Runner(a.dry_run, out)
    archive = f"/tmp/{a.name}-code.tar.gz"
    steps = ["create", "setup", "run"] + ([] if a.keep else ["delete"]) if a.step == "all" else [a.step]
    if "setup" in steps:
        from llm.train.history import git_state  # noqa: PLC0415

        git = git_state()
        if git and git["dirty"] and not a.allow_dirty:
            msg = (f"the work tree has uncommitted changes to tracked files; setup ships `git archive HEAD` "
                   f"({git['commit'][:10]}), so they would not run on the pod: commit them, or pass "
                   f"--allow_dirty to ship HEAD as it is")  # fmt: skip
            if not a.dry_run:
                print(f"error: {msg}", file=sys.stderr)
                return 2
            print(f"WARNING: {msg}", file=sys.stderr)  # (out is the command listing)
    code = 0
    try:
        for step in steps:
            if step == "create":
                code = run(pod.create())
                if not code and (a.queued or a.num_slices > 1):
                    code = run.wait_active(pod.wait_active(), a.wait_s)
            elif step == "setup":
                code = run(pod.setup(archive))
            elif step == "run":
                code = run(pod.run(train_args), parallel=True)
            elif step == "logs":
                code = run(pod.logs())
            elif step == "delete":
                code = run(pod.delete())
            if code:
                print(f"[launch] step {step!r} failed with exit code {code}", file=out or sys.stderr)
                break
    finally:
        # `all` tears the pod down even after a failure, so a crashed run does not keep billing.
        if a.step == "all" and code and not a.keep and "delete" in steps:
            run(pod.delete())
    return code


if __name__ == "__main__":
    sys.exit(main())
