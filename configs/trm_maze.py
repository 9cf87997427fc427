"""TRM (attention) on 30x30 mazes (Jolicoeur-Martineau 2025): 2 layers of width 512, n = 4, T = 3,
vocab 6, ~7M parameters; batch 768, AdamATan2 lr 1e-4, weight decay 1.0, puzzle embedding lr 1e-4 /
wd 1.0, EMA 0.999, 50,000 epochs of 1000 mazes (~65,104 steps).

Measured plan (v5e:16x16, 256 chips, AOT on CPU: `python scripts/compile_tpu.py --all --only trm_maze`): mesh data
256, remat none, 3 sequence(s) per chip; per chip the compiler's peak is 1.96 GiB of 15.75 (arguments 0.11, outputs
0.11, temporaries 2.14 GiB, not all live at once); 3 collectives; projected MFU 1.00.
"""

import dataclasses
import importlib.util
from pathlib import Path

from looped_jax.config import CheckpointConfig, ExperimentConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.trm import TRMConfig

TARGET_TOPOLOGY = "v5e:16x16"  # the slice this config is planned for (scripts/compile_tpu.py --all)

_spec = importlib.util.spec_from_file_location("hrm_sudoku", Path(__file__).with_name("hrm_sudoku.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)

PUZZLE_EMB_LR = 1e-4
PUZZLE_EMB_WEIGHT_DECAY = 1.0


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        model=TRMConfig(vocab_size=6, seq_len=900, latent_steps=4, recursions=3, dtype="bfloat16"),
        data=DataConfig(name="maze", maze_size=30, seq_len=900, num_train=1000, num_test=1000),
        optim=dataclasses.replace(
            _base.published_optim(ema_decay=0.999),
            puzzle_emb_learning_rate=PUZZLE_EMB_LR,
            puzzle_emb_weight_decay=PUZZLE_EMB_WEIGHT_DECAY,
        ),
        train=TrainConfig(
            num_steps=50_000 * 1000 // 768,
            global_batch_size=768,
            log_every=100,
            eval_every=5000,
            output_dir="runs/trm_maze",
        ),
        checkpoint=CheckpointConfig(save_every=5000, keep=3),
    )
