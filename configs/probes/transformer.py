"""Plain transformer for the probes (scripts/probe_suite.py): the ``looped`` family with share_weights=False and
num_loops=1, i.e. two ordinary pre-norm decoder layers with full causal attention (configs/ar_baseline_cpu.py at
mlp_dim 192). 108,864 parameters at vocabulary 32.
"""

import runpy
from pathlib import Path

from looped_jax.config import ExperimentConfig
from looped_jax.models.looped import LoopedConfig

common = runpy.run_path(str(Path(__file__).with_name("common.py")))


def get_config() -> ExperimentConfig:
    model = LoopedConfig(
        vocab_size=common["VOCAB_SIZE"],
        d_model=common["D_MODEL"],
        num_heads=common["NUM_HEADS"],
        num_kv_heads=common["NUM_HEADS"],
        head_dim=common["HEAD_DIM"],
        mlp_dim=192,
        num_layers=2,
        num_loops=1,
        share_weights=False,
    )
    return common["experiment"](model, "runs/probes/transformer")
