"""``sftrl-jax compile``: ahead-of-time compile a run's jitted functions for a TPU slice or GPU host, on a CPU.

    sftrl-jax compile --config configs/tpu/sft_qwen2.5-math-7b_v5p-64.yaml --topology v5p-64 \\
        model.path=configs/models/Qwen2.5-Math-7B [--json OUT.json]

The config (SFT, RL or pipeline; its ``kind:``, or ``--kind``) is read as the trainers
read it, the model is built abstractly from ``model.path``'s ``config.json`` (no weights are read:
a directory holding only ``config.json`` is enough), the mesh is the config's ``mesh`` laid over the
topology's compile-only devices, and every jitted function the run uses is lowered with
``jax.ShapeDtypeStruct`` arguments (shape, dtype and ``NamedSharding``) and compiled by the target's
real XLA compiler (libtpu's XLA:TPU; jax-cuda12-plugin's XLA:GPU, a real sm_90a executable).
The functions are the trainers' own (``make_train_step``, ``make_eval_step``, ``make_grpo_step``,
``make_logprob_fn``, the sampler's ``_generate_batch``, ``Decoder.prefill`` / ``Decoder.decode``),
jitted with the trainers' shardings and donation; the batch shapes are the largest a run can
produce (packed / padded rows at ``max_length``; prompts at ``max_prompt_length``, responses at
``max_new_tokens``).

Per function it reports XLA's per-device memory (arguments, outputs, aliased = donated, temporaries),
the arrays that stay alive in HBM outside the function (``resident``: e.g. the optimizer state
while sampling), whether it fits the chip's memory, the compiled per-device FLOPs and bytes, and the
roofline bound ``max(FLOPs / peak, bytes / HBM bandwidth)`` with the MFU that bound implies for the
model FLOPs of :mod:`sftrl_jax.flops`. It is an upper bound on MFU, not a prediction.

Topologies (``--topology``)
---------------------------
=================  ==============================  =========================================
name               JAX topology                    devices
=================  ==============================  =========================================
``v5e-N``          ``v5e:AxB`` (N chips)           N = 1, 4, 8, 16, 32, 64, 128, 256; 1 device per chip
``v6e-N``          ``v6e:AxB`` (N chips)           as v5e
``v5p-N``          ``v5p:AxBxC`` (N TensorCores)   N/2 chips = N/2 devices (megacore: 2 cores, 1 device);
                                                   v5p-8 = 2x2x1, v5p-16 = 2x2x2, v5p-32 = 2x2x4,
                                                   v5p-64 = 2x4x4, v5p-128 = 4x4x4, v5p-256 = 4x4x8,
                                                   v5p-512 = 4x8x8, v5p-1024 = 8x8x8
``v5e:2x2`` ...    passed to JAX unchanged         what libtpu says (``v5e``, ``v5p``, ``v6e`` prefixes)
``Kxh100``         ``1xHxG`` CUDA topology         K H100 SXM GPUs; K <= 8: one host of K, else K/8 hosts of 8
``Kxh200``         as h100                         K H200 GPUs
=================  ==============================  =========================================

v5e-N / v6e-N: 1 -> 1x1, 4 -> 2x2, 8 -> 2x4 (one host), 16 -> 4x4, 32 -> 4x8, 64 -> 8x8, 128 -> 8x16,
256 -> 16x16.

Chips (per device): HBM, peak dense bf16 FLOP/s, HBM bandwidth (vendor figures; the GPU rows are the
vendored XLA device specs in ``sftrl_jax/aot_specs/``, whose matrix-unit bf16 rate x 2 FLOPs per FMA
gives the 989 TFLOP/s and whose ``device_memory_size`` is what CUDA reports):

=====  ==================  ===========  ==========
chip   HBM                 bf16 peak    bandwidth
=====  ==================  ===========  ==========
v5e    16 GiB              197 TF/s     819 GB/s
v5p    95 GiB              459 TF/s     2765 GB/s
v6e    32 GiB              918 TF/s     1640 GB/s
h100   84.94e9 B (80 GB)   989 TF/s     3352 GB/s
h200   151.4e9 B (141 GB)  989 TF/s     4800 GB/s
=====  ==================  ===========  ==========

On GPUs JAX takes ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the memory (the launchers in ``gpu/`` set
0.90), so "fits" compares with 0.90 of the HBM there; on TPUs with all of it.

Limits: the GPU path has no ``cost_analysis()`` in this plugin, so FLOPs and bytes come from XLA's
generic HLO cost analysis of the compiled (optimised, partitioned) module. XLA counts a loop body once;
:func:`loop_scaled_counts` multiplies the bodies of loops with a known trip count (layers, micro-steps,
sequence chunks) and also sums the collectives' bytes (``collective_bytes``: the interconnect
traffic, e.g. FSDP all-gathers). The decode ``while_loop`` has no known trip count, so ``generate``
rows are memory figures only. Custom calls (Pallas splash attention, cuDNN) are invisible to the
cost analysis, hence the time bound takes the larger of the compiler's and the model's FLOPs. GPU
kernels are not autotuned. XLA:GPU compiles a program larger than the HBM ("fits" is our comparison);
XLA:TPU refuses one, which is reported as a row that does not fit, with the temporaries it names.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import inspect
import json
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------------------------- config kind
def detect_kind(path: str | os.PathLike) -> str:
    """``sft`` / ``rl`` / ``pipeline``: the ``kind:`` a config file (or its ``base:``) declares."""
    from .config import config_kind

    kind = config_kind(path)
    if kind not in ("sft", "rl", "pipeline"):
        raise AotError(f"{path}: " + (f"kind {kind!r} has nothing to compile (sft, rl or pipeline)" if kind else
                                      "no 'kind:' (sft, rl or pipeline) in the config; add it or pass --kind"))
    return kind


def load_run_config(path, overrides, kind: str | None = None):
    from .config import load_config

    kind = kind or detect_kind(path)
    if kind == "sft":
        from .sft import SFTConfig as cls
    elif kind == "rl":
        from .rl import RLConfig as cls
    else:
        from .pipeline import PipelineConfig as cls
    return kind, load_config(cls, path, overrides)


# ------------------------------------------------------------------------------------------ mesh
def mesh_for(spec: dict, devices: list, topology: Topology):
    """The config's mesh on the topology's devices; a one-line error saying what would fit otherwise."""
    from .sharding import MESH_AXES, make_mesh

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


# ------------------------------------------------------------------------------ abstract run state
def _sds(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _with_shardings(shapes, shardings):
    import jax

    return jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), shapes, shardings)


def device_bytes(tree) -> int:
    """Bytes one device holds of the ShapeDtypeStructs in ``tree`` (their shards)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def model_kwargs(options) -> dict:
    """The ModelOptions fields the model builders take (whatever the model code adds later)."""
    from .models import abstract_model, load_pretrained

    accepted = set(inspect.signature(abstract_model).parameters) & set(inspect.signature(load_pretrained).parameters)
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if f.name in accepted and f.name != "path"}


