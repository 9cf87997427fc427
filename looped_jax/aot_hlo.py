"""Statistics read from an optimized HLO module's text: matmul FLOPs with every while-loop body multiplied by its
trip count (XLA's ``cost_analysis`` counts a loop body once), collective ops, and Mosaic (Pallas TPU) custom calls.

FLOPs are those of ``dot`` (2 x output elements x contracted elements) and ``convolution`` instructions (2 x output
batch-feature elements x kernel input features x the window taps that read real input: XLA:TPU writes multi-axis
dot_generals as convolutions over padded or dilated windows), reached from the entry computation through fusions,
calls, conditionals (the costliest branch) and while loops (body x trip count: ``known_trip_count``, else read from
a ``counter < constant`` loop; a loop without one counts once and is reported). Work inside custom calls (Pallas
kernels) is not visible in HLO and is not counted here (``looped_jax.jaxpr_flops`` counts it on the traced kernels).
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


def _operands(rest: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", rest.split(")")[0])


def _window(rest: str) -> dict[str, list]:
    """``window={size=3x3 stride=2x2 pad=1_1x0_0 lhs_dilate=.. rhs_dilate=..}`` -> per-dimension lists."""
    m = re.search(r"window=\{([^}]*)\}", rest)
    out: dict[str, list] = {}
    for key, val in re.findall(r"(\w+)=([\w\-]+)", m.group(1) if m else ""):
        parts = val.split("x")
        out[key] = [tuple(int(v) for v in p.split("_")) for p in parts] if key == "pad" else [int(v) for v in parts]
    return out


def _taps(length: int, window: int, out: int, stride: int, lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, window tap) pairs of one spatial dimension that read a real input element (not padding, not
    a hole of the base dilation)."""
    span = (length - 1) * lhs_dilate
    total = 0
    for w in range(window):
        q = [p * stride + w * rhs_dilate - lo for p in range(out)]
        total += sum(1 for v in q if 0 <= v <= span and v % lhs_dilate == 0)
    return total


def convolution_flops(lhs: str, rhs: str, out: str, rest: str) -> int:
    """FLOPs of an HLO convolution: 2 x (output batch x feature elements) x (kernel input features) x the window
    taps that read real input, per spatial dimension. XLA:TPU writes dot_generals with several contracting or batch
    dimensions as convolutions whose spatial "window" runs over padding or a dilated base (a head axis as
    ``window={size=16 pad=15_15}`` over a length-1 dimension: one real tap per output position), so counting the
    whole window would overcount those by the window size."""
    dl = re.search(r"dim_labels=([\w]+)_([\w]+)->([\w]+)", rest)
    ld, rd, od = _dims(lhs), _dims(rhs), _dims(out)
    if dl is None or ld is None or rd is None or od is None:
        return 0
    lhs_l, rhs_l, out_l = dl.groups()
    if not (len(lhs_l) == len(ld) and len(rhs_l) == len(rd) and len(out_l) == len(od)):
        return 0
    win = _window(rest)
    n_sp = sum(c.isdigit() for c in out_l)
    total = 2 * od[out_l.index("b")] * od[out_l.index("f")] * rd[rhs_l.index("i")]
    for k in range(n_sp):
        c = str(k)
        size = win.get("size", [1] * n_sp)[k]
        total *= _taps(
            ld[lhs_l.index(c)],
            size,
            od[out_l.index(c)],
            win.get("stride", [1] * n_sp)[k],
            win.get("pad", [(0, 0)] * n_sp)[k][0],
            win.get("lhs_dilate", [1] * n_sp)[k],
            win.get("rhs_dilate", [1] * n_sp)[k],
        )
    return total


def _source(instrs_by_name: dict, name: str) -> tuple | None:
    """The instruction ``name`` is a copy (or bitcast) of, through a chain of them."""
    for _ in range(8):
        ins = instrs_by_name.get(name)
        if ins is None or ins[2] not in ("copy", "bitcast"):
            return ins
        name = _operands(ins[3])[0]
    return None


