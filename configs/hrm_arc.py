"""HRM on ARC-AGI (Wang et al. 2025): vocab 12 (PAD, EOS, 10 colours), 30x30 grids (900 cells),
one puzzle-embedding row per (task, augmentation), batch 768, AdamATan2 lr 1e-4, weight decay
0.1, puzzle embedding sign-SGD lr 1e-2 / weight decay 0.1, 100,000 epochs over the tasks.

The puzzle-identifier table size comes from the data (looped_jax.data.arc.num_puzzle_ids); when
the task list is not available here it falls back to ARC-AGI-1's 800 tasks (400 training +
400 evaluation): 1 + 800 * arc_num_aug.
"""

import dataclasses
import importlib.util
from pathlib import Path

from looped_jax.config import CheckpointConfig, ExperimentConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.hrm import HRMConfig

_spec = importlib.util.spec_from_file_location("hrm_sudoku", Path(__file__).with_name("hrm_sudoku.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)

PUZZLE_EMB_LR = 1e-2
PUZZLE_EMB_WEIGHT_DECAY = 0.1
ARC1_TASKS = 800


def arc_data() -> DataConfig:
    return DataConfig(name="arc", seq_len=900)


def arc_puzzle_ids(data: DataConfig) -> tuple[int, int]:
    """(puzzle-identifier table size, number of tasks)."""
    from looped_jax.data import arc

    try:
        tasks = len(arc.load_tasks(data.arc_dir))
    except ValueError:
        tasks = ARC1_TASKS
    return 1 + tasks * data.arc_num_aug, tasks


def get_config() -> ExperimentConfig:
    data = arc_data()
    num_ids, tasks = arc_puzzle_ids(data)
    return ExperimentConfig(
        model=HRMConfig(vocab_size=12, seq_len=900, num_puzzle_ids=num_ids, dtype="bfloat16"),
        data=data,
        optim=dataclasses.replace(
            _base.published_optim(weight_decay=0.1),
            puzzle_emb_learning_rate=PUZZLE_EMB_LR,
            puzzle_emb_weight_decay=PUZZLE_EMB_WEIGHT_DECAY,
        ),
        train=TrainConfig(
            num_steps=100_000 * tasks // 768,
            global_batch_size=768,
            log_every=100,
            eval_every=10_000,
            output_dir="runs/hrm_arc",
        ),
        checkpoint=CheckpointConfig(save_every=5000, keep=3),
    )
