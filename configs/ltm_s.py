"""LTM-S (Kong et al. 2025): d 512, 3 layers, 8 heads x 64, SwiGLU 1365 (= 8d/3), 8 latent vectors per
layer (24 in all), sliding window 256 within 1024-token sequences, 16 inner steps.

The paper's settings, as in the authors' training code (see ``looped_jax/models/latent_thought.py``):
latent rotary positions k * (1024 // 24) in every layer (``latent_positions="paper"``); inner AdamW
(weight decay 0.01) on (mu, log sigma^2) from mu_0 = 0, log sigma^2_0 = -5 + 0.1 N(0, 1), lr 0.3 -> 0.03
by their cosine (decay ratio t / 16), one eps fixed over the inner loop; outer AdamW 4e-4 -> 4e-5 cosine
after 1,000 warm-up steps, weight decay 0.1, betas (0.9, 0.95), clip 1.0; 512 sequences x 1,024 tokens
= 524,288 tokens per step (their 64 per device x 8 accumulation steps), 60,000 steps.

On the byte vocabulary (259 tokens) the count is far below the paper's (GPT-2 vocabulary of 50257,
tied embeddings): the embedding table is 259 x 512 instead of 50257 x 512 (25.7M parameters).
Our own inner optimiser is one override away: ``--config.model.inner_optimizer=adam
--config.model.inner_schedule=cosine``.

Measured plan (v5e:16x16, 256 chips, AOT on CPU: `python scripts/compile_tpu.py --all --only ltm_s`): mesh data 256,
remat none, 2 sequence(s) per chip; per chip the compiler's peak is 0.32 GiB of 15.75 (arguments 0.14, outputs 0.14,
temporaries 0.22 GiB, not all live at once); 3 collectives; projected MFU 1.00.
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.latent_thought import LatentThoughtConfig

TARGET_TOPOLOGY = "v5e:16x16"  # the slice this config is planned for (scripts/compile_tpu.py --all)

SEQ_LEN = 1024


def get_config() -> ExperimentConfig:
    model = LatentThoughtConfig(
        vocab_size=259,
        d_model=512,
        num_heads=8,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=1365,
        num_layers=3,
        num_latents=8,
        window=256,
        latent_span=SEQ_LEN,
        latent_positions="paper",
        inner_optimizer="adamw",
        inner_weight_decay=0.01,
        inner_schedule="paper",
        inner_steps=16,
        inner_lr=0.3,
        inner_lr_end_ratio=0.1,
        init_mu_std=0.0,
    )
    return ExperimentConfig(
        model=model,
        data=DataConfig(name="bytes_text", seq_len=SEQ_LEN),
        optim=OptimConfig(
            learning_rate=4e-4,
            warmup_steps=1000,
            end_learning_rate_ratio=0.1,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            grad_clip=1.0,
        ),
        train=TrainConfig(num_steps=60_000, global_batch_size=512, log_every=50, output_dir="runs/ltm_s"),
        checkpoint=CheckpointConfig(save_every=2000, keep=3),
    )
