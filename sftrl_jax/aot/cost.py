"""The cost model of ``sftrl-jax compile``: FLOPs, bytes and collective traffic read from compiled HLO text.

XLA's cost analysis counts a ``while`` body once. :func:`loop_scaled_counts` parses the compiled
module's text (:func:`parse_hlo`) and counts every loop body as many times as the loop runs
(:func:`trip_count`), so a scan over layers or micro-steps is counted whole; the ratio of its
loop-scaled to its once-counted figures rescales XLA's own numbers. Everything here up to
:func:`loop_scaled_counts` is pure (HLO text in, numbers out), and so is ``_refused_temp_bytes`` (an
error message in); ``_cost`` and ``_hlo_text`` read a compiled executable.
"""

from __future__ import annotations

import math
import re

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


def parse_hlo(text: str) -> tuple[dict, str | None]:
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


def conv_flops(shape: str, lhs: list[int], rhs: list[int], attrs: str) -> float:
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


def trip_count(attrs: str, computations: dict) -> int:
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
    computations, entry = parse_hlo(text)
    memo: dict = {}

    def cost(name: str, weighted: bool, in_fusion: bool) -> tuple[float, float, float]:
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
                flops += conv_flops(shape, _dims(shapes.get(operands[0], "")), _dims(shapes.get(operands[1], "")),
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
                times = trip_count(attrs, computations)
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


def _cost(compiled) -> tuple[float, float, float | None]:
    """Per-device (flops, bytes accessed, optimal seconds) of a compiled SPMD program, as XLA's cost
    analysis counts them (loop bodies once).

    The optimal seconds are XLA:TPU's own estimate of the program's run time from its per-op cost model
    (``cost_analysis()["optimal_seconds"]``; for a single large matmul or elementwise op on v5p it is 1.15
    to 1.35 x the roofline max(FLOPs / peak, bytes / bandwidth)), with a ``while`` body counted once like
    the FLOPs and bytes. None where the compiler gives none: the CUDA plugin's executables have no
    ``cost_analysis()``, and XLA's generic HLO cost analysis used for them has no time estimate."""
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
        return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)), None
    optimal = analysis.get("optimal_seconds")
    optimal = float(optimal) if optimal is not None and optimal > 0 else None
    return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)), optimal


def _hlo_text(compiled) -> str:
    try:
        return compiled.runtime_executable().hlo_modules()[0].to_string()
    except Exception:  # noqa: BLE001
        return compiled.as_text() or ""


def _refused_temp_bytes(err: Exception) -> int | None:
    """The temporaries' size XLA:TPU names when it refuses an over-full program, or None for other errors."""
    match = re.search(r"memory required for HLO temporaries \(([\d.]+)([KMGT])\)", str(err))
    if "RESOURCE_EXHAUSTED" not in str(err) or not match:
        return None
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2)))

