"""Tiny HRM on 4x4 Sudoku for a CPU run of minutes (scripts/evaluate.py --configs ... --steps ...).

d 64, one H and one L layer (N = T = 2), ACT up to 8 segments. Same parameter count as
transformer_sudoku_cpu.py (2 layers, no recursion) and trm_sudoku_cpu.py (one 2-layer net).
"""

import dataclasses

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.hrm import HRMConfig

PUZZLE_EMB_LR = 1e-3
PUZZLE_EMB_WEIGHT_DECAY = 0.1


def sudoku4_data() -> DataConfig:
    # 4x4 puzzles are all solved by singles (rating 0): no test_hard split, evaluation reports `test`
    return DataConfig(name="sudoku", sudoku_size=4, seq_len=16, num_train=3000, num_test=500, sudoku_augment=True)


def tiny_optim(ema_decay: float = 0.0) -> OptimConfig:
    return OptimConfig(
        name="adam_atan2",
        learning_rate=1e-3,
        warmup_steps=100,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        grad_clip=0.0,
        end_learning_rate_ratio=1.0,
        ema_decay=ema_decay,
    )


def get_config() -> ExperimentConfig:
    model = HRMConfig(
        vocab_size=6,
        seq_len=16,
        num_puzzle_ids=1,
        puzzle_emb_dim=64,
        d_model=64,
        num_heads=2,
        head_dim=32,
        mlp_dim=256,
        num_h_layers=1,
        num_l_layers=1,
        h_cycles=2,
        l_cycles=2,
        halt_max_steps=8,
    )
    return ExperimentConfig(
        model=model,
        data=sudoku4_data(),
        optim=dataclasses.replace(
            tiny_optim(),
            puzzle_emb_learning_rate=PUZZLE_EMB_LR,
            puzzle_emb_weight_decay=PUZZLE_EMB_WEIGHT_DECAY,
        ),
        train=TrainConfig(num_steps=2000, global_batch_size=64, log_every=100, output_dir="runs/hrm_sudoku_cpu"),
        checkpoint=CheckpointConfig(save_every=500, keep=2),
    )