@dataclasses.dataclass
class AbstractRun:
    model: Any  # abstract Decoder on the mesh
    model_config: Any
    graphdef: Any
    mesh: Any
    shards: int
    optimizer: Any
    schedule: Any
    state: dict  # {params, opt_state, step} as ShapeDtypeStructs with shardings
    state_shardings: dict


def abstract_run(model_options, optimizer_options, mesh, total_steps: int = 1000) -> AbstractRun:
    """Model + train state as the trainers build them (``training.init_train_state``), shapes only."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from .models import abstract_model, param_shardings, read_config
    from .optim import init_opt_state, make_optimizer
    from .sharding import data_parallel_size
    from .training import opt_state_shardings

    model_config = read_config(model_options.path)
    model = abstract_model(model_config, mesh=mesh, **model_kwargs(model_options))
    graphdef = nnx.graphdef(model)
    shapes = nnx.to_pure_dict(nnx.state(model))
    params = _with_shardings(shapes, param_shardings(model))
    optimizer, schedule = make_optimizer(optimizer_options, total_steps)
    opt_shardings = opt_state_shardings(optimizer, params, mesh)
    opt_state = _with_shardings(jax.eval_shape(lambda p: init_opt_state(optimizer, p), params), opt_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {"params": params, "opt_state": opt_state, "step": _sds((), "int32", replicated)}
    shardings = {"params": jax.tree.map(lambda s: s.sharding, params), "opt_state": opt_shardings,
                 "step": replicated}
    return AbstractRun(model, model_config, graphdef, mesh, data_parallel_size(mesh), optimizer, schedule, state,
                       shardings)


# ------------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class FunctionReport:
    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    resident_bytes: int  # other arrays alive in HBM while it runs (not its arguments)
    hbm_bytes: int
    usable_bytes: int
    flops: float  # per device, compiled module
    bytes_accessed: float  # per device
    model_flops: float | None  # sftrl_jax.flops count for the whole (all-device) call
    peak_flops: float
    hbm_bandwidth: float
    devices: int
    compile_seconds: float
    note: str = ""
    xla_flops: float = 0.0  # XLA's cost analysis as reported (loop bodies counted once)
    xla_bytes_accessed: float = 0.0
    collective_bytes: float = 0.0  # per device: results of all-gathers / reductions / permutes (loop-scaled)
    refused: bool = False  # the compiler refused the program as over-full (only temp_bytes is known)

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def peak_bytes(self) -> int:
        return self.total_bytes + self.resident_bytes

    @property
    def fits(self) -> bool:
        return not self.refused and self.peak_bytes <= self.usable_bytes

    @property
    def time_bound_s(self) -> float:
        """max(FLOPs / peak, bytes / bandwidth) per device. The FLOPs are the compiler's or, when larger,
        the model's share per device: XLA's cost analysis does not see inside custom calls (the Pallas
        splash kernel, cuDNN attention), so with those it undercounts the attention FLOPs."""
        flops = max(self.flops, (self.model_flops or 0.0) / self.devices)
        return max(flops / self.peak_flops, self.bytes_accessed / self.hbm_bandwidth)

    @property
    def mfu_bound(self) -> float | None:
        if not self.model_flops or self.time_bound_s <= 0:
            return None
        return self.model_flops / (self.time_bound_s * self.peak_flops * self.devices)

    def to_json(self) -> dict:
        out = {"name": self.name, "fits": self.fits, "argument_bytes": self.argument_bytes,
               "output_bytes": self.output_bytes, "temp_bytes": self.temp_bytes, "total_bytes": self.total_bytes,
               "hbm_bytes": self.hbm_bytes, "flops": self.flops, "bytes_accessed": self.bytes_accessed,
               "collective_bytes": self.collective_bytes, "refused": self.refused,
               "alias_bytes": self.alias_bytes, "generated_code_bytes": self.code_bytes,
               "resident_bytes": self.resident_bytes, "peak_bytes": self.peak_bytes, "usable_bytes": self.usable_bytes,
               "headroom_bytes": self.usable_bytes - self.peak_bytes, "model_flops": self.model_flops,
               "time_bound_s": self.time_bound_s, "mfu_bound": self.mfu_bound,
               "compile_seconds": round(self.compile_seconds, 2), "xla_flops_loops_once": self.xla_flops,
               "xla_bytes_accessed_loops_once": self.xla_bytes_accessed}
        if self.note:
            out["note"] = self.note
        return out


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency"}


def _shape_bytes(shape: str) -> float:
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _dims(shape: str) -> list[int]:
    match = _ARRAY.search(shape)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def _parse_hlo(text: str) -> tuple[dict, str | None]:
    """``{computation: [(name, shape, opcode, operands, attrs, inner)]}`` and the entry's name, from HLO text."""
    computations: dict[str, list] = {}
    entry, current = None, None
    for line in text.splitlines():
        if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
            head = line.split("(", 1)[0].split()
            current = head[-1].lstrip("%") if head else None
            if current is not None:
                computations[current] = []
                if head[0] == "ENTRY":
                    entry = current
            continue
        if current is None or " = " not in line:
            continue
        left, right = line.strip().split(" = ", 1)
        name = left.replace("ROOT", "").strip().lstrip("%")
        if right.startswith("("):  # tuple shape
            depth = 0
            for i, char in enumerate(right):  # noqa: B007 - i is read after the loop
                depth += char == "("
                depth -= char == ")"
                if depth == 0:
                    break
            shape, rest = right[:i + 1], right[i + 1:].strip()
        else:
            shape, _, rest = right.partition(" ")
        opcode, _, args = rest.partition("(")
        depth, end = 1, len(args)
        for i, char in enumerate(args):
            depth += char == "("
            depth -= char == ")"
            if depth == 0:
                end = i
                break
        operands = re.findall(r"%([\w.\-]+)", args[:end])
        computations[current].append((name, shape, opcode.strip(), operands, args[end + 1:], args[:end]))
    return computations, entry


