"""Matmul FLOPs counted on a jaxpr, before XLA: what a program asks for, independent of how a compiler rewrites it.

Two uses in the AOT tool (``looped_jax/aot.py``), both on the train step traced for the target slice:

- **kernel FLOPs**: the matmuls inside Pallas kernels (the kernel body times its grid), work that the optimized
  HLO hides inside opaque custom calls.
- **model FLOPs**: the step traced with remat off counts the matmul work the algorithm asks for, attention
  included, for every family alike (no per-family formula that can drift from the code); a loop whose trip count
  is data-dependent is counted once and reported.

``dot_general`` counts 2 x output elements x contracted elements; ``conv_general_dilated`` 2 x output elements x
kernel elements per output feature. ``scan`` multiplies its body by its length, ``cond`` takes its costliest
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
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)


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


def count(jaxpr, *, in_kernel: bool = False) -> dict:
    """``{"flops", "kernel_flops", "loops_without_trip_count", "kernels"}`` of a (closed) jaxpr: ``flops`` is all
    matmul work, ``kernel_flops`` the part inside ``pallas_call`` kernels, ``kernels`` how many kernel calls."""
    jaxpr = _as_jaxpr(jaxpr) or jaxpr
    total = {"flops": 0, "kernel_flops": 0, "loops_without_trip_count": 0, "kernels": 0}

    def add(sub: dict, times: int = 1) -> None:
        for k in ("flops", "kernel_flops"):
            total[k] += times * sub[k]
        total["loops_without_trip_count"] += sub["loops_without_trip_count"]
        total["kernels"] += sub["kernels"]

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            f = _dot(eqn) if name == "dot_general" else _conv(eqn)
            total["flops"] += f
            total["kernel_flops"] += f if in_kernel else 0
        elif name == "pallas_call":
            body = count(eqn.params["jaxpr"], in_kernel=True)
            body["kernels"] += 1
            add(body, _grid_size(eqn.params))
        elif name == "scan":
            add(count(eqn.params["jaxpr"], in_kernel=in_kernel), int(eqn.params["length"]))
        elif name == "cond":
            subs = [count(b, in_kernel=in_kernel) for b in eqn.params["branches"]]
            add(max(subs, key=lambda s: s["flops"]))
        elif name == "while":
            add(count(eqn.params["body_jaxpr"], in_kernel=in_kernel))
            total["loops_without_trip_count"] += 1
        elif name == "shard_map":
            add(count(eqn.params["jaxpr"], in_kernel=in_kernel), _shards(eqn.params))
        else:
            for sub in _sub_jaxprs(eqn.params):
                add(count(sub, in_kernel=in_kernel))
    return total
