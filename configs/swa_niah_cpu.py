"""Sliding-window transformer baseline of the CPU needle-in-a-haystack demo (Titans variant "swa": the same
layers, window 16 and persistent tokens as titans_mag_cpu.py, no memory; mlp_dim raised so the parameter count
matches the Titans models: 151,296 vs MAG 149,272, MAL 149,400, MAC 157,464).
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.titans import TitansConfig


def get_config() -> ExperimentConfig:
    data = DataConfig(
        name="niah",
        seq_len=64,
        niah_kind="number",
        niah_value_len=2,
        niah_test_lens=(64, 128, 256, 512, 1024),
        num_train=50_000,
        num_test=200,
    )
    model = TitansConfig(
        variant="swa",
        vocab_size=63,  # niah.Vocab(16, 16, 16).size
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        mlp_dim=296,
        window=16,
        segment_len=16,
        num_persistent=4,
        memory_kind="linear",
        memory_heads=4,
        memory_head_dim=16,
        memory_chunk_size=16,
        memory_max_lr=0.05,
    )
    return ExperimentConfig(
        model=model,
        data=data,
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=100, weight_decay=0.1, end_learning_rate_ratio=0.1),
        train=TrainConfig(num_steps=600, global_batch_size=32, log_every=100, output_dir="runs/swa_niah_cpu"),
        checkpoint=CheckpointConfig(enabled=False),
    )