def _conv_flops(shape: str, lhs: list[int], rhs: list[int], attrs: str) -> float:
    """FLOPs of an HLO convolution, counting only the window taps that land inside the input (XLA:TPU
    writes batched dots as convolutions whose padded window spans the batch dimension)."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    out = _dims(shape)
    if not labels or len(labels.group(1)) != len(lhs) or len(labels.group(2)) != len(rhs) \
            or len(labels.group(3)) != len(out):
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    window = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(re.findall(r"(\w+)=([\w.\-]+)", window.group(1))) if window else {}
    sizes = [int(v) for v in fields["size"].split("x")] if "size" in fields else []
    pads = [tuple(int(p) for p in v.split("_")) for v in fields["pad"].split("x")] if "pad" in fields else []
    spatial = sorted({c for c in rhs_l if c.isdigit()}, key=int)
    per_out = float(rhs[rhs_l.index("i")]) if "i" in rhs_l else 1.0
    for d, name in enumerate(spatial):
        w = sizes[d] if d < len(sizes) else rhs[rhs_l.index(name)]
        lo = pads[d][0] if d < len(pads) else 0
        n, o = lhs[lhs_l.index(name)], out[out_l.index(name)]
        if o * w > 1_000_000:
            per_out *= w
            continue
        valid = sum(1 for i in range(o) for k in range(w) if 0 <= i + k - lo < n)
        per_out *= valid / max(o, 1)
    groups = re.search(r"feature_group_count=(\d+)", attrs)
    return 2.0 * math.prod(out) * per_out / (int(groups.group(1)) if groups else 1)


def _trip_count(attrs: str, computations: dict) -> int:
    """A while loop's trip count: XLA:GPU's ``known_trip_count``, else the one integer constant its
    condition compares with (jax's scan / fori_loop counters run from 0 by 1); 1 when unknown."""
    trip = re.search(r'known_trip_count":\{"n":"(\d+)"', attrs)
    if trip:
        return int(trip.group(1))
    condition = re.search(r"condition=%?([\w.\-]+)", attrs)
    constants = set()
    for _, shape, opcode, _, _, value in computations.get(condition.group(1) if condition else "", ()):
        if opcode == "constant" and re.match(r"s32\[\]", shape) and re.fullmatch(r"-?\d+", value.strip()):
            constants.add(int(value))
    constants.discard(0)
    return constants.pop() if len(constants) == 1 and next(iter(constants)) > 0 else 1


def _updates_in_place(opcode: str, attrs: str, computations: dict) -> bool:
    """A dynamic-update-slice, or a fusion whose root is one (XLA updates such buffers in place)."""
    if opcode == "dynamic-update-slice":
        return True
    if opcode != "fusion":
        return False
    called = re.search(r"calls=%?([\w.\-]+)", attrs)
    body = computations.get(called.group(1), ()) if called else ()
    return bool(body) and body[-1][2] == "dynamic-update-slice"


_COLLECTIVES = {"all-gather", "all-gather-start", "all-reduce", "all-reduce-start", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-permute-start"}


def loop_scaled_counts(text: str) -> tuple[float, float, float, float, float]:
    """(dot FLOPs, bytes, collective bytes) of an HLO module with every ``while`` body counted
    ``known_trip_count`` times, then (dot FLOPs, bytes) counted once (as XLA's cost analysis counts loop
    bodies). Collective bytes are the per-device results of all-gathers, reductions and permutes: the
    interconnect traffic (an FSDP all-gather of a layer's weights counts the whole layer). Loops
    without a known trip count (the decode loop) count once in both."""
    computations, entry = _parse_hlo(text)
    memo: dict = {}

    def cost(name: str, weighted: bool, in_fusion: bool) -> tuple[float, float]:
        key = (name, weighted, in_fusion)
        if key in memo:
            return memo[key]
        memo[key] = (0.0, 0.0, 0.0)
        shapes = {n: shape for n, shape, *_ in computations.get(name, ())}
        flops = traffic = collective = 0.0
        for _, shape, opcode, operands, attrs, _ in computations.get(name, ()):
            if opcode == "dot" and operands:
                contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
                lhs = _dims(shapes.get(operands[0], ""))
                k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting and lhs else 1
                flops += 2.0 * math.prod(_dims(shape)) * k
            elif opcode == "convolution" and len(operands) > 1:  # XLA:TPU writes dots as convolutions
                flops += _conv_flops(shape, _dims(shapes.get(operands[0], "")), _dims(shapes.get(operands[1], "")),
                                     attrs)
            if opcode in _COLLECTIVES:
                collective += _shape_bytes(shape)
            if not in_fusion and opcode not in _NO_TRAFFIC:
                operand_bytes = [_shape_bytes(shapes.get(o, "")) for o in operands]
                if _updates_in_place(opcode, attrs, computations) and operand_bytes:
                    # a (fused) dynamic-update-slice writes its update into the buffer it aliases (the KV
                    # cache): the traffic is the update read and written, not the whole buffer
                    traffic += 2 * (sum(operand_bytes) - max(operand_bytes))
                else:
                    traffic += _shape_bytes(shape) + sum(operand_bytes)
            times = 1
            if opcode == "while" and weighted:
                times = _trip_count(attrs, computations)
            for kind, called in re.findall(r"\b(calls|body|condition|to_apply|branch_computations|"
                                           r"called_computations)=(\{[^}]*\}|%?[\w.\-]+)", attrs):
                if kind == "to_apply" and opcode != "call":
                    continue  # reduce / scatter / sort combiners: per element, already in the op
                for callee in re.findall(r"%?([\w.\-]+)", called):
                    sub_flops, sub_traffic, sub_collective = cost(callee, weighted, in_fusion or opcode == "fusion")
                    flops += times * sub_flops
                    traffic += times * sub_traffic
                    collective += times * sub_collective
        memo[key] = (flops, traffic, collective)
        return memo[key]

    if entry is None:
        return 0.0, 0.0, 0.0, 0.0, 0.0
    return (*cost(entry, True, False), *cost(entry, False, False)[:2])


def _cost(compiled) -> tuple[float, float]:
    """Per-device (flops, bytes accessed) of a compiled SPMD program, as XLA's cost analysis counts them
    (loop bodies once)."""
    analysis = None
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not implemented on some backends
        pass
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:  # the CUDA plugin's compile-only executables: XLA's generic HLO cost analysis
        from jax._src import xla_bridge
        from jax._src.lib import _jax

        module = compiled.runtime_executable().hlo_modules()[0]
        analysis = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
    return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))


