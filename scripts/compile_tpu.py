"""AOT-compile the sharded train step for a TPU topology on a CPU-only machine; print per-chip memory.

    pip install -e '.[tpu]'
    python scripts/compile_tpu.py --config configs/recurrent_depth_huginn.py --topology v5e:16x16 \
        --config.mesh.data=16 --config.mesh.fsdp=16

Prints the statistics as JSON and writes them as a table to ``runs/<name>/results.md`` (and ``results.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
        ["cost_analysis FLOPs per chip (loop bodies once)", f"{stats['cost_analysis_flops_per_chip']:.4g}"],
        [f"model FLOPs per step ({stats['model_flops_method']})", f"{stats['model_flops_per_step']:.4g}"],
        ["projected step (compute-bound, peak bf16) / MFU",
         f"{stats.get('projected_step_s', float('nan')):.4g} s / {stats.get('projected_mfu') or float('nan'):.3f}"],
        ["lower / compile time", f"{stats['lower_s']:.1f} s / {stats['compile_s']:.1f} s"],
    ]  # fmt: skip
    caption = f"{config} train step AOT-compiled for {topology}."
    return Table(["measure", "value"], rows, title="TPU AOT compile", caption=caption)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", required=True, help="a config file")
    parser.add_argument("--topology", default="v5e:4x4", help="a TPU topology name, e.g. v5e:16x16")
    parser.add_argument("--name", default="compile_tpu", help="results go to runs/<name>/")
    args, rest = parser.parse_known_args(argv)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # a concurrent compile would fail on the lockfile
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    cfg = load_config(args.config, parse_overrides(rest))
    from looped_jax.aot import compile_train_step, topology_devices

    try:
        stats = compile_train_step(cfg, topology_devices(args.topology))
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
