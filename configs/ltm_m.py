"""LTM-M (Kong et al. 2025): d 512, 6 layers, 8 heads x 64, SwiGLU 1365 (= 8d/3),
8 latent vectors per layer, sliding window 256 within 1024-token sequences, 16 inner Adam steps
(lr 0.3 -> 0.03 cosine); outer AdamW 4e-4 -> 4e-5 cosine, weight decay 0.1, betas (0.9, 0.95), clip 1.0.

On the byte vocabulary (259 tokens) the count is far below the paper's (GPT-2 vocabulary of 50257,
tied embeddings): the embedding table is 259 x 512 instead of 50257 x 512 (25.7M parameters).

Everything but the depth comes from ltm_s.py.
"""

from pathlib import Path

from looped_jax.config import ExperimentConfig, apply_overrides, load_config


def get_config() -> ExperimentConfig:
    return apply_overrides(
        load_config(Path(__file__).with_name("ltm_s.py")),
        {
            "model.num_layers": 6,
            "train.output_dir": "runs/ltm_m",
        },
    )
