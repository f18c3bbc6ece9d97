"""Shared helpers for the benchmarks: named model shapes, analytic FLOPs, CPU-load checks, workers.

Each framework runs in its own worker process (one JSON command per line on stdin, one JSON reply
per line on stdout), so the parent can interleave JAX and PyTorch blocks in one run, give each its
own XLA_FLAGS / thread settings, and read each one's own peak RSS.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def write_results(stem: str, data, md: str | None = None) -> None:
    """<RESULTS>/<stem>.json (and .md when given, also printed); an absolute stem goes there."""
    os.makedirs(os.path.dirname(os.path.join(RESULTS, stem)), exist_ok=True)
    with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
        json.dump(data, f, indent=1)
    if md is not None:
        with open(os.path.join(RESULTS, stem + ".md"), "w") as f:
            f.write(md)
        print("\n" + md)


def host() -> dict:
    """The CPU every number was measured on: model name, cores this process may use, vector ISA
    (the same reading runs.jsonl records: llm.train.history.cpu_isa)."""
    from llm.train.history import cpu_isa  # noqa: PLC0415

    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                key, _, value = ln.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    # The model name alone does not tell CPU generations apart ("AMD EPYC" was both a Zen 4, whose
    # AVX-512 runs on 256-bit units, and a newer host with 2.5x its matmul rate per core).
    return {
        "cpu": info.get("model name", "unknown"),
        "family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "cores": len(os.sched_getaffinity(0)),
        "isa": cpu_isa(),
    }


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model and batch, tied embeddings. layout `gpt2`: learned positions, pre-LayerNorm, GELU
    MLP, biases; `llama` (the default recipe's): RoPE, RMSNorm, SwiGLU (d_ff 8/3 d), no biases."""

    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    vocab: int
    batch: int
    steps_per_block: int  # optimizer steps in one timed block (a block should take a few seconds)
    layout: str = "gpt2"


CONFIGS: dict[str, Shape] = {
    # The 12.3M GPT of the issue (nanoGPT-style reference measured outside the project).
    "gpt12m": Shape(384, 6, 6, 256, 4096, 16, 4),
    # configs/shakespeare.py: the project's default run (vocab = its 2048-piece tokenizer).
    "shakespeare": Shape(256, 4, 4, 256, 2048, 16, 6, layout="llama"),
    # ~100M: GPT-2 small width and depth with a 16k vocabulary.
    "gpt100m": Shape(768, 12, 12, 256, 16384, 8, 2),
    # --quick: checks that everything runs, in seconds.
    "tiny": Shape(64, 2, 4, 64, 512, 8, 3),
}


def train_flops_per_token(shape: Shape) -> float:
    """Analytic training FLOPs per token, 6*N + 12*L*T*D, from llm.flops (the project's own count).

    N = the matmul weights: the blocks' q, k, v, out and MLP matrices plus the D*V output head
    (the tied embedding); biases, norms and the position table are left out. 12*L*T*D is
    attention's q.k and p.v over the full T x T square (forward + backward), as in PaLM appendix B.
    """
    from llm import flops  # noqa: PLC0415

    return flops.flops_per_token(model_config(shape), shape.seq_len)


def model_config(shape: Shape):
    """The project's ModelConfig for a Shape."""
    from llm.model import AttentionConfig, ModelConfig  # noqa: PLC0415

    return ModelConfig(
        vocab_size=shape.vocab, d_model=shape.d_model, n_layers=shape.n_layers, max_seq_len=shape.seq_len,
        attention=AttentionConfig(n_heads=shape.n_heads), **LAYOUTS[shape.layout],
    )  # fmt: skip


# The model fields each Shape layout sets (the torch reference builds the same: torch_reference.py).
LAYOUTS = {
    "gpt2": {"positional": "learned", "norm": "layernorm", "mlp": "gelu", "use_bias": True},
    "llama": {"positional": "rope", "norm": "rmsnorm", "mlp": "swiglu", "use_bias": False},
}


