"""Matmul FLOPs counted on a jaxpr, before XLA: what a program asks for, independent of how a compiler rewrites it.

Two uses in the AOT tool (``looped_jax/aot.py``), both on the train step traced for the target slice:

- **kernel FLOPs**: the matmuls inside Pallas kernels (the kernel body times its grid), work that the optimized
  HLO hides inside opaque custom calls.
- **model FLOPs**: the step traced with remat off counts the matmul work the algorithm asks for, attention
  included, for every family alike (no per-family formula that can drift from the code); a loop whose trip count
  is data-dependent is counted once and reported.

``dot_general`` counts 2 x output elements x contracted elements, and nothing when it contracts nothing (or only
size-1 dimensions): that is an outer or elementwise product with no multiply-add, which XLA rewrites as a multiply;
``conv_general_dilated`` counts 2 x output elements x kernel elements per output feature. ``scan`` multiplies its
body by its length, except the work in the body whose operands are the same on every iteration (it reads only the
scan's constants): that counts once, as XLA's loop-invariant code motion hoists it out of the loop and as the
algorithm needs it (e.g. a latent-thought model's first self-attention over the tokens, which no inner step
changes). ``cond`` takes its costliest
branch (so a kernel's masked-out blocks count), ``while`` counts its body once; ``shard_map`` bodies see one shard,
so they count times the shards; a kernel grid dimension that is not static counts once.
"""

from __future__ import annotations

import math
from typing import Any

from jax.extend import core as jex_core


def _as_jaxpr(v: Any):
    if isinstance(v, jex_core.ClosedJaxpr):
        return v.jaxpr
    if isinstance(v, jex_core.Jaxpr):
        return v
    return None


def _sub_jaxprs(params: dict) -> list:
    out = []
    for v in params.values():
        j = _as_jaxpr(v)
        if j is not None:
            out.append(j)
        elif isinstance(v, (tuple, list)):
            out.extend(j for j in map(_as_jaxpr, v) if j is not None)
    return out


