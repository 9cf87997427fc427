"""Sliding-window transformer baseline of the CPU needle-in-a-haystack demo (Titans variant "swa": the same
layers, window 16 and persistent tokens as titans_mag_cpu.py, no memory; mlp_dim raised so the parameter count
matches the Titans models: 151,296 vs MAG 149,272, MAL 149,400, MAC 157,464).

Data, widths, window and training come from titans_mac_cpu.py.
"""

from pathlib import Path

from looped_jax.config import ExperimentConfig, apply_overrides, load_config


def get_config() -> ExperimentConfig:
    return apply_overrides(
        load_config(Path(__file__).with_name("titans_mac_cpu.py")),
        {
            "model.variant": "swa",
            "model.mlp_dim": 296,
            "train.output_dir": "runs/swa_niah_cpu",
        },
    )
