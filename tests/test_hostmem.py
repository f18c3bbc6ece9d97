"""llm/hostmem.py: with the CPU runtime defaults, a step's large buffers are reused, not re-faulted."""

import os
import subprocess
import sys

import pytest

from llm import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted step with a 64 MiB intermediate (a matmul's result, the input of another):
# glibc serves a block that size with mmap and returns it to the kernel on free, unless told otherwise.
PROBE = """
import resource, sys
from llm import runtime
print("applied", runtime.configure_cpu())
import jax, jax.numpy as jnp

@jax.jit
def step(a, b, c):
    y = a @ b  # [4096, 4096] f32: the second matmul needs it in memory
    return (y @ c).sum()

a, b, c = jnp.ones((4096, 64)), jnp.ones((64, 4096)), jnp.ones((4096, 8))
for _ in range(3):
    step(a, b, c).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step(a, b, c).block_until_ready()
print("faults_per_step", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5)
"""


def _probe(switch: str) -> tuple[bool, float]:
    env = {**os.environ, hostmem.ENV_SWITCH: switch, "LLM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout  # fmt: skip
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    return lines["applied"] == "True", float(lines["faults_per_step"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_step_buffers_are_not_page_faulted_every_step():
    applied_off, faults_off = _probe("0")
    applied_on, faults_on = _probe("1")
    assert not applied_off and applied_on
    # 64 MiB = 16,384 pages of 4 KiB: faulted in again each step without the setting.
    assert faults_off > 10_000, faults_off
    assert faults_on < 500, faults_on


def test_switch_and_platform_decide_where_it_applies():
    assert hostmem.wanted({hostmem.ENV_SWITCH: "1", "JAX_PLATFORMS": "tpu"})
    assert not hostmem.wanted({hostmem.ENV_SWITCH: "0", "JAX_PLATFORMS": "cpu"})
    assert hostmem.wanted({"JAX_PLATFORMS": "cpu"})
    assert not hostmem.wanted({"JAX_PLATFORMS": "cuda,cpu"})
