"""``sftrl-jax compile``: ahead-of-time compile a run's jitted functions for a TPU slice or GPU host, on a CPU.

    sftrl-jax compile --config configs/tpu/sft_qwen2.5-math-7b_v5p-64.yaml --topology v5p-64 \\
        model.path=configs/models/Qwen2.5-Math-7B [--json OUT.json]

The config (SFT, RL or pipeline; its ``kind:``, or ``--kind``) is read as the trainers
read it, the model is built abstractly from ``model.path``'s ``config.json`` (no weights are read:
a directory holding only ``config.json`` is enough), the mesh is the config's ``mesh`` laid over the
topology's compile-only devices, and every jitted function the run uses is lowered with
``jax.ShapeDtypeStruct`` arguments (shape, dtype and ``NamedSharding``) and compiled by the target's
real XLA compiler (libtpu's XLA:TPU; jax-cuda12-plugin's XLA:GPU, a real sm_90a executable).
The functions are the trainers' own declarations (:class:`sftrl_jax.jitted.JitSpec` from
``sft.step.sft_functions``, ``rl.step.rl_functions``, ``probe.probe_eval_spec``: the same function,
shardings and donation the trainer jits, with the abstract arguments of the largest call a run makes:
packed / padded rows at ``max_length``; prompts at ``max_prompt_length``, responses at
``max_new_tokens``), and the sampler's ``_generate_batch`` with one ``Decoder.prefill`` and one
``Decoder.decode`` step for their FLOPs and bytes.

Per function it reports XLA's per-device memory (arguments, outputs, aliased = donated, temporaries),
the arrays that stay alive in HBM outside the function (``resident``: e.g. the optimizer state
while sampling), whether it fits the chip's memory, the compiled per-device FLOPs and bytes, and the
roofline bound ``max(FLOPs / peak, bytes / HBM bandwidth)`` with the MFU that bound implies for the
model FLOPs of :mod:`sftrl_jax.flops` (``mfu_bound``). It is an upper bound on MFU, not a prediction.
On TPUs it also reports XLA:TPU's own estimate of the run time (``optimal_seconds``, the compiler's
per-op cost model, loop-scaled as below) and the MFU that implies (``mfu_optimal``); the GPU
compiler gives no such estimate (``-`` in the table, ``null`` in the JSON).

Modules: :mod:`~sftrl_jax.aot.topology` (chips, topology names, compile-only devices, the mesh),
:mod:`~sftrl_jax.aot.cost` (the HLO text parser and loop-scaled cost model),
:mod:`~sftrl_jax.aot.report` (:class:`Compiler`, :class:`FunctionReport`, :func:`compile_run`, the table)
and :mod:`~sftrl_jax.aot.recipes` (what each kind of run compiles). Importing the package imports no jax.

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
traffic, e.g. FSDP all-gathers). XLA's FLOPs and ``optimal_seconds`` are rescaled by the ratio of
loop-scaled to once-counted dot FLOPs, its bytes by that of bytes; the time estimate so also multiplies
the work outside the loops and is too long where that work is a large share (prefill, decode). The
decode ``while_loop`` stops at EOS and has no known trip count (XLA:GPU counts it once; on TPU its bound,
``max_new_tokens``, may be taken as the count), so ``generate`` rows are for memory and have no MFU. Custom
calls (Pallas splash attention, cuDNN) are invisible to the cost analysis, hence the time bound takes
the larger of the compiler's and the model's FLOPs. GPU kernels are not autotuned. XLA:GPU compiles a
program larger than the HBM ("fits" is our comparison); XLA:TPU refuses one, which is reported as a
row that does not fit, with the temporaries it names.
"""

from .cost import _refused_temp_bytes as _refused_temp_bytes, conv_flops, loop_scaled_counts, parse_hlo, trip_count
from .recipes import (
    COMPILABLE_KINDS,
    compile_declared,
    compile_pipeline,
    compile_rl,
    compile_sampler,
    compile_sft,
    detect_kind,
    load_run_config,
    sampling_params,
)
from .report import Compiler, FunctionReport, compile_run, device_bytes, format_table, main_compile
from .topology import (
    CHIPS,
    GIB,
    GPU_MEM_FRACTION,
    GPU_SPECS,
    INSTALL_HINT,
    AotError,
    Chip,
    Topology,
    gpu_spec_figures,
    gpu_spec_text,
    known_topologies,
    mesh_for,
    parse_topology,
    topology_devices,
)

__all__ = [
    "GIB", "INSTALL_HINT", "AotError", "Chip", "CHIPS", "GPU_MEM_FRACTION", "GPU_SPECS", "Topology",
    "known_topologies", "parse_topology", "gpu_spec_text", "gpu_spec_figures", "topology_devices", "mesh_for",
    "parse_hlo", "conv_flops", "trip_count", "loop_scaled_counts",
    "FunctionReport", "Compiler", "compile_run", "format_table", "main_compile", "device_bytes",
    "COMPILABLE_KINDS", "detect_kind", "load_run_config", "compile_declared", "compile_sft", "sampling_params",
    "compile_sampler", "compile_rl", "compile_pipeline",
]
