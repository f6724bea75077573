"""The driver and report of ``sftrl-jax compile``: compile thunks for a topology, one row per function.

:class:`Compiler` lowers and compiles what a recipe (:mod:`sftrl_jax.aot.recipes`) hands it and keeps a
:class:`FunctionReport` each; :func:`compile_run` runs the recipe of a config's kind;
:func:`format_table` and :func:`main_compile` print the rows. The recipes import this module, so
:func:`compile_run` imports them when it is called.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cost import _cost, _hlo_text, _refused_temp_bytes, loop_scaled_counts
from .topology import AotError, Topology, mesh_for, parse_topology, topology_devices


def device_bytes(tree) -> int:
    """Bytes one device holds of the ShapeDtypeStructs in ``tree`` (their shards)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


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
    # XLA:TPU's own run-time estimate (cost.py's _cost), loop-scaled like `flops`; None where absent (GPU)
    optimal_seconds: float | None = None
    xla_optimal_seconds: float | None = None  # as reported (loop bodies counted once)
    inputs: tuple[str, ...] = ()  # the argument leaves the compiled program reads (unused ones are pruned)

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

    @property
    def mfu_optimal(self) -> float | None:
        """The MFU of the model FLOPs in the compiler's own time estimate (``optimal_seconds``)."""
        if not self.model_flops or not self.optimal_seconds:
            return None
        return self.model_flops / (self.optimal_seconds * self.peak_flops * self.devices)

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
               "xla_bytes_accessed_loops_once": self.xla_bytes_accessed, "optimal_seconds": self.optimal_seconds,
               "mfu_optimal": self.mfu_optimal, "xla_optimal_seconds_loops_once": self.xla_optimal_seconds,
               "inputs": list(self.inputs)}
        if self.note:
            out["note"] = self.note
        return out


class Compiler:
    """Lowers and compiles thunks for one topology, collecting a :class:`FunctionReport` each."""

    def __init__(self, topology: Topology, devices: list, *, log: Callable[[str], None] | None = None):
        self.topology, self.devices, self.log = topology, devices, log
        self.reports: list[FunctionReport] = []
        self.rollouts: dict[str, dict] = {}  # per sampler (its prefix): the engines' modelled generation time

    def compile(self, name: str, lower: Callable[[], Any], *, model_flops: float | None = None,
                resident: Any = None, note: str = "") -> FunctionReport:
        if self.log:
            self.log(f"compiling {name} ...")
        start = time.perf_counter()
        try:
            lowered = lower()
            inputs = kept_inputs(lowered)
            compiled = lowered.compile()
        except Exception as err:  # noqa: BLE001 - XLA:TPU refuses an over-full program: report, don't stop
            needed = _refused_temp_bytes(err)
            if needed is None:
                raise
            return self._refused(name, needed, time.perf_counter() - start, model_flops, note)
        seconds = time.perf_counter() - start
        memory = compiled.memory_analysis()
        xla_flops, xla_accessed, xla_optimal = _cost(compiled)
        # XLA counts a while loop's body once; scale by the loops' known trip counts (layers, micro-steps)
        dot_all, bytes_all, collective_bytes, dot_once, bytes_once = loop_scaled_counts(_hlo_text(compiled))
        flops = xla_flops * dot_all / dot_once if dot_once > 0 else xla_flops
        accessed = xla_accessed * bytes_all / bytes_once if bytes_once > 0 else xla_accessed
        # XLA's time estimate counts loop bodies once too; it is scaled by the FLOPs' ratio, as the loops
        # that repeat (layers, micro-steps) are the matmul-heavy part of a step. Checked against the same
        # programs compiled with the layer loop unrolled (Qwen3-0.6B on v5p-8, one micro-step): the
        # scanned program's estimate times this ratio is 4-7% above the unrolled one's for the SFT train
        # and eval steps, 40% above for the GRPO update and log-probs; times the bytes' ratio it is 36-190%
        # above for the SFT steps, as the loop-scaled bytes count a stacked operand (a layer's weights
        # sliced from the [layers, ...] stack) whole in every iteration. Any one ratio also multiplies the
        # work outside the loops, so where that is a large share (prefill, decode_step: 3-5x the unrolled
        # estimate) the estimate is too long and its MFU too low.
        optimal = xla_optimal * dot_all / dot_once if xla_optimal is not None and dot_once > 0 else xla_optimal
        chip = self.topology.chip
        report = FunctionReport(
            name=name, argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
            alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
            code_bytes=int(memory.generated_code_size_in_bytes),
            resident_bytes=device_bytes(resident) if resident is not None else 0, hbm_bytes=chip.hbm_bytes,
            usable_bytes=int(chip.hbm_bytes * chip.usable_fraction), flops=flops, bytes_accessed=accessed,
            model_flops=model_flops, peak_flops=chip.peak_flops, hbm_bandwidth=chip.hbm_bandwidth,
            devices=len(self.devices), compile_seconds=seconds, note=note, xla_flops=xla_flops,
            collective_bytes=collective_bytes, xla_bytes_accessed=xla_accessed, optimal_seconds=optimal,
            xla_optimal_seconds=xla_optimal, inputs=inputs)
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


# ------------------------------------------------------------------------------------------ entry
def kept_inputs(lowered) -> tuple[str, ...]:
    """The argument leaves (``batch['chord_mu']``, ...) a lowered program takes: jit prunes the arguments a
    function never reads, and the entry function's signature names the rest."""
    text = lowered.as_text(debug_info=True)
    start = text.find("func.func public @main(")
    if start < 0:
        return ()
    signature = text[start:text.find("\n", start)]
    return tuple(re.findall(r'loc\("([^"]+)"\)', signature))


