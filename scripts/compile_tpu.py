"""AOT-compile the sharded train step for a TPU topology on a CPU-only machine; print per-chip memory.

    pip install -e '.[tpu]'
    python scripts/compile_tpu.py --config configs/recurrent_depth_huginn.py --topology v5e:16x16 \
        --config.mesh.data=16 --config.mesh.fsdp=16

Prints the statistics as JSON and writes them as a table to ``runs/<name>/results.md`` (and ``results.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looped_jax.config import load_config, parse_overrides  # noqa: E402
from looped_jax.results import Table, write_results  # noqa: E402


def results_table(stats: dict, config: str, topology: str) -> Table:
    gib = lambda key: f"{stats[key]:.3f} GiB"  # noqa: E731
    rows = [
        ["devices", f"{stats['devices']} x {stats['device_kind'] or stats['platform']}"],
        ["mesh", ", ".join(f"{k}={v}" for k, v in stats["mesh"].items())],
        ["arguments per chip", gib("argument_gib_per_chip")],
        ["outputs per chip", gib("output_gib_per_chip")],
        ["temp per chip", gib("temp_gib_per_chip")],
        ["peak estimate per chip (arguments + outputs - aliased + temp)", gib("peak_estimate_gib_per_chip")],
        ["lower / compile time", f"{stats['lower_s']:.1f} s / {stats['compile_s']:.1f} s"],
    ]
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
    cfg = load_config(args.config, parse_overrides(rest))
    from looped_jax.aot import compile_train_step, topology_devices

    stats = compile_train_step(cfg, topology_devices(args.topology))
    out = write_results(args.name, [results_table(stats, args.config, args.topology)], stats)
    print(json.dumps({"topology": args.topology, "config": args.config, **stats}, indent=2))
    print(f"wrote {out / 'results.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
