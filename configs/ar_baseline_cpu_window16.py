"""configs/ar_baseline_cpu.py restricted to the LTM's 16-byte sliding window (``model.window=16``), so the
baseline sees exactly the context the LTM's decoder sees without its latents."""

from pathlib import Path

from looped_jax.config import ExperimentConfig, apply_overrides, load_config


def get_config() -> ExperimentConfig:
    return apply_overrides(
        load_config(Path(__file__).with_name("ar_baseline_cpu.py")),
        {"model.window": 16, "train.output_dir": "runs/ar_baseline_cpu_window16"},
    )