def _hlo_text(compiled) -> str:
    try:
        return compiled.runtime_executable().hlo_modules()[0].to_string()
    except Exception:  # noqa: BLE001
        return compiled.as_text() or ""


class Compiler:
    """Lowers and compiles thunks for one topology, collecting a :class:`FunctionReport` each."""

    def __init__(self, topology: Topology, devices: list, *, log: Callable[[str], None] | None = None):
        self.topology, self.devices, self.log = topology, devices, log
        self.reports: list[FunctionReport] = []

    def compile(self, name: str, lower: Callable[[], Any], *, model_flops: float | None = None,
                resident: Any = None, note: str = "") -> FunctionReport:
        if self.log:
            self.log(f"compiling {name} ...")
        start = time.perf_counter()
        try:
            compiled = lower().compile()
        except Exception as err:  # noqa: BLE001 - XLA:TPU refuses an over-full program: report, don't stop
            needed = _refused_temp_bytes(err)
            if needed is None:
                raise
            return self._refused(name, needed, time.perf_counter() - start, model_flops, note)
        seconds = time.perf_counter() - start
        memory = compiled.memory_analysis()
        xla_flops, xla_accessed = _cost(compiled)
        # XLA counts a while loop's body once; scale by the loops' known trip counts (layers, micro-steps)
        dot_all, bytes_all, collective_bytes, dot_once, bytes_once = loop_scaled_counts(_hlo_text(compiled))
        flops = xla_flops * dot_all / dot_once if dot_once > 0 else xla_flops
        accessed = xla_accessed * bytes_all / bytes_once if bytes_once > 0 else xla_accessed
        chip = self.topology.chip
        report = FunctionReport(
            name=name, argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
            alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
            code_bytes=int(memory.generated_code_size_in_bytes),
            resident_bytes=device_bytes(resident) if resident is not None else 0, hbm_bytes=chip.hbm_bytes,
            usable_bytes=int(chip.hbm_bytes * chip.usable_fraction), flops=flops, bytes_accessed=accessed,
            model_flops=model_flops, peak_flops=chip.peak_flops, hbm_bandwidth=chip.hbm_bandwidth,
            devices=len(self.devices), compile_seconds=seconds, note=note, xla_flops=xla_flops,
            collective_bytes=collective_bytes,
            xla_bytes_accessed=xla_accessed)
        self.reports.append(report)
        if self.log:
            self.log(f"compiled {name} in {seconds:.1f}s")
        return report


    def _refused(self, name: str, temp_bytes: int, seconds: float, model_flops, note: str) -> FunctionReport:
        """The row of a program the compiler refused as over-full: its temporaries alone (the figure the
        refusal names; arguments not counted, so the real total is larger), and fits = no."""
        chip = self.topology.chip
        report = FunctionReport(
            name=name, argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=temp_bytes, code_bytes=0,
            resident_bytes=0, hbm_bytes=chip.hbm_bytes, usable_bytes=int(chip.hbm_bytes * chip.usable_fraction),
            refused=True, flops=0.0, bytes_accessed=0.0, model_flops=model_flops, peak_flops=chip.peak_flops,
            hbm_bandwidth=chip.hbm_bandwidth, devices=len(self.devices), compile_seconds=seconds,
            note=(note + "; " if note else "") + "REFUSED by the compiler: its temporaries alone exceed the HBM "
                                                 "(arguments not counted)")
        self.reports.append(report)
        if self.log:
            self.log(f"{name}: the compiler refused it (temporaries {temp_bytes / 1e9:.1f} GB)")
        return report


