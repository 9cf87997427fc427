"""Autoregressive baseline for ``configs/ltm_cpu.py``: same width, depth, data, batch and steps
(so the same training tokens), full causal attention, no latents. Each LTM layer has a
cross-attention (4 d^2) and one more RMSNorm (d); the baseline spends them on a wider SwiGLU:
mlp 192 + (4*64^2 + 64) / (3*64) = 277.7 -> 278, i.e. 64 more parameters per layer (+0.1%).
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.looped import LoopedConfig

SEQ_LEN = 64


def get_config() -> ExperimentConfig:
    model = LoopedConfig(
        vocab_size=259,
        d_model=64,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        mlp_dim=278,
        num_layers=2,
        num_loops=1,
        share_weights=False,
    )
    return ExperimentConfig(
        model=model,
        data=DataConfig(name="bytes_text", seq_len=SEQ_LEN, max_text_bytes=4_000_000),
        optim=OptimConfig(
            learning_rate=3e-3, warmup_steps=30, end_learning_rate_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95
        ),
        train=TrainConfig(
            num_steps=600, global_batch_size=16, log_every=25, eval_batches=4, output_dir="runs/ar_baseline_cpu"
        ),
        checkpoint=CheckpointConfig(enabled=True, save_every=0, keep=1, async_save=False),
    )