def weight_count(model) -> int:
    """A lower bound on a model's parameter count from its config alone: the embedding (and an untied output
    head), and each layer's attention and MLP matrices (biases and norms left out)."""
    attention = model.hidden_size * model.head_dim * (2 * model.num_heads + 2 * model.num_kv_heads)
    mlp = 3 * model.hidden_size * model.intermediate_size
    embeddings = model.vocab_size * model.hidden_size * (1 if model.tie_word_embeddings else 2)
    return embeddings + model.num_layers * (attention + mlp)


def refuse_oversized_model(config, topology: Topology, devices: int) -> None:
    """Refuse, before anything is traced, a model whose weights alone exceed the HBM of every chip of the
    topology together: no sharding can hold it, and XLA would spend minutes on its enormous shapes first."""
    import numpy as np

    from ..models.config import ModelConfig
    from ..models.hf_io import read_json

    config_file = Path(config.model.path) / "config.json"
    model = ModelConfig.from_hf_dict(read_json(config_file), source_dir=str(config.model.path))
    weights = weight_count(model) * np.dtype(config.model.dtype).itemsize
    hbm = devices * topology.chip.hbm_bytes * topology.chip.usable_fraction
    if weights > hbm:
        raise AotError(f"{config_file}: the model's weights alone take at least {weights / 1e9:,.0f} GB "
                       f"({model.num_layers:,} layers, hidden_size {model.hidden_size:,}), more than the "
                       f"{hbm / 1e9:,.0f} GB of HBM of all {devices} devices of {topology.name}; check the config, "
                       "or choose a larger topology")


def compile_run(config_path, topology_name: str, overrides=(), *, kind: str | None = None,
                log: Callable[[str], None] | None = None) -> dict:
    """Compile every jitted function of the run ``config_path`` describes for ``topology_name``.

    Returns ``{"topology", "devices", "kind", "chip", "functions": [FunctionReport.to_json(), ...]}``.
    """
    from .recipes import compile_pipeline, compile_rl, compile_sft, load_run_config

    topology = parse_topology(topology_name)
    kind, config = load_run_config(config_path, overrides, kind)
    devices = topology_devices(topology)
    refuse_oversized_model(config, topology, len(devices))
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
            "functions": [r.to_json() for r in compiler.reports],
            **({"rollouts": compiler.rollouts} if compiler.rollouts else {})}


def format_table(result: dict) -> str:
    gb = 1e9
    chip = result["chip"]
    lines = [f"{result['kind']} on {result['topology']} ({result['jax_topology']}): {result['devices']} x "
             f"{chip['name']}, mesh {result['mesh']}; {chip['hbm_bytes'] / gb:.1f} GB HBM"
             + (f" ({100 * chip['usable_fraction']:.0f}% usable)" if chip["usable_fraction"] < 1 else "")
             + f", {chip['peak_flops'] / 1e12:.0f} TFLOP/s bf16, {chip['hbm_bandwidth'] / gb:.0f} GB/s",
             "per device, GB: args / out / alias / temp / total (+ resident = peak) vs usable HBM; TFLOP and GB "
             "accessed per device (compiled module); roofline time bound and XLA:TPU's own estimate (xla t); the "
             "MFU each implies"]
    header = (f"{'function':<30} {'args':>7} {'out':>7} {'alias':>7} {'temp':>7} {'total':>7} {'+resid':>7} "
              f"{'peak':>7} {'HBM':>6} {'fits':>11} {'TFLOP':>9} {'GB acc':>9} {'bound':>9} {'xla t':>9} "
              f"{'MFU<=':>6} {'MFU@t':>6} {'compile':>8}")
    lines += [header, "-" * len(header)]
    for f in result["functions"]:
        headroom = f["headroom_bytes"] / gb
        fits = ("yes" if f["fits"] else "NO") + f" {headroom:+.1f}"
        mfu = f"{100 * f['mfu_bound']:.0f}%" if f["mfu_bound"] is not None else "-"
        mfu_optimal = f"{100 * f['mfu_optimal']:.0f}%" if f.get("mfu_optimal") is not None else "-"
        bound_text = _seconds(f["time_bound_s"])
        optimal_text = _seconds(f["optimal_seconds"]) if f.get("optimal_seconds") is not None else "-"
        lines.append(
            f"{f['name']:<30} {f['argument_bytes'] / gb:7.2f} {f['output_bytes'] / gb:7.2f} "
            f"{f['alias_bytes'] / gb:7.2f} {f['temp_bytes'] / gb:7.2f} {f['total_bytes'] / gb:7.2f} "
            f"{f['resident_bytes'] / gb:7.2f} {f['peak_bytes'] / gb:7.2f} {f['usable_bytes'] / gb:6.1f} "
            f"{fits:>11} {f['flops'] / 1e12:9.2f} {f['bytes_accessed'] / gb:9.2f} {bound_text:>9} "
            f"{optimal_text:>9} {mfu:>6} {mfu_optimal:>6} {f['compile_seconds']:7.1f}s")
    notes = [f"  {f['name']}: {f['note']}" for f in result["functions"] if f.get("note")]
    return "\n".join(lines + ["shapes:"] + notes)


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f}ms" if value < 10 else f"{value:.1f}s"


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

