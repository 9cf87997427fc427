"""Statistics read from an optimized HLO module's text: matmul FLOPs with every while-loop body multiplied by its
trip count (XLA's ``cost_analysis`` counts a loop body once), collective ops, and Mosaic (Pallas TPU) custom calls.

FLOPs are those of ``dot`` and ``convolution`` instructions (2 x output elements x contracted elements), reached
from the entry computation through fusions, calls, conditionals (the costliest branch) and while loops (body x
``known_trip_count``; a loop without one counts once and is reported). Work inside custom calls (Pallas kernels)
is not visible in HLO and is not counted.
"""

from __future__ import annotations

import math
import re
from functools import cache

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "ragged-all-to-all")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"^\(?([a-z]\w*)\[([\d,]*)\]")


def _dims(shape: str) -> list[int] | None:
    m = _SHAPE.match(shape)
    if not m:
        return None
    return [int(d) for d in m.group(2).split(",") if d]


def _parse(text: str) -> tuple[dict, str]:
    comps: dict[str, list] = {}
    entry, cur = "", None
    for line in text.splitlines():
        if cur is None:
            m = _COMP.match(line)
            if m and "=" not in line.split("(")[0]:
                cur = m.group(1)
                comps[cur] = []
                if line.startswith("ENTRY"):
                    entry = cur
            continue
        if line.rstrip() == "}":  # a computation ends on a bare brace; an instruction's multi-line attributes
            cur = None  # (Pallas kernels' frontend_attributes={kernel_metadata={...}}) continue on "}}, ..." lines
            continue
        m = _INSTR.match(line)
        if m:
            comps[cur].append((m.group(1), m.group(2), m.group(3), m.group(4)))
    return comps, entry


def hlo_stats(text: str) -> dict:
    """``{"flops", "collectives": {op: count}, "mosaic_custom_calls", "loops_without_trip_count"}`` of an HLO
    module; collective and custom-call counts are static (instructions in the program, not executions)."""
    comps, entry = _parse(text)
    shapes = {name: shape for instrs in comps.values() for name, shape, _, _ in instrs}
    untripped: list[str] = []

    def dot_flops(shape, rest):
        out = _dims(shape)
        ops = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
        cm = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        if out is None or not ops or ops[0] not in shapes:
            return 0
        lhs = _dims(shapes[ops[0]]) or []
        k = math.prod(lhs[int(i)] for i in cm.group(1).split(",") if i) if cm else 1
        return 2 * math.prod(out) * k

    def conv_flops(shape, rest):
        out = _dims(shape)
        ops = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
        if out is None or len(ops) < 2 or ops[1] not in shapes:
            return 0
        ker = _dims(shapes[ops[1]]) or [1]
        dl = re.search(r"dim_labels=\w+_(\w+)->", rest)
        o_idx = dl.group(1).index("o") if dl and "o" in dl.group(1) else len(ker) - 1
        return 2 * math.prod(out) * math.prod(ker) // max(1, ker[o_idx])

    @cache
    def flops(comp: str) -> int:
        total = 0
        for name, shape, op, rest in comps.get(comp, ()):
            if op == "dot":
                total += dot_flops(shape, rest)
            elif op == "convolution":
                total += conv_flops(shape, rest)
            elif op == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest)
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
                if trip is None:
                    untripped.append(name)
                total += (int(trip.group(1)) if trip else 1) * (flops(body.group(1)) if body else 0)
            elif op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                names = re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else []
                for key in ("true_computation", "false_computation"):
                    m = re.search(key + r"=%?([\w.\-]+)", rest)
                    if m:
                        names.append(m.group(1))
                total += max((flops(n) for n in names), default=0)
            else:
                for key in ("calls", "to_apply"):
                    m = re.search(key + r"=%?([\w.\-]+)", rest)
                    if m and op in ("fusion", "call", "async-start", "custom-call"):
                        total += flops(m.group(1))
        return total

    counts = {c: 0 for c in COLLECTIVES}
    mosaic = 0
    for instrs in comps.values():
        for _, _, op, rest in instrs:
            base = op.removesuffix("-start")
            if base in counts and not op.endswith("-done"):
                counts[base] += 1
            if op == "custom-call" and 'custom_call_target="tpu_custom_call"' in rest:
                mosaic += 1
    return {
        "flops": float(flops(entry)) if entry else 0.0,
        "collectives": {k: v for k, v in counts.items() if v},
        "mosaic_custom_calls": mosaic,
        "loops_without_trip_count": len(set(untripped)),
    }
