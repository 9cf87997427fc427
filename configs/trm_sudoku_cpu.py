"""Tiny TRM on 4x4 Sudoku for a CPU run of minutes: one 2-layer attention net of width 64,
n = 2, T = 2, 4 prefix registers, ACT up to 8 segments, EMA 0.99 (0.999 in the paper is too
slow for a run of ~1000 steps)."""

import dataclasses
import importlib.util
from pathlib import Path

from looped_jax.config import CheckpointConfig, ExperimentConfig, TrainConfig
from looped_jax.models.trm import TRMConfig

_spec = importlib.util.spec_from_file_location("hrm_sudoku_cpu", Path(__file__).with_name("hrm_sudoku_cpu.py"))
_hrm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_hrm)

PUZZLE_EMB_LR = _hrm.PUZZLE_EMB_LR
PUZZLE_EMB_WEIGHT_DECAY = _hrm.PUZZLE_EMB_WEIGHT_DECAY


def get_config() -> ExperimentConfig:
    model = TRMConfig(
        vocab_size=6,
        seq_len=16,
        num_puzzle_ids=1,
        puzzle_emb_dim=64,
        puzzle_emb_len=4,
        d_model=64,
        num_heads=2,
        head_dim=32,
        mlp_dim=256,
        num_layers=2,
        latent_steps=2,
        recursions=2,
        halt_max_steps=8,
    )
    return ExperimentConfig(
        model=model,
        data=_hrm.sudoku4_data(),
        optim=dataclasses.replace(
            _hrm.tiny_optim(ema_decay=0.99),
            puzzle_emb_learning_rate=PUZZLE_EMB_LR,
            puzzle_emb_weight_decay=PUZZLE_EMB_WEIGHT_DECAY,
        ),
        train=TrainConfig(num_steps=2000, global_batch_size=64, log_every=100, output_dir="runs/trm_sudoku_cpu"),
        checkpoint=CheckpointConfig(save_every=500, keep=2),
    )
