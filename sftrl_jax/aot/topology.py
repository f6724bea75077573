"""Targets of ``sftrl-jax compile``: the chips, the topology names, their compile-only devices and the mesh.

Nothing here imports jax at module level; :func:`topology_devices` and :func:`mesh_for` import it when
called.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import math
import os
import re

GIB = 1 << 30
INSTALL_HINT = "pip install -e '.[aot]'"


class AotError(ValueError):
    """A one-line user error of ``sftrl-jax compile`` (the CLI prints it and exits with code 2)."""


# ------------------------------------------------------------------------------------------ chips
@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_bandwidth: float  # bytes/s per device
    usable_fraction: float = 1.0  # share of HBM the run gets (GPU: XLA_PYTHON_CLIENT_MEM_FRACTION)


GPU_MEM_FRACTION = 0.90  # gpu/common.sh's XLA_PYTHON_CLIENT_MEM_FRACTION default
CHIPS: dict[str, Chip] = {
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1640e9),
    # from the vendored XLA specs (device_memory_size, memory_bandwidth, matrix unit bf16 rate)
    "h100": Chip("NVIDIA H100 SXM 80GB", 84942979072, 989.4e12, 3.35232e12, GPU_MEM_FRACTION),
    "h200": Chip("NVIDIA H200 141GB", 151397597184, 989.4e12, 4.8e12, GPU_MEM_FRACTION),
}
GPU_SPECS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}

# slice size -> JAX topology layout
_LITE_LAYOUTS = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_V5P_LAYOUTS = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8",
                1024: "8x8x8"}
_GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    platform: str  # "tpu" | "cuda"
    chip_key: str
    jax_name: str  # get_topology_desc's topology_name (TPU) or topology (CUDA)
    kwargs: tuple = ()  # extra get_topology_desc keyword arguments

    @property
    def chip(self) -> Chip:
        return CHIPS[self.chip_key]


def known_topologies() -> list[str]:
    names = [f"v5e-{n}" for n in _LITE_LAYOUTS] + [f"v6e-{n}" for n in _LITE_LAYOUTS]
    names += [f"v5p-{n}" for n in _V5P_LAYOUTS]
    names += [f"{n}x{gpu}" for gpu in GPU_SPECS for n in _GPU_COUNTS]
    return names


def parse_topology(name: str) -> Topology:
    """``v5p-64`` / ``v6e-8`` / ``8xh100`` / a JAX TPU name like ``v5p:2x4x4`` -> :class:`Topology`."""
    text = name.strip().lower()
    match = re.fullmatch(r"(v5e|v5litepod|v6e|v5p)-(\d+)", text)
    if match:
        kind, size = match.group(1).replace("v5litepod", "v5e"), int(match.group(2))
        layouts = _V5P_LAYOUTS if kind == "v5p" else _LITE_LAYOUTS
        if size in layouts:
            kwargs = ()
            if kind != "v5p" and size <= 8:  # v5e/v6e slices of up to 8 chips are one host
                x, y = (int(v) for v in layouts[size].split("x"))
                kwargs = (("chips_per_host_bounds", (x, y, 1)),)
            return Topology(name, "tpu", kind, f"{kind}:{layouts[size]}", kwargs)
    match = re.fullmatch(r"(v5e|v5p|v6e):(\d+(?:x\d+)+)(_twisted|_untwisted)?", text)
    if match:
        return Topology(name, "tpu", match.group(1), text)
    match = re.fullmatch(r"(\d+)x(h100|h200)", text)
    if match:
        count, gpu = int(match.group(1)), match.group(2)
        if count in _GPU_COUNTS or (count > 8 and count % 8 == 0):
            hosts, per_host = (1, count) if count <= 8 else (count // 8, 8)
            return Topology(name, "cuda", gpu, f"1x{hosts}x{per_host}")
    raise AotError(f"unknown topology {name!r}; known: {', '.join(known_topologies())} "
                   "(or a JAX TPU topology name such as v5p:2x4x4)")


def gpu_spec_text(chip_key: str) -> str:
    """The vendored GpuTargetConfigProto text of ``chip_key`` ("h100" / "h200")."""
    return importlib.resources.files("sftrl_jax.aot_specs").joinpath(GPU_SPECS[chip_key]).read_text()


def gpu_spec_figures(text: str) -> dict[str, float]:
    """HBM bytes, bandwidth and dense bf16 peak (2 FLOPs per FMA) read from a GpuTargetConfigProto text."""
    def number(key):
        return float(re.search(rf"\b{key}: ([0-9.e+]+)", text).group(1))

    bf16 = re.search(r"matrix_unit_description \{.*?key: 16\s*value \{\s*clock_rate_ghz: ([0-9.]+)\s*"
                     r"units_per_core: (\d+)\s*ops_per_clock: (\d+)", text, re.S)
    clock, units, ops = float(bf16.group(1)), int(bf16.group(2)), int(bf16.group(3))
    return {"hbm_bytes": number("device_memory_size"), "hbm_bandwidth": number("memory_bandwidth"),
            "peak_flops": 2 * clock * 1e9 * units * ops * number("core_count")}


def topology_devices(topology: Topology) -> list:
    """The compile-only devices of ``topology`` (needs libtpu / jax-cuda12-plugin: the ``aot`` extra)."""
    from jax.experimental import topologies

    if topology.platform == "tpu":
        from jax._src.cloud_tpu_init import get_tpu_library_path

        if get_tpu_library_path() is None:
            raise AotError(f"compiling for {topology.name} needs libtpu (the XLA:TPU compiler): {INSTALL_HINT}")
        # compile-only devices never touch a chip: don't take libtpu's one-process-per-host lock, so a
        # compile runs beside a training run (or another compile, e.g. two test workers)
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            desc = topologies.get_topology_desc(topology_name=topology.jax_name, platform="tpu",
                                                **{k: list(v) for k, v in topology.kwargs})
        except Exception as err:  # libtpu's own message names the problem
            raise AotError(f"topology {topology.name} ({topology.jax_name}): {str(err).splitlines()[0]}") from None
        return list(desc.devices)
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise AotError(f"compiling for {topology.name} needs jax-cuda12-plugin (the XLA:GPU compiler): {INSTALL_HINT}")
    try:
        desc = topologies.get_topology_desc(platform="cuda", target_config=gpu_spec_text(topology.chip_key),
                                            topology=topology.jax_name)
    except Exception as err:
        raise AotError(f"topology {topology.name}: the CUDA plugin could not describe it "
                       f"({str(err).splitlines()[0]}); it loads only when JAX_PLATFORMS=cpu or "
                       f"JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 on a host without CUDA ({INSTALL_HINT})") from None
    return list(desc.devices)


# ------------------------------------------------------------------------------------------ mesh
def mesh_for(spec: dict, devices: list, topology: Topology):
    """The config's mesh on the topology's devices; a one-line error saying what would fit otherwise."""
    from ..sharding import MESH_AXES, make_mesh

    try:
        return make_mesh(spec, devices=devices)
    except ValueError as err:
        count = len(devices)
        sizes = {axis: int(spec.get(axis, 1)) for axis in MESH_AXES}
        fixed = math.prod(v for v in sizes.values() if v != -1)
        hint = []
        if -1 not in sizes.values():
            same_chip = [n for n in known_topologies() if _device_count(n) == fixed
                         and parse_topology(n).chip_key == topology.chip_key]
            hint.append(f"it needs {fixed} devices" + (f" (e.g. --topology {same_chip[0]})" if same_chip else ""))
        others = sizes["data"] * sizes["tensor"] if sizes["data"] != -1 and sizes["tensor"] != -1 else 0
        if others and count % others == 0:
            hint.append(f"or override mesh.fsdp={count // others} for {count} devices")
        else:
            hint.append(f"or override e.g. mesh.data=1 mesh.fsdp={count} mesh.tensor=1")
        raise AotError(f"config mesh {spec} does not fit {topology.name} ({count} devices): {err}; "
                       + ", ".join(hint)) from None


def _device_count(name: str) -> int:
    topology = parse_topology(name)
    if topology.platform == "cuda":
        _, hosts, per_host = topology.jax_name.split("x")
        return int(hosts) * int(per_host)
    layout = topology.jax_name.split(":")[1]
    return math.prod(int(v) for v in layout.split("x"))

