"""Ahead-of-time compilation of the sharded train step for a TPU topology, on any machine.

With libtpu installed (the ``tpu`` extra), ``jax.experimental.topologies`` describes a TPU
slice (e.g. ``v5e:16x16``) without the hardware; lowering and compiling the train step for its
devices checks the sharding and reports per-chip memory before a pod is ever booked. Tracing
runs under ``use_platform("tpu")``, so the program is the one a TPU runs (Mosaic kernels, not
the CPU host's XLA fallbacks).

Reported per chip: the compiler's peak memory (``peak_memory_in_bytes``), arguments, outputs and
temporaries; whether the peak fits the chip's HBM (a config that does not fit is compiled again
with the HBM limit raised, so its numbers and shortfall are still reported); collectives and
Mosaic custom calls in the HLO; FLOPs counted from the optimized HLO with every while-loop body
multiplied by its trip count (``cost_analysis`` counts each body once; it is printed beside);
analytic model FLOPs; and a compute-bound projected step time and MFU at the chip's peak.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from looped_jax import jaxpr_flops
from looped_jax import sharding as shd
from looped_jax.aot_hlo import hlo_stats
from looped_jax.config import ExperimentConfig

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Per-chip HBM (what XLA may use) and peak dense bf16 FLOP/s (vendor figures)."""

    hbm_gib: float
    peak_bf16_flops: float


# Usable HBM as libtpu reports it (v5e: "available HBM (15.75G)") and the published bf16 peaks.
CHIPS = {
    "v4": ChipSpec(31.25, 275e12),
    "v5e": ChipSpec(15.75, 197e12),
    "v5p": ChipSpec(95.74, 459e12),
    "v6e": ChipSpec(31.25, 918e12),
}
# Slice shapes Cloud TPU offers (2-D tori for v5e / v6e, 3-D for v4 / v5p).
_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
_3D = tuple(
    f"{a}x{b}x{c}"
    for a, b, c in [(2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 8),
                    (8, 8, 16), (8, 16, 16), (16, 16, 16), (16, 16, 24)]
)  # fmt: skip
TOPOLOGIES = {"v4": _3D, "v5e": _2D, "v5p": _3D, "v6e": _2D}


def parse_topology(topology: str) -> tuple[str, int]:
    """(chip generation, number of chips) of a name such as ``v5e:16x16``; a ValueError lists the valid names."""
    gen, _, shape = topology.partition(":")
    if gen not in TOPOLOGIES or shape not in TOPOLOGIES[gen]:
        valid = "; ".join(f"{g}: {', '.join(s)}" for g, s in TOPOLOGIES.items())
        raise ValueError(f"unknown TPU topology {topology!r}; valid names are <chip>:<shape> with {valid}")
    return gen, math.prod(int(d) for d in shape.split("x"))


def topology_devices(topology: str) -> list:
    """Devices of a TPU topology such as ``v5e:4x4``; needs libtpu (``pip install looped_jax[tpu]``)."""
    parse_topology(topology)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # a second concurrent compile otherwise fails on the
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # libtpu lockfile; no metadata server off a TPU VM
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # missing libtpu
        raise RuntimeError(
            f"could not describe TPU topology {topology!r} (is libtpu installed? pip install 'looped_jax[tpu]'): {e}"
        ) from e
    return list(desc.devices)


