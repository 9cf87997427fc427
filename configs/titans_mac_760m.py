"""Titans-MAC, 760M size (Behrouz et al. 2024, sec. 5.1: AdamW 4e-4 with cosine decay, weight decay 0.1,
4k context, 30B training tokens; Llama 32k vocabulary). Parameters: ~756M (counted with nnx.eval_shape
in tests/models/test_titans.py, no allocation).

Deep (2-layer MLP) memory with 24 heads of 64, updated in chunks of 64 tokens; theta is kept small
(memory_max_lr 1e-3, so one chunk's summed step stays << 1) and each chunk's surprise is clipped.
Data: set data.name / data_dir to a prepared text data set (the default here is byte-level text for a smoke
run; the paper trains on FineWeb-Edu with the Llama 2 tokenizer, which is not bundled).
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.titans import TitansConfig


def get_config() -> ExperimentConfig:
    model = TitansConfig(
        variant="mac",
        vocab_size=32_000,
        d_model=1536,
        num_layers=18,
        num_heads=24,
        num_kv_heads=24,
        head_dim=64,
        mlp_dim=3840,
        window=512,
        segment_len=512,
        num_persistent=4,
        memory_kind="mlp",
        memory_heads=24,
        memory_head_dim=64,
        memory_layers=2,
        memory_chunk_size=64,
        memory_max_lr=1e-3,
        max_surprise_norm=1.0,
        dtype="bfloat16",
    )
    return ExperimentConfig(
        model=model,
        data=DataConfig(name="bytes_text", seq_len=4096),
        optim=OptimConfig(learning_rate=4e-4, warmup_steps=2000, weight_decay=0.1, end_learning_rate_ratio=0.1),
        train=TrainConfig(num_steps=57_200, global_batch_size=128, log_every=100, output_dir="runs/titans_mac_760m"),
        checkpoint=CheckpointConfig(save_every=1000, keep=3),
    )
