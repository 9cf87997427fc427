"""configs/ltm_cpu.py with the paper's inner loop and latent placement (the settings of the published
``configs/ltm_s.py``): latent rotary positions k * (64 // (4 x 2)) = 0, 8, 16, 24 in both layers
(``latent_positions="paper"``), inner AdamW with weight decay 0.01 on the authors' schedule (decay ratio
t / inner_steps), mu_0 = 0. ``scripts/ltm_eval.py`` compares it with ltm_cpu.py."""

from pathlib import Path

from looped_jax.config import ExperimentConfig, apply_overrides, load_config


def get_config() -> ExperimentConfig:
    return apply_overrides(
        load_config(Path(__file__).with_name("ltm_cpu.py")),
        {
            "model.latent_positions": "paper",
            "model.inner_optimizer": "adamw",
            "model.inner_weight_decay": 0.01,
            "model.inner_schedule": "paper",
            "model.init_mu_std": 0.0,
            "train.output_dir": "runs/ltm_cpu_paper",
        },
    )
