"""Train any looped_jax model from a config file.

    python scripts/train.py --config configs/recurrent_depth_chains.py --config.train.num_steps=2000

Resumes from the latest checkpoint in ``train.output_dir`` when there is one.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looped_jax.config import load_config, parse_cli_overrides  # noqa: E402


def main(argv: list[str]) -> int:
    path, overrides = parse_cli_overrides(argv)
    if path is None:
        print("usage: train.py --config configs/<name>.py [--config.section.field=value ...]", file=sys.stderr)
        return 2
    cfg = load_config(path, overrides)

    import jax

    from looped_jax.data import prepare, split_names
    from looped_jax.train.trainer import Trainer

    if jax.process_count() > 1:
        jax.distributed.initialize()
    prepare(cfg.data)
    trainer = Trainer(cfg)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}  mesh: {dict(trainer.mesh.shape)}")
    _, history = trainer.fit(eval_splits=tuple(s for s in split_names(cfg.data) if s != "train"))
    print("final eval:", history["eval"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