def _refused_temp_bytes(err: Exception) -> int | None:
    """The temporaries' size XLA:TPU names when it refuses an over-full program, or None for other errors."""
    match = re.search(r"memory required for HLO temporaries \(([\d.]+)([KMGT])\)", str(err))
    if "RESOURCE_EXHAUSTED" not in str(err) or not match:
        return None
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2)))


# ------------------------------------------------------------------------------------------ SFT
def compile_sft(compiler: Compiler, config, mesh, *, prefix: str = "sft/") -> AbstractRun:
    import jax
    import numpy as np

    from .data.batching import pad_rows
    from .flops import forward_flops, train_flops
    from .sft.step import make_eval_step, make_train_step
    from .sharding import micro_batch_sharding, rows_sharding

    train = config.train
    run = abstract_run(config.model, config.optimizer, mesh, train.max_steps or 1000)
    shards = run.shards
    per_micro = train.micro_batch_size * shards
    if train.global_batch_size % per_micro:
        raise AotError(f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
                       f"train.micro_batch_size ({train.micro_batch_size}) x data-parallel shards ({shards})")
    micro_steps = train.global_batch_size // per_micro
    length = config.data.max_length
    dtypes = {k: v.dtype for k, v in pad_rows([], 1, 1).items()}  # the batcher's own arrays
    batch_sharding = micro_batch_sharding(mesh, 3)
    if train.emulate_bug != "none":  # the emulated bug's per-token weights (sft/step.py), computed on the host
        dtypes["loss_weights"] = np.dtype("float32")
    batch = {k: _sds((micro_steps, per_micro, length), dtype, batch_sharding) for k, dtype in dtypes.items()}
    step = jax.jit(make_train_step(run.graphdef, run.optimizer, run.schedule, emulate_bug=train.emulate_bug,
                                   shards=shards),
                   in_shardings=(run.state_shardings, batch_sharding), out_shardings=(run.state_shardings, None),
                   donate_argnums=0)
    sequences = micro_steps * per_micro
    compiler.compile(f"{prefix}train_step", lambda: step.lower(run.state, batch),
                     model_flops=sequences * train_flops(run.model_config, length),
                     note=f"{micro_steps} micro-steps x {per_micro} rows x {length} tokens")
    if config.data.eval_files or config.data.eval_fraction > 0:
        eval_sharding = rows_sharding(mesh, 2)
        evaluate = jax.jit(make_eval_step(run.graphdef), in_shardings=(run.state_shardings["params"], eval_sharding))
        eval_batch = {k: _sds((per_micro, length), dtype, eval_sharding) for k, dtype in dtypes.items()}
        compiler.compile(f"{prefix}eval_step", lambda: evaluate.lower(run.state["params"], eval_batch),
                         model_flops=per_micro * forward_flops(run.model_config, length),
                         resident={k: v for k, v in run.state.items() if k != "params"},
                         note=f"{per_micro} rows x {length} tokens")
    return run


def compile_eval_probe(compiler: Compiler, run: AbstractRun, *, rows: int, length: int, name: str):
    """The pipeline probe's held-out loss: ``jax.jit(make_eval_step(graphdef))`` as the probe jits it."""
    import jax

    from .data.batching import pad_rows
    from .flops import forward_flops
    from .sft.step import make_eval_step
    from .sharding import rows_sharding

    sharding = rows_sharding(run.mesh, 2)
    batch = {k: _sds((rows, length), v.dtype, sharding) for k, v in pad_rows([], 1, 1).items()}
    evaluate = jax.jit(make_eval_step(run.graphdef))
    compiler.compile(name, lambda: evaluate.lower(run.state["params"], batch),
                     model_flops=rows * forward_flops(run.model_config, length),
                     resident={k: v for k, v in run.state.items() if k != "params"},
                     note=f"{rows} rows x {length} tokens")


# ------------------------------------------------------------------------------------------ sampling
def sampling_params(run: AbstractRun):
    """The parameters the sampler decodes from (:func:`sftrl_jax.sampling.sampling_layout`: shapes,
    dtypes and shardings), and whether they differ from the training parameters."""
    import jax
    from flax import nnx

    from .models.hf_io import param_shardings
    from .sampling import sampling_layout
    from .sharding import sampling_rules

    if run.mesh.size == 1:
        return run.state["params"], False
    shapes = jax.eval_shape(lambda p: nnx.to_pure_dict(nnx.state(sampling_layout(nnx.merge(run.graphdef, p)))),
                            run.state["params"])
    return _with_shardings(shapes, param_shardings(run.model, sampling_rules(run.model.rules))), True


