"""Recurrent-depth model for the probes (scripts/probe_suite.py), laid out as configs/recurrent_depth_chains.py:
no prelude or coda, one shared core layer looped r ~ 6 + 1 times in training (at most 16, backprop through the
last 4) and 6 times at evaluation. The core's SwiGLU is 448 wide so the model has about the parameters of the
two-layer transformer: 113,088 at vocabulary 32 (+3.9%), with one layer's compute per loop.
"""

import runpy
from pathlib import Path

from looped_jax.config import ExperimentConfig
from looped_jax.models.recurrent_depth import RecurrentDepthConfig

common = runpy.run_path(str(Path(__file__).with_name("common.py")))


def get_config() -> ExperimentConfig:
    model = RecurrentDepthConfig(
        vocab_size=common["VOCAB_SIZE"],
        d_model=common["D_MODEL"],
        num_heads=common["NUM_HEADS"],
        num_kv_heads=common["NUM_HEADS"],
        head_dim=common["HEAD_DIM"],
        mlp_dim=448,
        num_prelude_layers=0,
        num_core_layers=1,
        num_coda_layers=0,
        mean_loops=6,
        grad_steps=4,
        max_train_loops=16,
        eval_loops=6,
        rope_theta=10_000.0,
    )
    return common["experiment"](model, "runs/probes/recurrent_depth")
