"""TRM-MLP on Sudoku (Jolicoeur-Martineau 2025; SamsungSAILMontreal/TinyRecursiveModels):
one 2-layer MLP-mixer net (sequence SwiGLU over 16 + 81 positions), width 512, n = 6, T = 3,
ACT up to 16 segments, 5,028,866 parameters (+512 puzzle embedding); batch 768, AdamATan2
lr 1e-4 (warmup 2000), weight decay 1.0, puzzle embedding lr 1e-4 / wd 1.0, EMA 0.999,
50,000 epochs of the 1000 puzzle groups (~65,104 steps).

Measured plan (v5e:16x16, 256 chips, AOT on CPU: `python scripts/compile_tpu.py --all --only trm_sudoku_mlp`): mesh
data 256, remat none, 3 sequence(s) per chip; per chip the compiler's peak is 0.22 GiB of 15.75 (arguments 0.08,
outputs 0.08, temporaries 0.17 GiB, not all live at once); 3 collectives; projected MFU 1.00.
"""

import dataclasses
import importlib.util
from pathlib import Path

from looped_jax.config import CheckpointConfig, ExperimentConfig, TrainConfig
from looped_jax.models.trm import TRMConfig

TARGET_TOPOLOGY = "v5e:16x16"  # the slice this config is planned for (scripts/compile_tpu.py --all)

_spec = importlib.util.spec_from_file_location("hrm_sudoku", Path(__file__).with_name("hrm_sudoku.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)

PUZZLE_EMB_LR = 1e-4
PUZZLE_EMB_WEIGHT_DECAY = 1.0


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        model=TRMConfig(mixer="mlp", latent_steps=6, recursions=3, dtype="bfloat16"),
        data=_base.sudoku9_data(),
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
            output_dir="runs/trm_sudoku_mlp",
        ),
        checkpoint=CheckpointConfig(save_every=5000, keep=3),
    )
