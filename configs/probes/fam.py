"""TransformerFAM for the probes (scripts/probe_suite.py), as configs/fam_passkey_cpu.py: two layers, blocks of
16 tokens attending to one previous block (a 32-token window) plus 4 feedback-memory vectors per layer carried
from block to block. Random state passing is off (probe rows are independent problems; evaluation starts every
row fresh). 109,120 parameters at vocabulary 32.
"""

import runpy
from pathlib import Path

from looped_jax.config import ExperimentConfig
from looped_jax.models.fam import FamConfig

common = runpy.run_path(str(Path(__file__).with_name("common.py")))


def get_config() -> ExperimentConfig:
    model = FamConfig(
        vocab_size=common["VOCAB_SIZE"],
        d_model=common["D_MODEL"],
        num_heads=common["NUM_HEADS"],
        num_kv_heads=common["NUM_HEADS"],
        head_dim=common["HEAD_DIM"],
        mlp_dim=192,
        num_layers=2,
        block_size=16,
        memory_segments=1,
        fam_length=4,
        random_position_offset=True,
        state_passing_prob=0.0,
    )
    return common["experiment"](model, "runs/probes/fam")
