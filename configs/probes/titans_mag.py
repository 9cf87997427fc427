"""Titans memory-as-a-gate for the probes (scripts/probe_suite.py), as configs/titans_mag_cpu.py (two layers, a
linear neural memory of 4 heads x 16 updated in chunks of 16, 4 persistent tokens) with a 32-token sliding window
(the window of the FAM and RMT probe configs). The memory's projections and gates cost ~47k parameters, paid for
with a 96-wide SwiGLU: 119,000 parameters at vocabulary 32 (+9.3% over the transformer).
"""

import runpy
from pathlib import Path

from looped_jax.config import ExperimentConfig
from looped_jax.models.titans import TitansConfig

common = runpy.run_path(str(Path(__file__).with_name("common.py")))


def get_config() -> ExperimentConfig:
    model = TitansConfig(
        variant="mag",
        vocab_size=common["VOCAB_SIZE"],
        d_model=common["D_MODEL"],
        num_heads=common["NUM_HEADS"],
        num_kv_heads=common["NUM_HEADS"],
        head_dim=common["HEAD_DIM"],
        mlp_dim=96,
        num_layers=2,
        window=32,
        segment_len=16,
        num_persistent=4,
        memory_kind="linear",
        memory_heads=4,
        memory_head_dim=16,
        memory_chunk_size=16,
        memory_max_lr=0.05,
    )
    return common["experiment"](model, "runs/probes/titans_mag")