def compile_sampler(compiler: Compiler, run: AbstractRun, *, prefix: str, prompts: int, batch_size: int, n: int,
                    prompt_length: int, max_new_tokens: int, temperature: float, top_k: int = 0, top_p: float = 1.0,
                    resident=None) -> None:
    """The sampler's jitted functions: the whole ``_generate_batch`` (its memory is the truth: prefill,
    repeated cache, decode loop), and one prefill and one decode step for their FLOPs and bytes."""
    import jax
    import jax.numpy as jnp

    from .data.batching import bucket_length
    from .sampling import _generate_batch, generation_rows
    from .sharding import named_sharding

    mesh, config = run.mesh, run.model_config
    rows = generation_rows(batch_size, prompts, run.shards)
    length = bucket_length(prompt_length, maximum=1 << 30, minimum=16)
    params, relaid = sampling_params(run)
    cache_dtype = jnp.dtype(run.model.dtype).name
    eos_ids = tuple(int(e) for e in config.eos_token_ids) or (-1,)
    rows_sharding = named_sharding(("batch", "length"), mesh)
    ids = _sds((rows, length), jnp.int32, rows_sharding)
    mask = _sds((rows, length), jnp.int32, rows_sharding)
    live = _sds((rows,), jnp.bool_, named_sharding(("batch",), mesh))
    key_shape = jax.eval_shape(lambda: jax.random.key(0))
    key = _sds(key_shape.shape, key_shape.dtype, named_sharding((), mesh))
    resident = resident if resident is not None else {}
    if relaid:
        resident = _compile_relayout(compiler, run, prefix=prefix, resident=resident)
    note = f"{rows} prompts x {n} samples, prompt {length} + {max_new_tokens} new tokens"
    compiler.compile(
        f"{prefix}generate",
        lambda: _generate_batch.lower(run.graphdef, params, ids, mask, live, key, n=n, max_new_tokens=max_new_tokens,
                                      temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                                      eos_ids=eos_ids, pad_id=0, cache_dtype=cache_dtype, split_layers=False),
        resident=resident,
        note=note + "; memory is the whole generation's; FLOPs/bytes count the decode while_loop (no known trip "
                    "count) once on GPU and up to max_new_tokens times on TPU, so no MFU here (see "
                    "prefill/decode_step)")
    _compile_prefill_and_decode(compiler, run, params, ids, mask, prefix=prefix, n=n, max_new_tokens=max_new_tokens,
                                cache_dtype=cache_dtype, resident=resident, relaid=relaid)


def _compile_relayout(compiler: Compiler, run: AbstractRun, *, prefix: str, resident: dict) -> dict:
    """Compile the training -> decode parameter relayout; return what is resident while sampling after it."""
    import jax
    from flax import nnx

    from .sampling import sampling_layout

    # the relayout itself (once per rollout phase): training params in, sampling copy out
    def relayout_fn(p):
        return nnx.to_pure_dict(nnx.state(sampling_layout(nnx.merge(run.graphdef, p))))

    compiler.compile(f"{prefix}sampling_layout", lambda: jax.jit(relayout_fn).lower(run.state["params"]),
                     resident=resident, note="training params -> decode layout (once per rollout phase)")
    return {"during_sampling": resident, "train_params": run.state["params"]}


