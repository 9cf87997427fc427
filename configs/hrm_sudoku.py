"""HRM on Sudoku (Wang et al. 2025; sapientinc/HRM config/cfg_pretrain.yaml + arch/hrm_v1.yaml):
27,275,266 parameters (+512 puzzle embedding), 1000 training puzzles x 1000 augmentations, batch 768,
AdamATan2 lr 1e-4 (betas 0.9 / 0.95, warmup 2000 then constant), weight decay 1.0, puzzle
embedding sign-SGD lr 1e-4 / weight decay 1.0, ACT up to 16 segments with exploration 0.1,
20,000 epochs of the 1000 puzzle groups = 20000 * 1000 / 768 ~ 26,042 steps, bfloat16 compute.

The optimizer is AdamATan2 + sign-SGD (looped_jax.train.adam_atan2.hrm_optimizer); selected by
optim.name='adam_atan2'.

Data: our generated 9x9 puzzles (looped_jax.data.sudoku), not Sudoku-Extreme. Evaluation reports the `test_hard`
split by default (rating >= 3 search guesses; the plain `test` split is no harder than `train`); training logs both.
See the sudoku module docstring for building a split of Sudoku-Extreme-like difficulty.

Measured plan (v5e:16x16, 256 chips, AOT on CPU: `python scripts/compile_tpu.py --all --only hrm_sudoku`): mesh data
256, remat none, 3 sequence(s) per chip; per chip the compiler's peak is 0.41 GiB of 15.75 (arguments 0.31, outputs
0.31, temporaries 0.12 GiB, not all live at once); 3 collectives; projected MFU 1.00.
"""

import dataclasses

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.hrm import HRMConfig

TARGET_TOPOLOGY = "v5e:16x16"  # the slice this config is planned for (scripts/compile_tpu.py --all)

PUZZLE_EMB_LR = 1e-4
PUZZLE_EMB_WEIGHT_DECAY = 1.0
EPOCHS, GROUPS, BATCH = 20_000, 1000, 768


def published_optim(weight_decay: float = 1.0, ema_decay: float = 0.0) -> OptimConfig:
    return OptimConfig(
        name="adam_atan2",
        learning_rate=1e-4,
        warmup_steps=2000,
        weight_decay=weight_decay,
        b1=0.9,
        b2=0.95,
        grad_clip=0.0,
        end_learning_rate_ratio=1.0,
        ema_decay=ema_decay,
    )


def sudoku9_data() -> DataConfig:
    return DataConfig(name="sudoku", sudoku_size=9, seq_len=81, num_train=GROUPS, num_test=1000, sudoku_num_aug=1000)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        model=HRMConfig(dtype="bfloat16"),
        data=sudoku9_data(),
        optim=dataclasses.replace(
            published_optim(),
            puzzle_emb_learning_rate=PUZZLE_EMB_LR,
            puzzle_emb_weight_decay=PUZZLE_EMB_WEIGHT_DECAY,
        ),
        train=TrainConfig(
            num_steps=EPOCHS * GROUPS // BATCH,
            global_batch_size=BATCH,
            log_every=100,
            eval_every=2000,
            output_dir="runs/hrm_sudoku",
        ),
        checkpoint=CheckpointConfig(save_every=2000, keep=3),
    )
