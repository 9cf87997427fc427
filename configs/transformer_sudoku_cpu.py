"""Non-recursive baseline for hrm_sudoku_cpu.py / trm_sudoku_cpu.py: the same code and parameters
(2 post-norm layers of width 64) applied once: HRM with N = T = 1 and a single ACT segment is a
plain 2-layer bidirectional transformer trained with full backprop (no recursion, no halting)."""

import dataclasses
import importlib.util
from pathlib import Path

from looped_jax.config import ExperimentConfig, TrainConfig

_spec = importlib.util.spec_from_file_location("hrm_sudoku_cpu", Path(__file__).with_name("hrm_sudoku_cpu.py"))
_hrm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_hrm)

PUZZLE_EMB_LR = _hrm.PUZZLE_EMB_LR
PUZZLE_EMB_WEIGHT_DECAY = _hrm.PUZZLE_EMB_WEIGHT_DECAY


def get_config() -> ExperimentConfig:
    cfg = _hrm.get_config()
    model = dataclasses.replace(cfg.model, h_cycles=1, l_cycles=1, halt_max_steps=1)
    train = TrainConfig(num_steps=2000, global_batch_size=64, log_every=100, output_dir="runs/transformer_sudoku_cpu")
    return dataclasses.replace(cfg, model=model, train=train)
