"""Compile the real train step for a TPU pod topology without the hardware, and say if it fits.

  python -m launch.aot_check --config=configs/pretrain.py:gpt2-1.5b --topology=v5p:4x4x4
  python -m launch.aot_check --config=configs/pretrain.py:llama2-7b --topology=v5e:16x16 \\
      --config.mesh.fsdp=64 --config.mesh.tensor=4
  python -m launch.aot_check --config=configs/pretrain.py:llama2-7b --topology=v6e:8x8 --num_slices=2

Topologies: v4:AxBxC, v5p:AxBxC (one JAX device per chip, megacore), v5e:AxB, v6e:AxB; with
--num_slices=S the slices are joined over DCN (mesh.dcn_data=S unless mesh.dcn_* say otherwise).
With the `libtpu` wheel (`pip install -e .[aot]`) XLA's TPU compiler builds the program for
compile-only devices of that topology (jax.experimental.topologies) and reports per-device memory
from `compiled.memory_analysis()`, compared with the chip's HBM. Without libtpu it falls back to as
many fake CPU devices with the same mesh: the program is checked to compile and shard, but its
memory comes from another compiler with no HBM limit, so the verdict line says "CPU estimate" and
never "fits"/"does not fit".
Exit code: 0 fits (or, on the CPU fallback, the estimate is under the HBM), 1 does not fit (TPU
compiler), 2 bad config or usage, 3 CPU estimate over the HBM (no TPU verdict: install libtpu),
4 failed to compile.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time

# Compile-only: never start a TPU runtime (also true on a TPU VM, whose chips may be busy).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu otherwise probes the GCE metadata server for a local TPU and prints warnings at load;
# compile-only topologies ignore these values.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# libtpu takes /tmp/libtpu_lockfile so two processes never drive one TPU; compiling touches none,
# and any JAX process in the same environment without JAX_PLATFORMS=cpu would otherwise block us.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GiB = 1024**3


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def fmt_count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # as in the topology flag: v4, v5e, v5p, v6e
    chip_config: str  # libtpu chip_config_name: "megacore" = one JAX device per chip (v4, v5p)
    hbm_gib: float  # HBM per JAX device
    dims: int  # topology dimensions: 3 (torus AxBxC) or 2 (AxB)


CHIPS = {
    "v4": Chip("v4", "megacore", 32.0, 3),
    "v5e": Chip("v5e", "default", 16.0, 2),
    "v5p": Chip("v5p", "megacore", 95.0, 3),
    "v6e": Chip("v6e", "default", 32.0, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def name(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def devices_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def n_devices(self) -> int:
        return self.devices_per_slice * self.num_slices


def parse_topology(text: str, num_slices: int = 1) -> Topology:
    """'v5p:4x4x4' -> Topology; the error lists the accepted forms."""
    m = re.fullmatch(r"\s*([a-z0-9]+)\s*:\s*(\d+(?:x\d+)*)\s*", text.lower())
    kind = m and ALIASES.get(m.group(1), m.group(1))
    if not m or kind not in CHIPS:
        raise ValueError(f"unknown topology {text!r}; use <chip>:<AxBxC> with chip one of {', '.join(CHIPS)} "
                         f"(e.g. v5p:4x4x4, v4:2x2x4, v5e:16x16, v6e:8x8)")  # fmt: skip
    chip, shape = CHIPS[kind], tuple(int(s) for s in m.group(2).split("x"))
    if len(shape) != chip.dims:
        raise ValueError(f"{chip.name} topologies have {chip.dims} dimensions, got {text!r}")
    if num_slices < 1:
        raise ValueError("--num_slices must be >= 1")
    return Topology(chip, shape, num_slices)


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(topo: Topology) -> list:
    """Compile-only TPU devices for the topology (needs the libtpu wheel, no TPU)."""
    from jax.experimental import topologies  # noqa: PLC0415

    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo.name, chip_config_name=topo.chip.chip_config,
            num_slices=topo.num_slices,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 (JaxRuntimeError from libtpu)
        raise ValueError(
            f"libtpu does not accept the topology {topo.name} x {topo.num_slices} slices: {e}"
        ) from e
    return list(desc.devices)


def cpu_devices(n: int) -> list:
    """n CPU devices: fake ones made before the backend starts, else the ones already there."""
    import jax  # noqa: PLC0415
    from jax._src import xla_bridge  # noqa: PLC0415

    if not xla_bridge.backends_are_initialized():
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise RuntimeError(f"the CPU fallback needs {n} devices but this process has {len(devices)}; "
                           f"run `python -m launch.aot_check` in a fresh process")  # fmt: skip
    return devices[:n]


def with_slices(cfg, topo: Topology, fake: bool):
    """Multi-slice: slices along DCN (dcn_data = slices unless set); on fake CPU devices, which have
    no slices, the DCN factors are folded into the same-named ICI axes (same mesh shape)."""
    from llm.sharding import MESH_AXES  # noqa: PLC0415

    m = cfg.mesh
    dcn = {ax: getattr(m, "dcn_" + ax) for ax in MESH_AXES}
    if topo.num_slices > 1 and math.prod(dcn.values()) == 1:
        dcn["data"] = topo.num_slices
    if math.prod(dcn.values()) != topo.num_slices:
        raise ValueError(
            f"mesh.dcn_* multiply to {math.prod(dcn.values())} but --num_slices={topo.num_slices}"
        )
    new = {"dcn_" + ax: v for ax, v in dcn.items()}
    if fake:
        ici = dataclasses.replace(m, **new).resolved_shape(topo.n_devices)[0]  # per slice
        new = {
            **{ax: ici[i] * dcn[ax] for i, ax in enumerate(MESH_AXES)},
            **{"dcn_" + ax: 1 for ax in MESH_AXES},
        }
    return dataclasses.replace(cfg, mesh=dataclasses.replace(m, **new))


def memory_report(compiled) -> dict[str, float]:
    """Per-device bytes from XLA: live at once ~ arguments + outputs - donated aliases + temporaries."""
    ma = compiled.memory_analysis()
    if isinstance(ma, list):  # some backends return one entry per device
        ma = ma[0]
    get = lambda name: float(getattr(ma, name, 0) or 0)  # noqa: E731
    out = {
        "arguments": get("argument_size_in_bytes"),
        "outputs": get("output_size_in_bytes"),
        "aliased": get("alias_size_in_bytes"),
        "temporaries": get("temp_size_in_bytes"),
        "code": get("generated_code_size_in_bytes"),
    }
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    return out


def check(cfg, topo: Topology, force_cpu: bool = False, log=print) -> dict:
    """Lower and compile cfg's train step for `topo`; a report dict (also printed via `log`)."""
    import jax  # noqa: PLC0415

    from llm import flops, sharding  # noqa: PLC0415
    from llm.train import state as state_lib  # noqa: PLC0415
    from llm.train.builder import build_model, build_trainer  # noqa: PLC0415

    build_model(cfg)  # model.vocab_size must be given (it normally comes from the tokenizer)
    fake = force_cpu or not libtpu_available()
    backend = "fake CPU devices (libtpu not installed: memory is only indicative)" if fake else "libtpu"
    if force_cpu and libtpu_available():
        backend = "fake CPU devices (--cpu: memory is only indicative)"
    cfg = with_slices(cfg, topo, fake)
    devices = cpu_devices(topo.n_devices) if fake else tpu_devices(topo)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules, t = cfg.mesh.rules, cfg.data.seq_len
    dp = sharding.data_parallel_size(mesh, rules)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % dp:
        raise ValueError(f"micro-batch {micro} is not divisible by the data-parallel size {dp} (mesh "
                         f"{dict(mesh.shape)}); set --config.train.batch_size to a multiple of {dp}")  # fmt: skip

    # The same builder and jit as the training loop: explicit shardings, donated state.
    trainer = build_trainer(cfg, mesh)
    abstract, shardings = trainer.abstract_state, trainer.state_shardings
    state_in = trainer.restore_target()
    batch_in = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, t)[: len(names)], jax.numpy.int32, sharding=sh)
                for (k, names), sh in zip(trainer.task.fields.items(), trainer.batch_shardings.values())}  # fmt: skip
    fn = trainer.jit_train_step()

    n_params = state_lib.count_params(abstract.params)
    # Params + optimizer state held by one device, from the shardings alone (no compile needed).
    state_bytes = sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                      for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))  # fmt: skip
    slices = f", {topo.num_slices} slices over DCN" if topo.num_slices > 1 else ""
    report = {
        "topology": topo.name, "num_slices": topo.num_slices, "devices": topo.n_devices,
        "device_kind": devices[0].device_kind, "backend": "cpu" if fake else "tpu", "mesh": dict(mesh.shape),
        "params": n_params, "batch": cfg.train.batch_size, "seq_len": t, "hbm_gib": topo.chip.hbm_gib,
        "state_bytes_per_device": state_bytes,
    }  # fmt: skip
    log(f"AOT check: TPU {topo.name} ({topo.n_devices} devices{slices}) via {backend}")
    log(f"model {fmt_count(n_params)} parameters | mesh {dict(mesh.shape)} | global batch "
        f"{cfg.train.batch_size} x {t} tokens | dtype {cfg.model.dtype}, remat {cfg.model.remat}")  # fmt: skip
    log(f"train state (params + optimizer) per device: {fmt_bytes(state_bytes)}")
    # What the optimizer keeps per parameter (AdamW: 8 bytes in fp32; Adafactor's factored moments
    # far less), so a pod user can choose: --config.optim.name=adafactor|lion|muon.
    opt_leaves = list(zip(jax.tree.leaves(abstract.opt_state), jax.tree.leaves(shardings.opt_state)))
    opt_total = sum(a.size * a.dtype.itemsize for a, _ in opt_leaves)
    opt_device = sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in opt_leaves)
    report.update(optimizer=cfg.optim.name, opt_state_bytes=opt_total, opt_state_bytes_per_device=opt_device,
                  opt_state_bytes_per_param=opt_total / n_params)  # fmt: skip
    log(f"optimizer state ({cfg.optim.name}): {opt_total / n_params:.2f} bytes per parameter, "
        f"{fmt_bytes(opt_total)} in all, {fmt_bytes(opt_device)} per device")  # fmt: skip
    # A mesh axis that does not divide an array's dimension is dropped for it (replicated), e.g.
    # fsdp=256 with d_model=1600: say so, since that silently multiplies the state per device.
    total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
    split, want = total / state_bytes, mesh.shape["fsdp"] * mesh.shape["tensor"]
    if split < want / 2:
        m = cfg.model
        log(f"warning: the train state is split only ~{split:.0f} ways, not fsdp*tensor = {want}: mesh sizes "
            f"must divide the dimensions they shard (d_model {m.d_model}, heads {m.attention.n_heads}, "
            f"kv heads {m.attention.kv_heads}, ffn {m.ffn_dim}, vocab {m.vocab_size}) or those arrays are "
            f"replicated")  # fmt: skip
    t0 = time.perf_counter()
    try:
        compiled = fn.lower(state_in, batch_in).compile()
    except Exception as e:  # noqa: BLE001 (XLA raises XlaRuntimeError/JaxRuntimeError)
        msg = str(e)
        report["compile_s"] = time.perf_counter() - t0
        if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
            report.update(compiles=False, fits=False, error=msg[:2000])
            first = next((ln for ln in msg.splitlines() if "memory" in ln.lower()), msg.splitlines()[0])
            log(f"does not fit: the TPU compiler ran out of HBM ({topo.chip.hbm_gib:g} GiB per "
                f"{topo.chip.name} chip): {first.strip()[:400]}")  # fmt: skip
            return report
        report.update(compiles=False, fits=None, error=msg[:2000])
        log(f"compile FAILED after {report['compile_s']:.1f} s: {msg[:2000]}")
        return report
    report["compile_s"] = time.perf_counter() - t0
    mem = memory_report(compiled)
    report.update(compiles=True, memory_bytes=mem, peak_gib=mem["peak"] / GiB)
    report["fits"] = mem["peak"] <= topo.chip.hbm_gib * GiB
    step_flops = flops.flops_per_token(cfg.model, t) * cfg.train.batch_size * t
    peak = flops.peak_tflops(devices[0].device_kind, cfg.model.dtype) if not fake else None
    log(f"compiled in {report['compile_s']:.1f} s")
    log("per-device memory: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in mem.items() if k != "peak"))
    if fake:  # another compiler's memory plan: an indication, not a verdict
        verdict = (f"CPU estimate {'under' if report['fits'] else 'OVER'} the HBM, not a TPU verdict "
                   f"(pip install -e '.[aot]' for libtpu's)")  # fmt: skip
    else:
        verdict = "fits" if report["fits"] else "does not fit"
    report["verdict"] = verdict
    log(
        f"peak ~ {fmt_bytes(mem['peak'])} of {topo.chip.hbm_gib:g} GiB HBM per {topo.chip.name} chip: {verdict}"
    )
    if peak:
        # What the step would take at a given MFU: a sanity check on batch size and mesh.
        at40 = step_flops / (topo.n_devices * peak * 1e12 * 0.4)
        log(
            f"{step_flops / 1e15:.1f} PFLOP per step; {at40:.2f} s per step at 40% MFU ({peak:g} TFLOP/s peak)"
        )
    return report


def main(argv: list[str]) -> int:
    from absl import flags  # noqa: PLC0415

    from llm import cli  # noqa: PLC0415

    config = cli.define_config("config", None, "Config file (e.g. configs/pretrain.py:gpt2-1.5b).")
    topology = flags.DEFINE_string(
        "topology", None, "TPU topology, e.g. v5p:4x4x4, v5e:16x16, v6e:8x8, v4:4x4x4."
    )
    num_slices = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (multi-slice).")
    cpu = flags.DEFINE_bool("cpu", False, "Use fake CPU devices even if libtpu is installed.")
    json_out = flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
    flags.mark_flags_as_required(["config", "topology"])
    cli.parse_flags(argv)

    from llm.config import ConfigError, from_config_dict  # noqa: PLC0415

    try:
        topo = parse_topology(topology.value, num_slices.value)
        report = check(from_config_dict(cli.config_value(config)), topo, force_cpu=cpu.value)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if json_out.value:
        with open(json_out.value, "w") as f:
            json.dump(report, f, indent=2)
    return exit_code(report)


def exit_code(report: dict) -> int:
    """0 fits, 1 does not fit (TPU compiler), 3 CPU estimate over the HBM, 4 failed to compile."""
    if not report["compiles"] and report["fits"] is None:
        return 4
    if report["fits"]:
        return 0
    return 3 if report["backend"] == "cpu" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