def check_batch(cfg: ExperimentConfig, num_devices: int) -> tuple[int, int, int]:
    """The resolved mesh; a ValueError proposing batch sizes and layouts when the global batch cannot be split."""
    try:
        sizes = shd.mesh_shape(cfg.mesh, num_devices)
    except ValueError as e:
        raise ValueError(f"{e}; e.g. --config.mesh.data=-1 --config.mesh.fsdp=1 --config.mesh.tensor=1") from e
    data, fsdp, tensor = sizes
    batch = cfg.train.global_batch_size
    dp = data * fsdp
    if batch % dp:
        lower, upper = (batch // dp) * dp, -(-batch // dp) * dp
        near = [b for b in (lower, upper) if b > 0]
        # layouts over the same chips whose data x fsdp divides this batch (tensor takes the rest of the chips)
        layouts = []
        for t in (1, 2, 4, 8, 16):
            rest = num_devices // t
            if num_devices % t == 0 and batch % rest == 0:
                f = fsdp if rest % fsdp == 0 else rest
                layouts.append(f"data={rest // f} fsdp={f} tensor={t}")
        hint = f"; or keep the batch with a layout whose data x fsdp divides {batch}: {', '.join(layouts)}"
        raise ValueError(
            f"train.global_batch_size={batch} is not divisible by data x fsdp = {data} x {fsdp} = {dp} "
            f"({num_devices} chips, tensor={tensor}); nearest valid batch sizes: {', '.join(map(str, near))}"
            + (hint if layouts else "; no layout with tensor <= 16 divides it")
        )
    return sizes


def oom_figures_gib(msg: str) -> list[float]:
    """The sizes (GiB) in a libtpu out-of-memory message ("... (64.65G) exceeds available HBM (15.75G)")."""
    nums = re.findall(r"\(([\d.]+)([KMGT])\)", msg)
    scale = {"K": 2**-20, "M": 2**-10, "G": 1.0, "T": 1024.0}
    return [float(v) * scale[u] for v, u in nums]


def _oom_numbers(msg: str) -> dict:
    return {"oom_figures_gib": oom_figures_gib(msg)}


def _compile(lowered, raise_limit_mib: int | None):
    opts = {"xla_tpu_max_hbm_size_mib": raise_limit_mib} if raise_limit_mib else None
    return lowered.compile(compiler_options=opts) if opts else lowered.compile()


def compile_train_step(
    cfg: ExperimentConfig, devices: list, *, hbm_gib: float | None = None, hlo_path: str | os.PathLike | None = None
) -> dict:
    """Lowers and compiles the train step for ``devices`` (traced for their platform); returns memory, FLOP,
    collective and timing stats. A program too big for HBM is compiled again with the limit raised (its numbers
    are reported with ``fits=False``) instead of raising. ``hlo_path`` (``*.gz``) keeps the optimized HLO text,
    so its statistics can be read again without a compile of half an hour."""
    platform = devices[0].platform
    kind = getattr(devices[0], "device_kind", "")
    gen = next((g for g in CHIPS if g in kind.lower().replace(" ", "").replace("lite", "e")), None)
    chip = CHIPS.get(gen) if gen else None
    hbm = hbm_gib if hbm_gib is not None else (chip.hbm_gib if chip else None)
    check_batch(cfg, len(devices))
    mesh = shd.make_mesh(cfg.mesh, devices)
    t0 = time.perf_counter()
    state, traced, lowered = _trace_train_step(cfg, mesh, lower=True)
    t1 = time.perf_counter()
    oom = None
    try:
        compiled = _compile(lowered, None)
    except Exception as e:  # RESOURCE_EXHAUSTED from the TPU compiler's memory check
        if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
            raise
        oom = str(e).splitlines()[0][:400]
        try:
            compiled = _compile(lowered, 1 << 30)  # 1 PiB: measure the program that did not fit
        except Exception as e2:  # some libtpu versions keep the real HBM limit: report the message's figures
            if "RESOURCE_EXHAUSTED" not in str(e2) and "Ran out of memory" not in str(e2):
                raise
            compiled = None
    t2 = time.perf_counter()
    if compiled is None:
        figures = _oom_numbers(oom)["oom_figures_gib"]
        needed = figures[0] if figures else float("nan")
        limit = hbm if hbm is not None else (figures[1] if len(figures) > 1 else None)
        return {
            "devices": len(devices),
            "platform": platform,
            "device_kind": kind,
            "mesh": dict(mesh.shape),
            "per_chip_batch": cfg.train.global_batch_size // shd.data_parallel_size(mesh),
            "lower_s": round(t1 - t0, 3),
            "compile_s": round(t2 - t1, 3),
            "measured_from": "oom_message",  # no compiled program: only the compiler's out-of-memory figures
            "peak_gib_per_chip": needed,
            "hbm_gib_per_chip": limit,
            "fits": False,
            "shortfall_gib_per_chip": max(0.0, needed - limit) if limit is not None else None,
            "oom_message": oom,
            "oom_figures_gib": figures,
        }
    mem = compiled.memory_analysis()
    peak = getattr(mem, "peak_memory_in_bytes", 0) or (
        mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    )
    text = compiled.as_text()
    if hlo_path is not None:
        Path(hlo_path).parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(hlo_path, "wt") as f:
            f.write(text)
    hlo = hlo_stats(text)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    stats = {
        "devices": len(devices),
        "platform": platform,
        "device_kind": kind,
        "mesh": dict(mesh.shape),
        "per_chip_batch": cfg.train.global_batch_size // shd.data_parallel_size(mesh),
        "params": num_params,
        "lower_s": round(t1 - t0, 3),
        "compile_s": round(t2 - t1, 3),
        "peak_gib_per_chip": peak / GIB,
        "argument_gib_per_chip": mem.argument_size_in_bytes / GIB,
        "output_gib_per_chip": mem.output_size_in_bytes / GIB,
        "alias_gib_per_chip": mem.alias_size_in_bytes / GIB,
        "temp_gib_per_chip": mem.temp_size_in_bytes / GIB,
        "hbm_gib_per_chip": hbm,
        "fits": (peak / GIB <= hbm and oom is None) if hbm is not None else None,
        "shortfall_gib_per_chip": max(0.0, peak / GIB - hbm) if hbm is not None else None,
        "oom_message": oom,
        **({} if oom is None else _oom_numbers(oom)),
        **hlo_fields(hlo, len(devices)),
        "cost_analysis_flops_per_chip": float(cost.get("flops", 0.0)) if cost else None,
        **traced_flops(cfg, mesh, traced.jaxpr),
    }
    if chip is not None:
        stats["peak_bf16_flops_per_chip"] = chip.peak_bf16_flops
        stats.update(projection(stats))
    return stats


def hlo_fields(hlo: dict, devices: int) -> dict:
    """The result fields read from the optimized HLO (``aot_hlo.hlo_stats``)."""
    return {
        "collectives": hlo["collectives"],
        "collectives_total": sum(hlo["collectives"].values()),
        "mosaic_custom_calls": hlo["mosaic_custom_calls"],
        "hlo_flops_per_chip": hlo["flops"],
        "hlo_flops_per_step": hlo["flops"] * devices,
        "loops_without_trip_count": hlo["loops_without_trip_count"],
    }


def traced_flops(cfg: ExperimentConfig, mesh, jaxpr=None) -> dict:
    """The FLOP fields counted on the traced (not compiled) train step: Pallas kernel FLOPs and model FLOPs
    (``model_flops_per_step``). ``jaxpr`` is this config's traced step when already at hand.

    The kernel FLOPs are the compiled program's: a kernel whose operands do not change across a loop's
    iterations stays in the loop (XLA hoists invariant dots, which the HLO count sees, but not custom calls). The
    model FLOPs count such a kernel once, as the algorithm needs it."""
    jaxpr = jaxpr if jaxpr is not None else _trace_train_step(cfg, mesh)[1].jaxpr
    counted = jaxpr_flops.count(jaxpr)
    compiled = jaxpr_flops.count(jaxpr, hoist_kernels=False)
    return {
        "kernel_flops_per_step": float(compiled["kernel_flops"]),
        "kernel_calls_traced": counted["kernels"],
        **model_flops_per_step(cfg, mesh, counted),
    }


def retrace(stats: dict, cfg: ExperimentConfig, devices: list) -> dict:
    """A stored result with the traced FLOP fields (``traced_flops``) counted by this version, no compile: for
    results stored before those fields (or this way of counting them) existed."""
    return {**stats, **traced_flops(cfg, shd.make_mesh(cfg.mesh, devices))}


def restat(stats: dict, hlo_path: str | os.PathLike) -> dict:
    """A stored result with its HLO fields and projection recomputed from its kept ``hlo.txt.gz`` by this version
    of the statistics (no recompile)."""
    with gzip.open(hlo_path, "rt") as f:
        out = {**stats, **hlo_fields(hlo_stats(f.read()), stats["devices"])}
    if "peak_bf16_flops_per_chip" in out:
        out.update(projection(out))
    return out


def projection(stats: dict) -> dict:
    """Compute-bound step time at the chip's peak bf16 FLOP/s (no communication) and MFU, from a compile's stats
    (``hlo_flops_per_chip``, ``kernel_flops_per_step``, ``model_flops_per_step``, ``devices``,
    ``peak_bf16_flops_per_chip``, ``loops_without_trip_count``): ``{"projected_step_s",
    "projected_step_is_lower_bound", "projected_mfu"}``.

    The step's work is the HLO's matmul FLOPs plus those inside Pallas kernels (opaque custom calls in the HLO,
    counted on the traced kernel bodies). Where a loop has a data-dependent trip count (sampled recurrence, ACT
    halting) the HLO count took its body once: the HLO and the model FLOPs (at the mean depth) are then both lower
    bounds on the work, the step is projected from the larger of the two and no MFU is given."""
    peak = stats["peak_bf16_flops_per_chip"]
    work = stats["hlo_flops_per_chip"] + stats.get("kernel_flops_per_step", 0.0) / stats["devices"]
    model_per_chip = stats["model_flops_per_step"] / stats["devices"]
    if stats["loops_without_trip_count"]:
        return {
            "projected_step_s": max(model_per_chip, work) / peak,
            "projected_step_is_lower_bound": True,
            "projected_mfu": None,
        }
    step_s = work / peak
    return {
        "projected_step_s": step_s,
        "projected_step_is_lower_bound": False,
        "projected_mfu": model_per_chip / (peak * step_s) if step_s else None,
    }


def model_flops_per_step(cfg: ExperimentConfig, mesh, counted: dict) -> dict:
    """Model FLOPs of one train step: the matmul FLOPs of the step traced for the mesh's platform with remat off,
    counted on its jaxpr (``looped_jax.jaxpr_flops``, Pallas kernel bodies x grid included): forward, backward and
    attention as the code runs them there, for every family alike, without the recomputation a remat policy adds.
    ``counted`` is the count of the config's own step, which is the answer when it sets no remat policy. A
    recurrent-depth model samples its depth (a loop of data-dependent length), so it uses the analytic count at
    ``mean_loops`` instead (``analytic_flops``)."""
    if hasattr(cfg.model, "num_core_layers") and hasattr(cfg.model, "mean_loops"):
        return analytic_flops(cfg, cfg.train.global_batch_size * cfg.data.seq_len)
    if getattr(cfg.model, "remat_policy", ""):
        ref = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat_policy=""))
        counted = jaxpr_flops.count(_trace_train_step(ref, mesh)[1].jaxpr)
    method = "jaxpr count, no remat"
    if counted["loops_without_trip_count"]:
        method += f", {counted['loops_without_trip_count']} data-dependent loop(s) counted once"
    return {"model_flops_per_step": float(counted["flops"]), "model_flops_method": method}


