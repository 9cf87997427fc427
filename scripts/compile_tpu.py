"""AOT-compile the sharded train step for a TPU topology on a CPU-only machine; print per-chip memory.

    pip install -e '.[tpu]'
    python scripts/compile_tpu.py --config configs/recurrent_depth_huginn.py --topology v5e:16x16 \
        --config.mesh.data=16 --config.mesh.fsdp=16
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looped_jax.config import load_config, parse_cli_overrides  # noqa: E402


def main(argv: list[str]) -> int:
    topology = "v5e:4x4"
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] == "--topology":
            topology = argv[i + 1]
            i += 2
            continue
        if argv[i].startswith("--topology="):
            topology = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    path, overrides = parse_cli_overrides(rest)
    if path is None:
        print(
            "usage: compile_tpu.py --config configs/<name>.py --topology v5e:16x16 [--config.x=v ...]", file=sys.stderr
        )
        return 2
    cfg = load_config(path, overrides)
    from looped_jax.aot import compile_train_step, topology_devices

    stats = compile_train_step(cfg, topology_devices(topology))
    print(json.dumps({"topology": topology, "config": path, **stats}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
