"""AOT-compile the sharded train step for a TPU topology on a CPU-only machine; print per-chip memory.

    pip install -e '.[tpu]'
    python scripts/compile_tpu.py --config configs/recurrent_depth_huginn.py --topology v5e:16x16 \
        --config.mesh.data=16 --config.mesh.fsdp=16

Prints the statistics as JSON and writes them as a table to ``runs/<name>/results.md`` (and ``results.json``),
with the optimized HLO text in ``runs/<name>/hlo.txt.gz``.

Every published-size config names the slice it is planned for in a module constant ``TARGET_TOPOLOGY`` (one
topology name or a tuple of them) and sets the mesh layout and remat policy that fit it; ``--all`` compiles
each of them for each of its topologies, one subprocess per compile, and writes one table:

    python scripts/compile_tpu.py --all                 # runs/aot/results.md
    python scripts/compile_tpu.py --all --small         # every family's CPU config on v5e:2x2 (CI)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looped_jax.aot import projection, restat, retrace, topology_devices  # noqa: E402
from looped_jax.config import load_config, parse_overrides  # noqa: E402
from looped_jax.results import Table, write_results  # noqa: E402


def results_table(stats: dict, config: str, topology: str) -> Table:
    gib = lambda key: f"{stats[key]:.3f} GiB"  # noqa: E731
    if stats.get("measured_from") == "oom_message":  # the program did not compile even with the limit raised
        rows = [
            ["devices", f"{stats['devices']} x {stats['device_kind'] or stats['platform']}"],
            ["mesh", ", ".join(f"{k}={v}" for k, v in stats["mesh"].items())],
            ["per-chip batch (sequences)", str(stats["per_chip_batch"])],
            ["needed per chip (compiler's out-of-memory message)", gib("peak_gib_per_chip")],
            ["HBM per chip / fits", f"{stats['hbm_gib_per_chip']} GiB / False"],
            [
                "shortfall per chip",
                gib("shortfall_gib_per_chip") if stats["shortfall_gib_per_chip"] is not None else "-",
            ],
            ["compiler message", stats["oom_message"]],
            ["lower / compile time", f"{stats['lower_s']:.1f} s / {stats['compile_s']:.1f} s"],
        ]
        caption = f"{config} train step AOT-compiled for {topology}: does not fit."
        return Table(["measure", "value"], rows, title="TPU AOT compile", caption=caption)
    rows = [
        ["devices", f"{stats['devices']} x {stats['device_kind'] or stats['platform']}"],
        ["mesh", ", ".join(f"{k}={v}" for k, v in stats["mesh"].items())],
        ["per-chip batch (sequences)", str(stats["per_chip_batch"])],
        ["arguments per chip", gib("argument_gib_per_chip")],
        ["outputs per chip", gib("output_gib_per_chip")],
        ["temp per chip", gib("temp_gib_per_chip")],
        ["compiler peak per chip", gib("peak_gib_per_chip")],
        ["HBM per chip / fits", f"{stats['hbm_gib_per_chip']} GiB / {stats['fits']}"],
        ["shortfall per chip", gib("shortfall_gib_per_chip") if stats["shortfall_gib_per_chip"] is not None else "-"],
        ["collectives (static count)", ", ".join(f"{k} {v}" for k, v in stats["collectives"].items()) or "none"],
        ["Mosaic custom calls", str(stats["mosaic_custom_calls"])],
        ["HLO FLOPs per step (loops x trip counts)", f"{stats['hlo_flops_per_step']:.4g}"],
        ["Pallas kernel FLOPs per step (traced kernel bodies x grid)", f"{stats.get('kernel_flops_per_step', 0):.4g}"],
        ["cost_analysis FLOPs per chip (loop bodies once)", f"{stats['cost_analysis_flops_per_chip']:.4g}"],
        [f"model FLOPs per step ({stats['model_flops_method']})", f"{stats['model_flops_per_step']:.4g}"],
        ["projected step (compute-bound, peak bf16) / MFU",
         f"{stats.get('projected_step_s', float('nan')):.4g} s / {stats.get('projected_mfu') or float('nan'):.3f}"],
        ["lower / compile time", f"{stats['lower_s']:.1f} s / {stats['compile_s']:.1f} s"],
    ]  # fmt: skip
    caption = f"{config} train step AOT-compiled for {topology}."
    return Table(["measure", "value"], rows, title="TPU AOT compile", caption=caption)


ROOT = Path(__file__).resolve().parents[1]
# Bumped when the traced FLOP counts (model, kernel) change: --reuse / --cached trace stored results again.
FLOPS_VERSION = 4
# --small: one CPU config per family, compiled for 4 v5e chips (data=4) -- the cheap version that runs in CI
SMALL_TOPOLOGY = "v5e:2x2"
SMALL_CONFIGS = (
    "recurrent_depth_chains.py",
    "baseline_chains.py",
    "fam_passkey_cpu.py",
    "titans_mac_cpu.py",
    "hrm_sudoku_cpu.py",
    "trm_sudoku_cpu.py",
    "gram_sudoku_cpu.py",
    "ltm_cpu.py",
    "rmt_passkey_cpu.py",
)
SMALL_OVERRIDES = ("--config.mesh.data=4", "--config.mesh.fsdp=1", "--config.mesh.tensor=1")


def config_digest(cfg) -> str:
    """Hash of the resolved config (every field, overrides applied): ``--reuse`` recompiles when it changed."""
    return hashlib.sha1(repr(cfg).encode()).hexdigest()[:12]


def target_topologies(path: Path) -> tuple[str, ...]:
    """The ``TARGET_TOPOLOGY`` a config file declares (a name or a tuple of names); () if none."""
    spec = importlib.util.spec_from_file_location(f"looped_jax_target_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    target = getattr(module, "TARGET_TOPOLOGY", ())
    target = (target,) if isinstance(target, str) else tuple(target)
    if not all(isinstance(t, str) and ":" in t for t in target):
        raise ValueError(f"{path}: TARGET_TOPOLOGY must be a topology name like 'v5e:16x16' or a tuple of them")
    return target


def plan(small: bool, only: str | None) -> list[tuple[Path, str, tuple[str, ...]]]:
    """(config file, topology, extra overrides) for every compile of ``--all``."""
    if small:
        jobs = [(ROOT / "configs" / c, SMALL_TOPOLOGY, SMALL_OVERRIDES) for c in SMALL_CONFIGS]
    else:
        jobs = [
            (path, topo, ()) for path in sorted((ROOT / "configs").glob("*.py")) for topo in target_topologies(path)
        ]
    return [j for j in jobs if only is None or only in j[0].stem]


def _dashes(cells: list[str]) -> list[str]:
    """A table row of ``ALL_HEADER`` whose remaining cells are "-"."""
    return cells + ["-"] * (len(ALL_HEADER) - len(cells))


def _row(config: str, topology: str, stats: dict | None, rc: int, wall_s: float, error: str) -> list[str]:
    if stats is None:
        return _dashes([config, topology, "-", "-", f"{wall_s:.0f}", "-", f"error (exit {rc}): {error}"])
    mesh = " ".join(f"{k}{v}" for k, v in stats["mesh"].items() if v > 1) or "1 chip"
    peak = f"{stats['peak_gib_per_chip']:.2f}"
    if stats.get("measured_from") == "oom_message":
        return _dashes([config, topology, mesh, str(stats["per_chip_batch"]), f"{stats['compile_s']:.0f}", peak,
                        f"no (HBM {stats['hbm_gib_per_chip']})"])  # fmt: skip
    fits = {True: "yes", False: "no", None: "?"}[stats["fits"]]
    params = f"{stats['params'] / 1e6:,.0f}M" if stats["params"] >= 1e6 else f"{stats['params'] / 1e3:,.0f}k"
    mfu = stats.get("projected_mfu")
    return [
        config,
        topology,
        f"{mesh} ({params})",
        str(stats["per_chip_batch"]),
        f"{stats['compile_s']:.0f}",
        f"{peak} (args {stats['argument_gib_per_chip']:.2f}, temp {stats['temp_gib_per_chip']:.2f})",
        f"{fits} (HBM {stats['hbm_gib_per_chip']})",
        str(stats["collectives_total"]),
        f"{stats['hlo_flops_per_step']:.3g}"
        + (f" + {stats['kernel_flops_per_step']:.3g}" if stats.get("kernel_flops_per_step") else ""),
        f"{stats['model_flops_per_step']:.3g}",
        (">= " if stats.get("projected_step_is_lower_bound") else "") + f"{stats['projected_step_s']:.3g}"
        if "projected_step_s" in stats
        else "-",
        f"{mfu:.2f}" if mfu is not None else "-",
    ]


ALL_HEADER = [
    "config", "topology", "layout (params)", "seqs/chip", "compile s", "peak GiB/chip", "fits",
    "collectives", "HLO (+ kernel) FLOPs/step", "model FLOPs/step", "projected step s", "projected MFU",
]  # fmt: skip


def run_all(args, rest: list[str]) -> int:
    """Compiles every planned config in a subprocess (a fresh libtpu and heap each) and writes one table."""
    jobs = plan(args.small, args.only)
    if not jobs:
        print("error: no config matched (TARGET_TOPOLOGY in configs/*.py, --only)", file=sys.stderr)
        return 2
    name = args.name if args.name != "compile_tpu" else ("aot_small" if args.small else "aot")
    rows, data, failed = [], [], 0
    for i, (path, topo, overrides) in enumerate(jobs):
        sub = f"{name}/{path.stem}_{topo.replace(':', '_')}"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", str(path.relative_to(ROOT)),
               "--topology", topo, "--name", sub, *overrides, *rest]  # fmt: skip
        print(f"[{i + 1}/{len(jobs)}] {path.name} on {topo} ...", file=sys.stderr, flush=True)
        result = ROOT / "runs" / sub / "results.json"
        if (args.reuse or args.cached) and result.is_file():
            old = json.loads(result.read_text())["data"]
            cfg = load_config(path, parse_overrides([*overrides, *rest]))
            if old.get("config_digest") == config_digest(cfg):
                hlo = result.parent / "hlo.txt.gz"
                if old.get("flops_version") != FLOPS_VERSION:  # counted by an older version: trace again, no compile
                    print("    tracing for model and kernel FLOPs ...", file=sys.stderr, flush=True)
                    old = {**retrace(old, cfg, topology_devices(topo)), "flops_version": FLOPS_VERSION}
                if hlo.is_file():  # HLO statistics and projection as this version computes them
                    old = restat(old, hlo)
                elif "peak_bf16_flops_per_chip" in old:
                    old.update(projection(old))
                write_results(sub, [results_table(old, str(path.relative_to(ROOT)), topo)], old)
                rows.append(_row(path.name, topo, old, 0, 0.0, ""))
                data.append({"config": path.name, "topology": topo, "returncode": 0, "reused": True, "stats": old})
                failed += old.get("fits") is False
                print(f"    reused {result} (same config)", file=sys.stderr, flush=True)
                continue
        if args.cached:  # table of stored results only
            rows.append(_dashes([path.name, topo, "-", "-", "-", "-", "not compiled yet (run without --cached)"]))
            data.append({"config": path.name, "topology": topo, "returncode": None, "stats": None})
            failed += 1
            continue
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
            rc, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired:
            rc, err = 124, f"timed out after {args.timeout} s"
        wall = time.perf_counter() - t0
        stats = json.loads(result.read_text())["data"] if rc in (0, 1) and result.is_file() else None
        last = [ln for ln in err.strip().splitlines() if ln.startswith("error")] or err.strip().splitlines()[-1:]
        rows.append(_row(path.name, topo, stats, rc, wall, (last[0] if last else "")[:200]))
        data.append({"config": path.name, "topology": topo, "returncode": rc, "wall_s": wall, "stats": stats})
        failed += stats is None or stats.get("fits") is False
        print(f"    {' | '.join(rows[-1][2:])}  ({wall:.0f} s)", file=sys.stderr, flush=True)
    caption = (
        ("Every family's CPU config" if args.small else "Every published-size config (TARGET_TOPOLOGY)")
        + " AOT-compiled on CPU for its TPU slice: train step with the config's mesh and remat policy. peak = the "
        "compiler's per-chip peak (arguments: params + optimizer state + batch; temp: activations and buffers). "
        "HLO FLOPs: the optimized program's matmuls, loop bodies x trip counts; kernel FLOPs: the matmuls inside "
        "Pallas kernels (opaque in the HLO), counted on the traced kernel bodies x grid; model FLOPs: the step traced "
        "for the same slice with remat off, counted on its jaxpr, with work that reads only a loop's constants "
        "counted once (recurrent depth: analytic at mean_loops), so MFU here is the share of the compiled work that "
        "is not recomputation or repeated loop-invariant work (an upper bound on the real MFU). Projected "
        "step = per-chip HLO + kernel FLOPs at the chip's peak bf16 FLOP/s (compute-bound, no communication), "
        "MFU = model FLOPs / (chips x peak x projected step); where a loop has a data-dependent "
        "trip count (sampled recurrence depth, ACT halting) the HLO count is a lower bound, the step is projected "
        "from the larger of the HLO and the model FLOPs (>=) and no MFU is given."
    )
    out = write_results(name, [Table(ALL_HEADER, rows, title="TPU AOT compile of every config", caption=caption)], data)
    print((out / "results.md").read_text())
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", help="a config file")
    parser.add_argument("--all", action="store_true", help="compile every config with a TARGET_TOPOLOGY")
    parser.add_argument("--small", action="store_true", help="with --all: every family's CPU config on v5e:2x2")
    parser.add_argument("--only", help="with --all: only configs whose file name contains this")
    parser.add_argument("--timeout", type=float, default=3600, help="with --all: seconds per compile")
    parser.add_argument("--reuse", action="store_true", help="with --all: keep a result whose config is unchanged")
    parser.add_argument("--cached", action="store_true", help="with --all: only gather stored results, compile nothing")
    parser.add_argument("--topology", default="v5e:4x4", help="a TPU topology name, e.g. v5e:16x16")
    parser.add_argument("--name", default="compile_tpu", help="results go to runs/<name>/")
    args, rest = parser.parse_known_args(argv)
    if args.all:
        return run_all(args, rest)
    if not args.config:
        parser.error("--config is required (or --all)")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # a concurrent compile would fail on the lockfile
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    cfg = load_config(args.config, parse_overrides(rest))
    from looped_jax.aot import compile_train_step, topology_devices

    try:
        hlo_path = ROOT / "runs" / args.name / "hlo.txt.gz"
        stats = compile_train_step(cfg, topology_devices(args.topology), hlo_path=hlo_path)
        stats["config_digest"] = config_digest(cfg)
        stats["flops_version"] = FLOPS_VERSION
    except ValueError as e:  # unknown topology, a batch the mesh cannot split: the message says what would work
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = write_results(args.name, [results_table(stats, args.config, args.topology)], stats)
    print(json.dumps({"topology": args.topology, "config": args.config, **stats}, indent=2))
    print(f"wrote {out / 'results.md'}", file=sys.stderr)
    if stats["fits"] is False:
        print(f"does not fit: peak {stats['peak_gib_per_chip']:.2f} GiB per chip, HBM {stats['hbm_gib_per_chip']} GiB,"
              f" short by {stats['shortfall_gib_per_chip']:.2f} GiB", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
