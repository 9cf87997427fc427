"""Recurrent Memory Transformer for the probes (scripts/probe_suite.py), as configs/rmt_passkey_cpu.py: two layers
over segments of 32 tokens with 4 memory tokens read at the start and written at the end of each segment, full
BPTT over up to 4 segments. 109,184 parameters at vocabulary 32.
"""

import runpy
from pathlib import Path

from looped_jax.config import ExperimentConfig
from looped_jax.models.rmt import RMTConfig

common = runpy.run_path(str(Path(__file__).with_name("common.py")))


def get_config() -> ExperimentConfig:
    model = RMTConfig(
        vocab_size=common["VOCAB_SIZE"],
        d_model=common["D_MODEL"],
        num_heads=common["NUM_HEADS"],
        num_kv_heads=common["NUM_HEADS"],
        head_dim=common["HEAD_DIM"],
        mlp_dim=192,
        num_layers=2,
        segment_len=32,
        num_memory_tokens=4,
        bptt_segments=4,
    )
    return common["experiment"](model, "runs/probes/rmt")