def _trace_train_step(cfg: ExperimentConfig, mesh, *, lower: bool = False) -> tuple:
    """``(abstract state, traced step, lowered step or None)`` of the train step for the mesh's platform, on an
    abstract batch sharded as the trainer shards it; nothing is allocated or compiled."""
    from looped_jax.nn.platform import use_platform
    from looped_jax.train.trainer import BATCH_KEYS, Trainer

    with use_platform(mesh.devices.flat[0].platform):
        trainer = Trainer(cfg, mesh=mesh, log=False)
        state = trainer.abstract_state()
        shape = (cfg.train.global_batch_size, cfg.data.seq_len)
        dtype = {k: jnp.float32 if k == "weights" else jnp.int32 for k in BATCH_KEYS}
        batch = {k: jax.ShapeDtypeStruct(shape, dtype[k], sharding=trainer.batch_sharding) for k in BATCH_KEYS}
        with jax.set_mesh(mesh):
            traced = trainer.train_step.trace(state, batch)
            return state, traced, traced.lower() if lower else None


def analytic_flops(cfg: ExperimentConfig, tokens: int) -> dict:
    """Model FLOPs per train step of a recurrent-depth model (Geiping et al. 2025), whose sampled depth a trace
    cannot count: 6 x (parameters a token passes through) x tokens plus causal attention (Kaplan et al. 2020 /
    PaLM appendix B: 6 * layers * T * d_attn per token, halved for causal), with the core run ``mean_loops`` times
    forward and ``grad_steps`` of them backward, so its weights count 2 * loops + 4 * grad_steps per token."""
    m = cfg.model
    T = cfg.data.seq_len
    if hasattr(m, "num_core_layers") and hasattr(m, "mean_loops"):
        d, f, hk = m.d_model, m.mlp_dim, m.num_heads * m.head_dim
        kv = m.num_kv_heads * m.head_dim
        layer = d * (hk + 2 * kv) + hk * d + 3 * d * f  # attention projections + SwiGLU
        attn = T * hk  # per token and layer, x2 below: QK^T + PV = 4 T hk FLOPs, halved by the causal mask
        once = (m.num_prelude_layers + m.num_coda_layers) * (layer + attn)
        core = m.num_core_layers * (layer + attn)
        adapter = 2 * d * d
        head = d * m.vocab_size
        loops, back = m.mean_loops, m.grad_steps
        fwd = 2 * (once + head + loops * (core + adapter))
        bwd = 4 * (once + head + back * (core + adapter))
        return {"model_flops_per_step": float((fwd + bwd) * tokens), "model_flops_method": "recurrent-depth analytic"}
    raise ValueError(f"analytic_flops counts recurrent-depth models only, not model {type(m).__name__}")