def set_path(c, dotted: str, value: str) -> None:
    """Set a ConfigDict field from a string, typed like the field's current value."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        c = c[p]
    old = c[leaf]
    if old is None:  # an unset placeholder: guess the type, ConfigDict checks it
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
    elif isinstance(old, bool):
        value = value.lower() in ("1", "true", "yes")
    elif isinstance(old, int):
        value = int(value)
    elif isinstance(old, float):
        value = float(value)
    c[leaf] = value


# ---- CPU load -----------------------------------------------------------------------------------


def _busy_jiffies() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (vals + [0] * 8)[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def own_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system, children included) used so far by these processes."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


class LoadMeter:
    """CPU cores busy with processes other than ours (machine total minus our process tree)."""

    def __init__(self, own_pids: list[int]):
        self.own = own_pids

    def start(self):
        self._t, self._busy, self._own = time.perf_counter(), _busy_jiffies(), own_cpu(self.own)

    def stop(self) -> dict[str, float]:
        dt = time.perf_counter() - self._t
        busy, steal = _busy_jiffies()
        own = own_cpu(self.own)
        foreign = max(0.0, (busy - self._busy[0]) - (own - self._own)) / dt
        return {"foreign_cores": round(foreign, 3), "steal_cores": round((steal - self._busy[1]) / dt, 3)}

    def sample(self, seconds: float) -> dict[str, float]:
        self.start()
        time.sleep(seconds)
        return self.stop()

    def wait_idle(self, threshold: float, max_wait: float, window: float = 1.0) -> dict:
        """Sample until foreign load < threshold cores (or max_wait passes); return what was seen."""
        t0 = time.perf_counter()
        seen = self.sample(window)
        while seen["foreign_cores"] >= threshold and time.perf_counter() - t0 < max_wait:
            time.sleep(min(5.0, max(0.0, max_wait - (time.perf_counter() - t0))))
            seen = self.sample(window)
        seen["waited_s"] = round(time.perf_counter() - t0 - window, 1)
        seen["idle"] = seen["foreign_cores"] < threshold
        seen["loadavg_1m"] = os.getloadavg()[0]
        return seen


def top_foreign_processes(own_pids: list[int], n: int = 3) -> list[str]:
    """The busiest other processes (for the record of what loaded the machine)."""
    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] in own_pids:
            continue
        try:
            procs.append((p, p.cpu_percent(None)))
        except psutil.Error:
            pass
    time.sleep(0.5)
    out = []
    for p, _ in procs:
        try:
            out.append((p.cpu_percent(None), " ".join(p.info["cmdline"] or [])[:100]))
        except psutil.Error:
            pass
    return [f"{c:.0f}% {cmd}" for c, cmd in sorted(out, reverse=True)[:n] if c > 5]


# ---- workers ------------------------------------------------------------------------------------


class Worker:
    """A benchmark worker subprocess speaking one JSON object per line."""

    def __init__(self, script: str, args: list[str], env: dict[str, str] | None = None):
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=full_env, text=True, cwd=ROOT,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[1:]} died (exit {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker error: {reply['error']}")
        return reply

    def ready(self) -> Worker:
        """Block until the worker has finished importing (its first reply comes after that). Workers
        start together, so without this one worker's imports (torch: seconds of a core) overlap
        another's timed work, unseen by LoadMeter, which counts our own processes as idle: the
        2026-11-30 runs timed jnp.dot at 210-258 GFLOP/s this way, against 460-500 measured alone."""
        self.call(cmd="stats")
        return self

    def close(self):
        try:
            self.call(cmd="quit")
        except (RuntimeError, BrokenPipeError, ValueError):
            pass
        self.proc.wait(timeout=60)


def serve(handlers: dict) -> None:
    """Worker main loop: stdout carries only replies (stray prints are sent to stderr)."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        cmd = json.loads(line)
        name = cmd.pop("cmd")
        if name == "quit":
            out.write("{}\n")
            out.flush()
            return
        try:
            reply = handlers[name](**cmd)
        except Exception as e:  # noqa: BLE001 (report any failure to the parent)
            import traceback  # noqa: PLC0415

            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def rss_mb() -> dict[str, float]:
    """Current and peak resident memory of this process, MiB."""
    import resource  # noqa: PLC0415

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
    }


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def step_config(name: str, precision: str = "fp32"):
    """The run config (ml_collections) of a benchmark shape: configs/shakespeare.py with the
    shape's size and layout (`LAYOUTS`, which the PyTorch reference builds too), byte tokenizer
    (the step does not depend on it), no dropout (the reference has none). bf16 = autocast as
    torch.autocast: bf16 matmul inputs with f32 accumulation, f32 activations, norms and
    elementwise math (all-bf16 activations: variant 'allbf16:model.dtype=bfloat16')."""
    from configs import shakespeare  # noqa: PLC0415

    shape = CONFIGS[name]
    c = shakespeare.get_config()
    c.model.d_model, c.model.n_layers, c.model.attention.n_heads = (
        shape.d_model,
        shape.n_layers,
        shape.n_heads,
    )
    c.model.vocab_size, c.model.max_seq_len, c.data.seq_len = shape.vocab, shape.seq_len, shape.seq_len
    c.model.dtype = "float32"
    c.model.matmul_dtype = "bfloat16" if precision == "bf16" else None
    c.model.dropout = 0.0
    for key, value in LAYOUTS[shape.layout].items():
        c.model[key] = value
    c.data.tokenizer.kind = "byte"
    c.train.batch_size = shape.batch
    return c
