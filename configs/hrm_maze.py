"""HRM on 30x30 mazes (Wang et al. 2025, Maze-Hard): the Sudoku model with vocab 6 (PAD, wall,
open, start, goal, path) and 900 cells; 1000 training mazes, batch 768, AdamATan2 lr 1e-4,
weight decay 1.0, puzzle embedding lr 1e-4 / wd 1.0, 20,000 epochs (~26,042 steps).

Measured plan (v5e:16x16, 256 chips, AOT on CPU: `python scripts/compile_tpu.py --all --only hrm_maze`): mesh data
256, remat none, 3 sequence(s) per chip; per chip the compiler's peak is 1.41 GiB of 15.75 (arguments 0.32, outputs
0.32, temporaries 1.19 GiB, not all live at once); 3 collectives; projected MFU 1.00.
"""

import dataclasses
import importlib.util
from pathlib import Path

from looped_jax.config import CheckpointConfig, ExperimentConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.hrm import HRMConfig

TARGET_TOPOLOGY = "v5e:16x16"  # the slice this config is planned for (scripts/compile_tpu.py --all)

_spec = importlib.util.spec_from_file_location("hrm_sudoku", Path(__file__).with_name("hrm_sudoku.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)

PUZZLE_EMB_LR = 1e-4
PUZZLE_EMB_WEIGHT_DECAY = 1.0


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        model=HRMConfig(vocab_size=6, seq_len=900, dtype="bfloat16"),
        data=DataConfig(name="maze", maze_size=30, seq_len=900, num_train=1000, num_test=1000),
        optim=dataclasses.replace(
            _base.published_optim(),
            puzzle_emb_learning_rate=PUZZLE_EMB_LR,
            puzzle_emb_weight_decay=PUZZLE_EMB_WEIGHT_DECAY,
        ),
        train=TrainConfig(
            num_steps=20_000 * 1000 // 768,
            global_batch_size=768,
            log_every=100,
            eval_every=2000,
            output_dir="runs/hrm_maze",
        ),
        checkpoint=CheckpointConfig(save_every=2000, keep=3),
    )
