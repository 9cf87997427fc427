"""TransformerFAM on PassKey retrieval, CPU-sized (Hwang et al. 2024, arXiv 2404.09173, Sec. 4.2).

Window (memory_segments + 1) * block_size = 32 tokens; trained on rows of 32..128 tokens, evaluated on
test_len{64,128,256,512} by scripts/passkey_eval.py (configs/bswa_passkey_cpu.py is the same model
without FAM). Run: .venv/bin/python scripts/passkey_eval.py
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.fam import FamConfig


def get_config(fam_length: int = 4, output_dir: str = "runs/fam_passkey_cpu") -> ExperimentConfig:
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
    model = FamConfig(
        vocab_size=22,
        d_model=64,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        mlp_dim=192,
        num_layers=2,
        block_size=16,
        memory_segments=1,
        fam_length=fam_length,
        random_position_offset=True,
        state_passing_prob=0.8 if fam_length else 0.0,
    )
    return ExperimentConfig(
        model=model,
        data=data,
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=50, weight_decay=0.1, end_learning_rate_ratio=0.05),
        train=TrainConfig(num_steps=800, global_batch_size=32, log_every=50, eval_batches=8, output_dir=output_dir),
        checkpoint=CheckpointConfig(enabled=False),
    )
