"""Recurrent Memory Transformer on the CPU needle-in-a-haystack data of configs/titans_mac_cpu.py (number needle,
2-digit value; trained on 64-token rows, tested on 64..1024).

Segments of 16 tokens (the Titans MAC segment / attention window) with 4 memory tokens; full BPTT over the 4
segments of a training row. Run:

    .venv/bin/python scripts/train.py --config configs/rmt_niah_cpu.py
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.rmt import RMTConfig


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
    model = RMTConfig(
        vocab_size=63,  # niah.Vocab(16, 16, 16).size
        d_model=64,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        mlp_dim=192,
        num_layers=2,
        segment_len=16,
        num_memory_tokens=4,
        bptt_segments=4,
    )
    return ExperimentConfig(
        model=model,
        data=data,
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=100, weight_decay=0.1, end_learning_rate_ratio=0.1),
        train=TrainConfig(num_steps=600, global_batch_size=32, log_every=100, output_dir="runs/rmt_niah_cpu"),
        checkpoint=CheckpointConfig(enabled=False),
    )
