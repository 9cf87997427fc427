"""Titans-MAG on the CPU needle-in-a-haystack demo (Behrouz et al. 2024, sec. 5.2 S-NIAH, scaled down).

Trains on rows of 64 tokens (4x the 16-token attention window / MAC segment) and is evaluated on 64..1024
tokens by scripts/niah_eval.py against configs/swa_niah_cpu.py (sliding-window transformer, equal parameters).

Everything but the variant comes from titans_mac_cpu.py.
"""

from pathlib import Path

from looped_jax.config import ExperimentConfig, apply_overrides, load_config


def get_config() -> ExperimentConfig:
    return apply_overrides(
        load_config(Path(__file__).with_name("titans_mac_cpu.py")),
        {
            "model.variant": "mag",
            "train.output_dir": "runs/titans_mag_cpu",
        },
    )
