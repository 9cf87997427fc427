"""configs/ltm_cpu.py with the posterior trained as ordinary stochastic VI: started at the prior's variance
(``init_logvar=0``) and a fresh eps at every inner step (``resample_eps``) instead of the paper's
log sigma^2_0 = -5 and one eps fixed over the inner loop. scripts/ltm_eval.py compares both."""

from pathlib import Path

from looped_jax.config import ExperimentConfig, apply_overrides, load_config


def get_config() -> ExperimentConfig:
    return apply_overrides(
        load_config(Path(__file__).with_name("ltm_cpu.py")),
        {"model.init_logvar": 0.0, "model.resample_eps": True, "train.output_dir": "runs/ltm_cpu_vi"},
    )
