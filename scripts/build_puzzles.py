"""Builds a puzzle data set (sudoku, maze or arc) into its data_dir, with progress and timings.

    python scripts/build_puzzles.py sudoku --config.data.sudoku_size=6 --config.data.seq_len=36 \
        --config.data.num_train=1000
    python scripts/build_puzzles.py maze --config.data.maze_size=30 --config.data.seq_len=900
    python scripts/build_puzzles.py arc --config.data.arc_dir=/path/to/ARC-AGI/data --config.data.seq_len=900

Any DataConfig field can be set with --config.data.FIELD=VALUE (as in every script). Building is idempotent: an existing
build with the same parameters is reused. Prints split sizes, the vocabulary and one example.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looped_jax.config import apply_overrides, parse_overrides  # noqa: E402
from looped_jax.data import DataConfig, get_builder, prepare, split_names, vocab_size  # noqa: E402
from looped_jax.data.puzzles import num_puzzle_ids  # noqa: E402

USAGE = "usage: build_puzzles.py {sudoku,maze,arc} [--config.data.FIELD=VALUE ...]"


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("sudoku", "maze", "arc"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        overrides = parse_overrides(argv[1:], prefix="config.data")
    except ValueError as e:
        print(f"{e}\n{USAGE}", file=sys.stderr)
        return 2
    seq_len = {"sudoku": 81, "maze": 900, "arc": 900}[argv[0]]
    cfg = apply_overrides(DataConfig(name=argv[0], seq_len=seq_len), overrides)
    start = time.perf_counter()
    prepare(cfg)
    builder = get_builder(cfg)
    sizes = {split: builder.info.splits[split].num_examples for split in split_names(cfg)}
    print(f"[{cfg.name}] {builder.data_dir}")
    print(
        f"[{cfg.name}] splits {sizes}  vocab {vocab_size(cfg)}  puzzle ids {num_puzzle_ids(cfg)}  "
        f"seq_len {cfg.seq_len}  ({time.perf_counter() - start:.1f} s)"
    )
    example = builder.as_data_source(split="train")[0]
    print(
        f"[{cfg.name}] train[0]: "
        + ", ".join(
            f"{k}={v.tolist() if getattr(v, 'size', 2) == 1 else getattr(v, 'shape', v)}" for k, v in example.items()
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
