"""Keep freed host memory mapped, so XLA:CPU's per-step buffers are not page-faulted in every step.

XLA:CPU allocates each execution's temporaries as one block with posix_memalign on a worker
thread and frees it when the step ends. With glibc's defaults that block (hundreds of MB for a
small GPT: 567 MB per device for the 12M benchmark config) is mmap-ed and munmap-ed every step:
worker threads use per-thread arenas, which cannot hold blocks over 64 MB and fall back to mmap,
and a freed mmap-ed block goes back to the kernel. Every page is then faulted in again on first
touch: 290k minor faults and ~0.45 CPU-s of kernel time per step of that config, a quarter of
its CPU time (benchmarks/README.md).

`keep_freed_memory()` sets three glibc malloc options at run time (mallopt, the same knobs as
the MALLOC_ARENA_MAX / MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_ environment variables):
one arena for all threads (the main heap has no 64 MB limit), no mmap for large blocks, and no
trimming of the heap's free top. A freed step buffer stays mapped and the next step reuses it.
The costs: the process keeps its peak heap resident until it exits (peak RSS +24-31% in the
benchmarks, then flat), and all threads share one malloc lock, which slows XLA's multi-threaded
compile (default config: first step 7.2 s instead of 4.7 s cold); steps are 27-107% faster.

Must run before the threads that allocate (XLA's, when JAX creates its CPU backend) first call
malloc: threads keep the arena they started with. No dependency on jax, so the PyTorch reference
of the benchmarks can apply the identical setting. Off glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

ENV_SWITCH = "LLM_KEEP_FREED_MEMORY"  # "1" always, "0" never, unset: on hosts without accelerators


def wanted(environ=os.environ) -> bool:
    """Whether llm.runtime.configure_cpu applies it: on CPU-only hosts unless switched off.

    Accelerator hosts are left alone (their step buffers live on the device, and a single arena
    could contend with many input-pipeline threads on a large host).
    """
    switch = environ.get(ENV_SWITCH, "")
    if switch in ("0", "1"):
        return switch == "1"
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0"))


def keep_freed_memory() -> bool:
    """Apply the settings above; True if they took effect (Linux with glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success. The trim threshold is a size_t inside glibc: -1 means "never".
    return all(
        mallopt(opt, value) == 1
        for opt, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    )
