"""Recurrent Memory Transformer on PassKey retrieval, CPU-sized (Bulatov et al. 2022 / 2024), on the data of
configs/fam_passkey_cpu.py: rows of 32..128 tokens for training, test_len{64,128,256,512}.

Segments of 32 tokens (the FAM config's attention window, 2 blocks of 16) with 4 memory tokens (FAM's
length per layer); attention never reaches past a segment, so a key in an earlier segment is answered only
through the memory. Full BPTT over the 4 segments of a training row (bptt_segments=4). 1,000 steps (6.4 min
on a shared 2-core CPU): digit accuracy 0.72 / 0.68 / 0.66 / 0.54 at 64 / 128 / 256 / 512 tokens, whole-key
0.14 / 0.10 / 0.07 / 0.03. With 16-token segments (8 per row) it learnt far slower (digit 0.22 after 620
steps). Run:

    .venv/bin/python scripts/train.py --config configs/rmt_passkey_cpu.py
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.rmt import RMTConfig


def get_config(output_dir: str = "runs/rmt_passkey_cpu") -> ExperimentConfig:
    data = DataConfig(
        name="passkey",
        seq_len=128,
        passkey_train_min_len=32,
        passkey_test_lens=(64, 128, 256, 512),
        passkey_digits=5,
        passkey_filler_vocab=8,
        num_train=20_000,
        num_test=256,
    )
    model = RMTConfig(
        vocab_size=22,
        d_model=64,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        mlp_dim=192,
        num_layers=2,
        segment_len=32,
        num_memory_tokens=4,
        bptt_segments=4,
    )
    return ExperimentConfig(
        model=model,
        data=data,
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=50, weight_decay=0.1, end_learning_rate_ratio=0.05),
        train=TrainConfig(num_steps=1000, global_batch_size=32, log_every=50, eval_batches=8, output_dir=output_dir),
        checkpoint=CheckpointConfig(enabled=False),
    )