def _const(instrs_by_name: dict, name: str) -> int | None:
    """The integer value of a scalar ``constant`` (through copies), else None."""
    ins = _source(instrs_by_name, name)
    if ins is None or ins[2] != "constant" or not re.match(r"^[su]\d+\[\]", ins[1]):
        return None
    m = re.match(r"\s*(-?\d+)\)", ins[3])
    return int(m.group(1)) if m else None


def _tuple_index(instrs_by_name: dict, name: str) -> int | None:
    """k when ``name`` is get-tuple-element(.., index=k) (through copies), else None."""
    ins = _source(instrs_by_name, name)
    if ins is None or ins[2] != "get-tuple-element":
        return None
    return int(re.search(r"index=(\d+)", ins[3]).group(1))


def trip_count(comps: dict, instrs_by_name: dict, while_rest: str) -> int | None:
    """The trip count of a ``while``: XLA's ``known_trip_count`` when it is there, else read from the loop's form
    (the TPU pipeline drops the attribute from loops it rewrites): the condition's root is ``counter < N`` with N a
    constant, the counter's initial value is a constant and the body adds 1 to it. None when the form differs (a
    data-dependent loop)."""
    trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', while_rest)
    if trip:
        return int(trip.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", while_rest)
    body = re.search(r"body=%?([\w.\-]+)", while_rest)
    init = _operands(while_rest)
    if not (cond and body and init) or not comps.get(cond.group(1)) or not comps.get(body.group(1)):
        return None
    _, _, op, rest = comps[cond.group(1)][-1]  # the root is printed last
    if op != "compare" or "direction=LT" not in rest:
        return None
    a, b = _operands(rest)[:2]
    index, limit = _tuple_index(instrs_by_name, a), _const(instrs_by_name, b)
    tup = _source(instrs_by_name, init[0])
    if index is None or limit is None or tup is None or tup[2] != "tuple" or index >= len(_operands(tup[3])):
        return None
    start = _const(instrs_by_name, _operands(tup[3])[index])
    root = comps[body.group(1)][-1]
    if start is None or root[2] != "tuple" or index >= len(_operands(root[3])):
        return None
    step = _source(instrs_by_name, _operands(root[3])[index])
    if step is None or step[2] != "add":
        return None
    x, y = _operands(step[3])[:2]
    for counter, one in ((x, y), (y, x)):
        if _tuple_index(instrs_by_name, counter) == index and _const(instrs_by_name, one) == 1:
            return max(0, limit - start)
    return None


def hlo_stats(text: str) -> dict:
    """``{"flops", "collectives": {op: count}, "mosaic_custom_calls", "loops_without_trip_count"}`` of an HLO
    module; collective and custom-call counts are static (instructions in the program, not executions)."""
    comps, entry = _parse(text)
    shapes = {name: shape for instrs in comps.values() for name, shape, _, _ in instrs}
    instrs_by_name = {i[0]: i for instrs in comps.values() for i in instrs}
    untripped: list[str] = []

    def dot_flops(shape, rest):
        out = _dims(shape)
        ops = _operands(rest)
        cm = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        if out is None or not ops or ops[0] not in shapes:
            return 0
        lhs = _dims(shapes[ops[0]]) or []
        k = math.prod(lhs[int(i)] for i in cm.group(1).split(",") if i) if cm else 1
        return 0 if k == 1 else 2 * math.prod(out) * k  # no contraction: a product, no multiply-add (as jaxpr_flops)

    def conv_flops(shape, rest):
        ops = _operands(rest)
        if len(ops) < 2 or ops[0] not in shapes or ops[1] not in shapes:
            return 0
        return convolution_flops(shapes[ops[0]], shapes[ops[1]], shape, rest)

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
                trip = trip_count(comps, instrs_by_name, rest)
                if trip is None:
                    untripped.append(name)
                total += (1 if trip is None else trip) * (flops(body.group(1)) if body else 0)
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
