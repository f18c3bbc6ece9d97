"""Run a multi-host job on one machine: P processes, each with its own fake CPU devices.

  python -m launch.local_multiprocess --processes=2 --devices_per_process=4 -- \\
      --config=configs/tiny.py --workdir=/tmp/mp --config.mesh.data=2 --config.mesh.fsdp=4

Each process runs `python -m llm.train <args> --config.train.distributed=true` with
JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>, JAX_NUM_PROCESSES, JAX_PROCESS_ID and
XLA_FLAGS=--xla_force_host_platform_device_count=N, exactly as hosts of a pod would join one
jax.distributed job. Output lines are prefixed `[p<i>]`. If any process fails the others are
stopped (a lone survivor would hang in its next collective) and the first failing exit code is
returned; SIGTERM/SIGINT are forwarded so preemption saves a checkpoint as on a real pod.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
GRACE_S = 20.0  # after a failure, how long the other processes get to exit before SIGKILL
SIGNAL_GRACE_S = 120.0  # after a forwarded SIGTERM/SIGINT and a first exit, how long the rest get
PREEMPTED = (128 + signal.SIGTERM, 128 + signal.SIGINT)  # llm.train's "checkpoint saved" exits


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], process_id: int, num_processes: int, devices: int, port: int) -> dict:
    """Environment of one process: its own fake CPU devices and its place in the job."""
    env = dict(base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    env["JAX_NUM_PROCESSES"] = str(num_processes)
    env["JAX_PROCESS_ID"] = str(process_id)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_command(train_args: list[str], python: str = sys.executable) -> list[str]:
    args = [a for a in train_args if not a.startswith("--config.train.distributed")]
    return [python, "-m", "llm.train", *args, "--config.train.distributed=true"]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()
    stream.close()


def launch(
    train_args: list[str], processes: int = 2, devices_per_process: int = 4, port: int | None = None,
    dry_run: bool = False, out=None, cwd: str = REPO,
) -> int:  # fmt: skip
    """Start the processes, stream their prefixed output, return 0 or the first failure's code."""
    out = out or sys.stdout
    port = port or free_port()
    cmd = train_command(train_args)
    envs = [process_env(dict(os.environ), i, processes, devices_per_process, port) for i in range(processes)]
    if dry_run:
        for env in envs:
            assigns = " ".join(f"{k}={shlex.quote(env[k])}" for k in JOB_ENV)
            print(f"{assigns} {shlex.join(cmd)} &", file=out)
        print("wait", file=out)
        return 0

    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for i, env in enumerate(envs):
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # fmt: skip
        procs.append(p)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out), daemon=True)
        t.start()
        pumps.append(t)

    forwarded: list[int] = []

    def forward(signum, frame):
        forwarded.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failed: int | None = None
    deadline = None
    try:
        while any(p.poll() is None for p in procs):
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            preempted = any(c in PREEMPTED for c in codes)
            if (forwarded or preempted) and any(c is not None for c in codes) and deadline is None:
                # After a signal (forwarded, or sent to one process: JAX's preemption sync point
                # stops all of them at the same step) every process saves its part of the
                # checkpoint and exits 143/130 on its own; one that has not within the grace
                # period is stuck.
                deadline = time.time() + SIGNAL_GRACE_S
            elif bad and failed is None and not forwarded and not preempted:
                i, failed = bad[0]
                out.write(f"[launch] process {i} exited with {failed}; stopping the others\n")
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                deadline = time.time() + GRACE_S
            if deadline is not None and time.time() > deadline:
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for t in pumps:
        t.join(timeout=5)
    codes = [p.returncode for p in procs]
    if failed is None:
        failed = next((c for c in codes if c != 0), 0)
    out.write(f"[launch] exit codes {codes}\n")
    out.flush()
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [options] -- <llm.train flags>")  # fmt: skip
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the commands instead of running them")  # fmt: skip
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    a = parser.parse_args(argv)
    train_args = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    if a.processes < 1 or a.devices_per_process < 1:
        parser.error("--processes and --devices_per_process must be >= 1")
    return launch(train_args, a.processes, a.devices_per_process, a.port, a.dry_run)


if __name__ == "__main__":
    sys.exit(main())
