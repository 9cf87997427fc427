"""HRM at the probes' size (configs/hrm_sudoku_cpu.py with a 192-wide SwiGLU and no puzzle embedding: one H and
one L layer, N = T = 2, ACT up to 8 segments). 110,722 parameters at vocabulary 32 and seq_len 40 (learned
positions are off; RoPE).

HRM's blocks attend bidirectionally (models/hrm.py, ``post_norm_block_config(cfg)``, mask_kind "bidirectional")
over a grid of exactly ``seq_len`` tokens, so scripts/probe_suite.py does not feed it the probes' causal next-token
rows (every position would see the token it has to predict): it trains and scores it in place ("fill-in", HRM's
native task shape, like Sudoku): the whole problem with every answer token replaced by the blank PAD = 0, which no
problem contains, as inputs, the whole problem as targets, weight on the answer cells (``fill_in_batch`` there).
``seq_len`` = 40 here is a placeholder: the script sets it per probe to the longest test problem (the grid is
fixed-size; training problems are padded up to it). With RoPE the parameter count does not depend on it.
"""

import runpy
from pathlib import Path

from looped_jax.config import ExperimentConfig
from looped_jax.models.hrm import HRMConfig

common = runpy.run_path(str(Path(__file__).with_name("common.py")))


def get_config() -> ExperimentConfig:
    model = HRMConfig(
        vocab_size=common["VOCAB_SIZE"],
        seq_len=40,
        num_puzzle_ids=1,
        puzzle_emb_dim=0,
        d_model=common["D_MODEL"],
        num_heads=common["NUM_HEADS"],
        head_dim=common["HEAD_DIM"],
        mlp_dim=192,
        num_h_layers=1,
        num_l_layers=1,
        h_cycles=2,
        l_cycles=2,
        halt_max_steps=8,
    )
    return common["experiment"](model, "runs/probes/hrm")