def _dot(eqn) -> int:
    (lc, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    k = math.prod(lhs[i] for i in lc)
    return 0 if k == 1 else 2 * math.prod(eqn.outvars[0].aval.shape) * k


def _conv(eqn) -> int:
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    out_feature = dn.rhs_spec[0] if dn is not None else 0
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // max(1, rhs[out_feature])


def _grid_size(params: dict) -> int:
    gm = params.get("grid_mapping")
    grid = getattr(gm, "grid", ()) or ()
    return math.prod(int(g) for g in grid if isinstance(g, int))


def _shards(params: dict) -> int:
    mesh = params.get("mesh")
    axes = params.get("newly_manual_axes") or params.get("manual_axes") or params.get("axis_names") or ()
    shape = dict(getattr(mesh, "shape", {}) or {})
    return math.prod(shape.get(a, 1) for a in axes)


def _zero() -> dict:
    return {"flops": 0, "kernel_flops": 0, "loops_without_trip_count": 0, "kernels": 0}


def _merge(into: dict, sub: dict) -> None:
    for k in into:
        into[k] += sub[k]


def _has_kernel(eqn) -> bool:
    return eqn.primitive.name == "pallas_call" or any(
        _has_kernel(e) for sub in _sub_jaxprs(eqn.params) for e in sub.eqns
    )


def _split(jaxpr, invariant_in: list[bool], in_kernel: bool, hoist_kernels: bool) -> tuple[dict, dict]:
    """``(once, each)``: the counts of a loop body's equations whose operands derive only from the inputs marked
    invariant (computed once, hoisted) and of all the others (computed every iteration). A call-like equation
    (pjit, remat, custom_jvp/vjp) with some changing operands is split through its body; anything else with a
    changing operand, or with side effects, counts every iteration whole. ``hoist_kernels=False`` keeps invariant
    Pallas kernels in the loop, as XLA does with their custom calls."""
    jaxpr = _as_jaxpr(jaxpr) or jaxpr
    if len(invariant_in) != len(jaxpr.invars):
        raise ValueError(f"_split: {len(invariant_in)} flags for {len(jaxpr.invars)} inputs")
    inv = {v for v, f in zip(jaxpr.invars, invariant_in, strict=True) if f} | set(jaxpr.constvars)
    once, each = _zero(), _zero()
    for eqn in jaxpr.eqns:
        flags = [not isinstance(v, jex_core.Var) or v in inv for v in eqn.invars]
        if all(flags) and not eqn.effects and (hoist_kernels or not _has_kernel(eqn)):
            _merge(once, _count_eqns([eqn], in_kernel, hoist_kernels))
            inv.update(eqn.outvars)
            continue
        subs = _sub_jaxprs(eqn.params)
        if (
            eqn.primitive.name not in ("scan", "while", "cond", "pallas_call", "shard_map")
            and len(subs) == 1
            and len(subs[0].invars) == len(eqn.invars)
            and not eqn.effects
        ):
            o, e = _split(subs[0], flags, in_kernel, hoist_kernels)
            _merge(once, o)
            _merge(each, e)
        else:
            _merge(each, _count_eqns([eqn], in_kernel, hoist_kernels))
    return once, each


def _split_scan(eqn, in_kernel: bool, hoist_kernels: bool) -> tuple[dict, dict]:
    """``_split`` of a scan equation's body: its constants (the first ``num_consts`` operands) are invariant."""
    n_consts = eqn.params["num_consts"]
    return _split(eqn.params["jaxpr"], [i < n_consts for i in range(len(eqn.invars))], in_kernel, hoist_kernels)


def count(jaxpr, *, in_kernel: bool = False, hoist_kernels: bool = True) -> dict:
    """``{"flops", "kernel_flops", "loops_without_trip_count", "kernels"}`` of a (closed) jaxpr: ``flops`` is all
    matmul work, ``kernel_flops`` the part inside ``pallas_call`` kernels, ``kernels`` how many kernel calls.
    ``hoist_kernels=False`` counts a loop-invariant kernel in a scan once per iteration: XLA hoists invariant dots
    out of a loop but not the custom calls of Pallas kernels, so that is the work the compiled program runs."""
    return _count_eqns((_as_jaxpr(jaxpr) or jaxpr).eqns, in_kernel, hoist_kernels)


def _count_eqns(eqns, in_kernel: bool, hoist_kernels: bool) -> dict:
    total = _zero()

    def add(sub: dict, times: int = 1) -> None:
        for k in ("flops", "kernel_flops"):
            total[k] += times * sub[k]
        total["loops_without_trip_count"] += sub["loops_without_trip_count"]
        total["kernels"] += sub["kernels"]

    for eqn in eqns:
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            f = _dot(eqn) if name == "dot_general" else _conv(eqn)
            total["flops"] += f
            total["kernel_flops"] += f if in_kernel else 0
        elif name == "pallas_call":
            body = count(eqn.params["jaxpr"], in_kernel=True, hoist_kernels=hoist_kernels)
            body["kernels"] += 1
            add(body, _grid_size(eqn.params))
        elif name == "scan":
            once, each = _split_scan(eqn, in_kernel, hoist_kernels)
            add(once)
            add(each, int(eqn.params["length"]))
        elif name == "cond":
            subs = [count(b, in_kernel=in_kernel, hoist_kernels=hoist_kernels) for b in eqn.params["branches"]]
            add(max(subs, key=lambda s: s["flops"]))
        elif name == "while":
            add(count(eqn.params["body_jaxpr"], in_kernel=in_kernel, hoist_kernels=hoist_kernels))
            total["loops_without_trip_count"] += 1
        elif name == "shard_map":
            add(count(eqn.params["jaxpr"], in_kernel=in_kernel, hoist_kernels=hoist_kernels), _shards(eqn.params))
        else:
            for sub in _sub_jaxprs(eqn.params):
                add(count(sub, in_kernel=in_kernel, hoist_kernels=hoist_kernels))
    return total


def loop_invariant_flops(jaxpr) -> int:
    """Matmul FLOPs in scan bodies that read only their loop's constants, each counted once: work a loop redoes
    on every iteration although its result cannot change (0 when every invariant has been hoisted out)."""
    total = 0
    for eqn in (_as_jaxpr(jaxpr) or jaxpr).eqns:
        if eqn.primitive.name == "scan":
            total += _split_scan(eqn, in_kernel=False, hoist_kernels=True)[0]["flops"]
        for sub in _sub_jaxprs(eqn.params):
            total += loop_invariant_flops(sub)
    return total
