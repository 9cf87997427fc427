"""configs/ltm_cpu_vi.py with the paper's 8 latent vectors per layer (instead of 4)."""

from pathlib import Path

from looped_jax.config import ExperimentConfig, apply_overrides, load_config


def get_config() -> ExperimentConfig:
    return apply_overrides(
        load_config(Path(__file__).with_name("ltm_cpu_vi.py")),
        {"model.num_latents": 8, "train.output_dir": "runs/ltm_cpu_vi_8latents"},
    )
