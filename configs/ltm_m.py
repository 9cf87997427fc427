"""LTM-M (Kong et al. 2025): d 512, 6 layers, 8 heads x 64, SwiGLU 1365 (= 8d/3),
8 latent vectors per layer, sliding window 256 within 1024-token sequences, 16 inner Adam steps
(lr 0.3 -> 0.03 cosine); outer AdamW 4e-4 -> 4e-5 cosine, weight decay 0.1, betas (0.9, 0.95), clip 1.0.

On the byte vocabulary (259 tokens) the count is far below the paper's (GPT-2 vocabulary of 50257,
tied embeddings): the embedding table is 259 x 512 instead of 50257 x 512 (25.7M parameters).
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.latent_thought import LatentThoughtConfig


def get_config() -> ExperimentConfig:
    model = LatentThoughtConfig(
        vocab_size=259,
        d_model=512,
        num_heads=8,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=1365,
        num_layers=6,
        num_latents=8,
        window=256,
        latent_span=1024,
        inner_steps=16,
        inner_lr=0.3,
        inner_lr_end_ratio=0.1,
    )
    return ExperimentConfig(
        model=model,
        data=DataConfig(name="bytes_text", seq_len=1024),
        optim=OptimConfig(
            learning_rate=4e-4,
            warmup_steps=1000,
            end_learning_rate_ratio=0.1,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            grad_clip=1.0,
        ),
        train=TrainConfig(num_steps=100_000, global_batch_size=64, log_every=50, output_dir="runs/ltm_m"),
        checkpoint=CheckpointConfig(save_every=2000, keep=3),
    )
