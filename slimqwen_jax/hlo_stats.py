"""What a compiled program's HLO text says about one execution: the bytes its collectives move,
with every loop body counted as many times as the loop runs.

XLA's `cost_analysis()` counts each while-loop body once (checked on a TPU compile: a 10-step scan of
a matmul reports the FLOPs of one matmul), so a train step that scans its layers and accumulates
gradients over micro-batches would be under-counted many times over. Here each computation gets the
number of times one execution runs it (`run_counts`): the entry computation once, a loop body its
trip count times its caller's count, anything else called (fusions, reductions, branches) its
caller's count.
"""

from __future__ import annotations

import collections
import math
import re

# Collective instructions and the bytes each moves per device: the size of its result (for the async
# pairs, of the `-done` half, whose result is the collective's output; the `-start` half is skipped),
# except `ragged-all-to-all`, whose result is the receive buffer sized for the worst case: its first
# operand, the send buffer (what a dropless exchange pads its rows to), bounds what it sends.
COLLECTIVES = {
    "all-reduce": "all-reduce", "all-reduce-done": "all-reduce",
    "all-gather": "all-gather", "all-gather-done": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-to-all": "all-to-all", "ragged-all-to-all": "ragged-all-to-all",
    "collective-permute": "collective-permute", "collective-permute-done": "collective-permute",
}  # fmt: skip
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}  # fmt: skip

_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_CALLEES = re.compile(r"\b(body|condition|to_apply|calls|branch_computations|called_computations)=\{?(%[^,}\s]+(?:, %[^,}\s]+)*)")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_BOUND = re.compile(r"(\d+)\)")  # the rest of a `constant(N)` line


def array_dims(shape: str) -> list[tuple[int, ...]]:
    """The dimensions of each array of an HLO shape string (one for an array, several for a tuple)."""
    return [tuple(int(d) for d in dims.split(",") if d) for _, dims in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, e.g. 'bf16[512,128]{1,0:T(8,128)}' or a tuple of them."""
    return int(sum(DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
                   for dtype, dims in _ARRAY.findall(shape)))  # fmt: skip


def parse(hlo_text: str) -> tuple[dict[str, list[tuple]], str]:
    """({computation: [(name, shape, opcode, rest of line)]}, entry computation's name)."""
    computations, entry, current = {}, "", None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(1), [])
            entry = header.group(1) if line.startswith("ENTRY") else entry
            continue
        instruction = _INSTRUCTION.match(line) if current is not None else None
        if instruction:
            current.append(instruction.groups())
    return computations, entry


def _trip_count(rest: str, condition: list[tuple]) -> int | None:
    """A while loop's trip count: XLA's `known_trip_count`, else the bound N of a condition that
    compares a counter (from 0, step 1: how jax lowers scans and fori loops) `LT` a constant N."""
    known = _TRIP_COUNT.search(rest)
    if known:
        return int(known.group(1))
    constants = [int(m.group(1)) for _, _, opcode, tail in condition if opcode == "constant"
                 for m in [_BOUND.match(tail)] if m]  # fmt: skip
    compares = [tail for _, _, opcode, tail in condition if opcode == "compare" and "direction=LT" in tail]
    return constants[0] if len(constants) == 1 and len(compares) == 1 else None


def run_counts(computations: dict[str, list[tuple]], entry: str) -> tuple[dict[str, int], int]:
    """(times one execution of `entry` runs each computation, number of loops of unknown trip count,
    counted as running once)."""
    callers = collections.defaultdict(list)  # callee -> [(caller, factor)]
    unknown = 0
    for name, instructions in computations.items():
        for _, _, opcode, rest in instructions:
            calls = {kind: [c.lstrip("%") for c in names.split(", ")] for kind, names in _CALLEES.findall(rest)}
            trips = 1
            if opcode == "while" and "body" in calls:
                trips = _trip_count(rest, computations.get(calls.get("condition", [""])[0], []))
                unknown += trips is None
                trips = 1 if trips is None else trips
            for kind, callees in calls.items():
                for callee in callees:
                    callers[callee].append((name, trips if kind == "body" else 1))
    counts: dict[str, int] = {}

    def count(name: str) -> int:
        if name not in counts:
            counts[name] = 1 if name == entry else sum(count(caller) * factor for caller, factor in callers[name])
        return counts[name]

    for name in computations:
        count(name)
    return counts, unknown


def collective_arrays(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(kind, result dimensions) of every collective in the HLO text, one entry per array of a tuple
    result, each instruction once (not weighted by `run_counts`): e.g. ("all-reduce", (16, 16, 8))."""
    computations, _ = parse(hlo_text)
    return [(COLLECTIVES[opcode], dims) for instructions in computations.values()
            for _, shape, opcode, _ in instructions if opcode in COLLECTIVES for dims in array_dims(shape)]  # fmt: skip


def collective_bytes(hlo_text: str) -> tuple[dict[str, int], int]:
    """(bytes each kind of collective moves per device in one execution of the compiled module,
    loops of unknown trip count). Kinds: the values of `COLLECTIVES`."""
    computations, entry = parse(hlo_text)
    counts, unknown = run_counts(computations, entry)
    shapes = {name: shape for instructions in computations.values() for name, shape, _, _ in instructions}
    moved = collections.Counter()
    for name, instructions in computations.items():
        for _, shape, opcode, rest in instructions:
            if opcode == "ragged-all-to-all":
                shape = _first_operand_shape(rest, shapes)
            if opcode in COLLECTIVES:
                moved[COLLECTIVES[opcode]] += shape_bytes(shape) * counts[name]
    return dict(moved), unknown


def _first_operand_shape(rest: str, shapes: dict[str, str]) -> str:
    """The shape of an instruction's first operand: printed before it, or that of the instruction it names."""
    operand = rest.split(",")[0]
    return operand if _ARRAY.search(operand) else shapes.get(operand.strip().lstrip("%"), "")
