"""Titans-LMM (the neural memory alone, no attention) on the CPU needle-in-a-haystack demo (Behrouz et al.
2024, sec. 5.2 S-NIAH, scaled down); evaluated by scripts/niah_eval.py next to MAC / MAG / MAL and the
sliding-window baseline (configs/swa_niah_cpu.py).

Everything but the variant comes from titans_mac_cpu.py.
"""

from pathlib import Path

from looped_jax.config import ExperimentConfig, apply_overrides, load_config


def get_config() -> ExperimentConfig:
    return apply_overrides(
        load_config(Path(__file__).with_name("titans_mac_cpu.py")),
        {
            "model.variant": "lmm",
            "train.output_dir": "runs/titans_lmm_cpu",
        },
    )