def _compile_prefill_and_decode(compiler: Compiler, run: AbstractRun, params, ids, mask, *, prefix: str, n: int,
                                max_new_tokens: int, cache_dtype: str, resident: dict, relaid: bool) -> None:
    """One prefill of the ``ids``/``mask`` prompts and one decode step (also from the training layout if
    ``relaid``), for their FLOPs and bytes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from .flops import forward_flops, generation_flops
    from .models.decoder import init_cache
    from .sharding import named_sharding

    mesh, config = run.mesh, run.model_config
    rows, length = ids.shape
    total_rows = rows * n
    max_len = length + max_new_tokens

    def prefill(p, prompt_ids, prompt_mask):
        model = nnx.merge(run.graphdef, p)
        return model.prefill(prompt_ids, prompt_mask, init_cache(model.config, rows, max_len, cache_dtype))

    compiler.compile(f"{prefix}prefill", lambda: jax.jit(prefill).lower(params, ids, mask),
                     model_flops=rows * forward_flops(config, length), resident=resident,
                     note=f"{rows} prompts x {length} tokens into a {max_len}-slot cache")

    cache_shapes = jax.eval_shape(lambda: init_cache(config, total_rows, max_len, cache_dtype))

    def cache_sharding(leaf):
        axes = {5: ("layers", "batch", "kv_heads", "length", "head_dim"), 2: ("batch", "length")}.get(leaf.ndim)
        return named_sharding(axes or (), mesh, shape=leaf.shape if axes else None)

    cache = jax.tree.map(lambda leaf: _sds(leaf.shape, leaf.dtype, cache_sharding(leaf)), cache_shapes)
    tokens = _sds((total_rows,), jnp.int32, named_sharding(("batch",), mesh))

    def decode(p, token, kv):
        return nnx.merge(run.graphdef, p).decode(token, kv)

    decode_flops = total_rows * generation_flops(config, max_len, 1, prefill=False)
    compiler.compile(f"{prefix}decode_step", lambda: jax.jit(decode, donate_argnums=2).lower(params, tokens, cache),
                     model_flops=decode_flops, resident=resident,
                     note=f"{total_rows} rows, one token against a {max_len}-slot cache (cache donated)")
    if relaid:  # the same step from the training layout: what the decode layout saves per token
        compiler.compile(f"{prefix}decode_step[train_layout]",
                         lambda: jax.jit(decode, donate_argnums=2).lower(run.state["params"], tokens, cache),
                         model_flops=decode_flops, resident=resident["during_sampling"],
                         note="decode_step with the FSDP training parameters, for comparison")


# ------------------------------------------------------------------------------------------ RL
def rl_batch_shapes(config, prompt_length: int) -> tuple[dict, int, int]:
    """Keys and dtypes of an RL update batch, from the trainer's own ``rollout_arrays`` on a dummy rollout,
    and the (prompt, response) lengths a full-budget rollout pads to."""
    import numpy as np

    from .data.batching import bucket_length
    from .rl.algorithms import compute_advantages
    from .rl.rollouts import Rollouts, rollout_arrays

    dummy = Rollouts(prompts=[[1]], responses=[[1]], sampler_logprobs=[[0.0]], truncated=[False], correctness=[0.0],
                     rewards=[0.0])
    arrays = rollout_arrays(dummy, max_new_tokens=max(config.sampling.max_new_tokens, 16), mask_truncated=False,
                            pad_id=0)
    sampler_logp = arrays.pop("sampler_logp")
    arrays["advantages"] = np.asarray(compute_advantages([0.0], 1, norm_by_std=config.rl.norm_adv_by_std))
    dtypes = {k: (v.dtype, v.ndim) for k, v in arrays.items()}
    prompt_len = bucket_length(prompt_length, maximum=1 << 30, minimum=16)
    response_len = bucket_length(config.sampling.max_new_tokens, maximum=config.sampling.max_new_tokens,
                                 minimum=16)
    return {"dtypes": dtypes, "logp_dtype": sampler_logp.dtype}, prompt_len, response_len


def _rl_arrays(spec: dict, leading: tuple, prompt_len: int, response_len: int, mesh, *, logp_keys=()) -> dict:
    from .sharding import micro_batch_sharding

    out = {}
    for key, (dtype, ndim) in spec["dtypes"].items():
        if ndim == 1:
            shape = leading
        elif key.startswith("response"):
            shape = leading + (response_len,)
        else:
            shape = leading + (prompt_len + response_len,)
        out[key] = _sds(shape, dtype, micro_batch_sharding(mesh, len(shape)))
    for key in logp_keys:
        shape = leading + (response_len,)
        out[key] = _sds(shape, spec["logp_dtype"], micro_batch_sharding(mesh, len(shape)))
    return out


def compile_rl(compiler: Compiler, config, mesh, *, prefix: str = "rl/") -> AbstractRun:
    import jax

    from .flops import forward_flops, train_flops
    from .rl.rollouts import check_batch_sizes
    from .rl.step import make_grpo_step, make_logprob_fn
    from .sharding import micro_batch_sharding

    cfg, sampling = config.rl, config.sampling
    updates = (config.train.max_steps or 1000) * cfg.mini_batches_per_step * cfg.ppo_epochs
    run = abstract_run(config.model, config.optimizer, mesh, updates)
    shards = run.shards
    try:
        micro_steps = check_batch_sizes(config, shards)
    except ValueError as err:
        raise AotError(str(err)) from None
    rows = config.train.micro_batch_size * shards
    spec, prompt_len, response_len = rl_batch_shapes(config, config.data.max_prompt_length)
    sequences = cfg.prompts_per_step * sampling.n
    ref = run.state["params"] if cfg.kl_coef > 0 else None
    logp_keys = ("old_logp", "ref_logp") if cfg.kl_coef > 0 else ("old_logp",)
    batch_sharding = micro_batch_sharding(mesh, 2)
    seq_len = prompt_len + response_len
    note = f"prompt {prompt_len} + response {response_len} tokens"

    update = jax.jit(make_grpo_step(run.graphdef, run.optimizer, run.schedule, cfg,
                                    temperature=sampling.temperature, max_new_tokens=sampling.max_new_tokens),
                     in_shardings=(run.state_shardings, batch_sharding), out_shardings=(run.state_shardings, None),
                     donate_argnums=0)
    mini = _rl_arrays(spec, (micro_steps, rows), prompt_len, response_len, mesh, logp_keys=logp_keys)
    compiler.compile(f"{prefix}grpo_update", lambda: update.lower(run.state, mini),
                     model_flops=micro_steps * rows * train_flops(run.model_config, seq_len), resident=ref,
                     note=f"one mini-batch: {micro_steps} micro-steps x {rows} rows, {note}")

    logprobs_of = jax.jit(make_logprob_fn(run.graphdef, sampling.temperature),
                          in_shardings=(run.state_shardings["params"], batch_sharding))
    laid = _rl_arrays(spec, (sequences // rows, rows), prompt_len, response_len, mesh)
    others = {k: v for k, v in run.state.items() if k != "params"}
    compiler.compile(f"{prefix}logprobs", lambda: logprobs_of.lower(run.state["params"], laid),
                     model_flops=sequences * forward_flops(run.model_config, seq_len),
                     resident={"state": others, "ref": ref},
                     note=f"old{' and ref' if ref is not None else ''} log-probs: {sequences} sequences, {note}")

    compile_sampler(compiler, run, prefix=prefix, prompts=cfg.prompts_per_step, batch_size=sampling.batch_size,
                    n=sampling.n, prompt_length=config.data.max_prompt_length, max_new_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                    resident={"state": run.state, "ref": ref})
    return run


# ------------------------------------------------------------------------------------------ pipeline
def compile_pipeline(compiler: Compiler, config, mesh) -> None:
    from .pipeline import stage_config

    seen: dict[str, str] = {}
    first_run = None
    for index, stage in enumerate(config.stages):
        try:
            stage_cfg = stage_config(config, index, config.model.path)
        except ValueError as err:
            raise AotError(str(err)) from None
        key = json.dumps({k: v for k, v in dataclasses.asdict(stage_cfg).items() if k != "output_dir"}, sort_keys=True,
                         default=str)
        prefix = f"stage{index + 1}_{stage.kind}/"
        if key in seen:
            if compiler.log:
                compiler.log(f"stage {index + 1} compiles the same functions as {seen[key]}")
            continue
        seen[key] = prefix
        run = (compile_sft if stage.kind == "sft" else compile_rl)(compiler, stage_cfg, mesh, prefix=prefix)
        first_run = first_run or run
    probe = config.probe
    if first_run is not None and probe.sft_files:
        compile_eval_probe(compiler, first_run, rows=first_run.shards * 4, length=probe.max_length,
                           name="probe/eval_step")
    if first_run is not None and probe.prompt_files:
        compile_sampler(compiler, first_run, prefix="probe/", prompts=probe.prompt_limit,
                        batch_size=probe.sampling.batch_size, n=probe.sampling.n,
                        prompt_length=probe.max_prompt_length, max_new_tokens=probe.sampling.max_new_tokens,
                        temperature=probe.sampling.temperature,
                        resident={k: v for k, v in first_run.state.items() if k != "params"})


# ------------------------------------------------------------------------------------------ entry
def compile_run(config_path, topology_name: str, overrides=(), *, kind: str | None = None,
                log: Callable[[str], None] | None = None) -> dict:
    """Compile every jitted function of the run ``config_path`` describes for ``topology_name``.

    Returns ``{"topology", "devices", "kind", "chip", "functions": [FunctionReport.to_json(), ...]}``.
    """
    topology = parse_topology(topology_name)
    kind, config = load_run_config(config_path, overrides, kind)
    devices = topology_devices(topology)
    mesh = mesh_for(config.mesh, devices, topology)
    compiler = Compiler(topology, devices, log=log)
    start = time.perf_counter()
    if kind == "sft":
        compile_sft(compiler, config, mesh)
    elif kind == "rl":
        compile_rl(compiler, config, mesh)
    else:
        compile_pipeline(compiler, config, mesh)
    chip = topology.chip
    return {"topology": topology.name, "devices": len(devices), "kind": kind, "jax_topology": topology.jax_name,
            "chip": {"name": chip.name, "hbm_bytes": chip.hbm_bytes, "peak_flops": chip.peak_flops,
                     "hbm_bandwidth": chip.hbm_bandwidth, "usable_fraction": chip.usable_fraction},
            "mesh": dict(mesh.shape), "seconds": round(time.perf_counter() - start, 1),
            "functions": [r.to_json() for r in compiler.reports]}


def format_table(result: dict) -> str:
    gb = 1e9
    chip = result["chip"]
    lines = [f"{result['kind']} on {result['topology']} ({result['jax_topology']}): {result['devices']} x "
             f"{chip['name']}, mesh {result['mesh']}; {chip['hbm_bytes'] / gb:.1f} GB HBM"
             + (f" ({100 * chip['usable_fraction']:.0f}% usable)" if chip["usable_fraction"] < 1 else "")
             + f", {chip['peak_flops'] / 1e12:.0f} TFLOP/s bf16, {chip['hbm_bandwidth'] / gb:.0f} GB/s",
             "per device, GB: args / out / alias / temp / total (+ resident = peak) vs usable HBM; TFLOP and GB "
             "accessed per device (compiled module); roofline time bound; MFU that bound implies"]
    header = (f"{'function':<30} {'args':>7} {'out':>7} {'alias':>7} {'temp':>7} {'total':>7} {'+resid':>7} "
              f"{'peak':>7} {'HBM':>6} {'fits':>11} {'TFLOP':>9} {'GB acc':>9} {'bound':>9} {'MFU<=':>6} "
              f"{'compile':>8}")
    lines += [header, "-" * len(header)]
    for f in result["functions"]:
        headroom = f["headroom_bytes"] / gb
        fits = ("yes" if f["fits"] else "NO") + f" {headroom:+.1f}"
        mfu = f"{100 * f['mfu_bound']:.0f}%" if f["mfu_bound"] is not None else "-"
        bound = f["time_bound_s"]
        bound_text = f"{bound * 1e3:.1f}ms" if bound < 10 else f"{bound:.1f}s"
        lines.append(
            f"{f['name']:<30} {f['argument_bytes'] / gb:7.2f} {f['output_bytes'] / gb:7.2f} "
            f"{f['alias_bytes'] / gb:7.2f} {f['temp_bytes'] / gb:7.2f} {f['total_bytes'] / gb:7.2f} "
            f"{f['resident_bytes'] / gb:7.2f} {f['peak_bytes'] / gb:7.2f} {f['usable_bytes'] / gb:6.1f} "
            f"{fits:>11} {f['flops'] / 1e12:9.2f} {f['bytes_accessed'] / gb:9.2f} {bound_text:>9} {mfu:>6} "
            f"{f['compile_seconds']:7.1f}s")
    notes = [f"  {f['name']}: {f['note']}" for f in result["functions"] if f.get("note")]
    return "\n".join(lines + ["shapes:"] + notes)


def main_compile(config_path, topology_name: str, overrides=(), *, json_out=None, kind=None, quiet=False) -> int:
    import sys

    log = None if quiet else (lambda message: print(f"sftrl-jax compile: {message}", file=sys.stderr, flush=True))
    result = compile_run(config_path, topology_name, overrides, kind=kind, log=log)
    print(format_table(result))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {json_out}")
    over = [f["name"] for f in result["functions"] if not f["fits"]]
    if over:
        print(f"does not fit {topology_name}: {', '.join(over)}", file=sys.stderr)
    return 1 if over else 0

