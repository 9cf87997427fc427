"""Block sliding window attention baseline for configs/fam_passkey_cpu.py: the same model with
fam_length=0 (window (memory_segments + 1) * block_size = 32 tokens, no feedback memory)."""

import importlib.util
from pathlib import Path

from looped_jax.config import ExperimentConfig

_spec = importlib.util.spec_from_file_location("fam_passkey_cpu", Path(__file__).with_name("fam_passkey_cpu.py"))
_fam = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fam)


def get_config() -> ExperimentConfig:
    return _fam.get_config(fam_length=0, output_dir="runs/bswa_passkey_cpu")
