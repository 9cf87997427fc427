"""Fixed-depth transformer baseline for the chains task: same width and block design, no loop.

Parameters match ``recurrent_depth_chains`` (one shared core layer plus its 2d -> d adapter):
one layer whose SwiGLU is wider by the adapter's 2 d^2 / (3 d) = 43 units (mlp 192 -> 235).
The main job also trains this config with ``model.num_layers=4`` (four unshared layers, the
compute of four loops, about 2.4x the parameters).
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.looped import LoopedConfig


def get_config() -> ExperimentConfig:
    data = DataConfig(
        name="chains",
        seq_len=16,
        num_train=20_000,
        num_test=500,
        chains_order="topological",
        chains_dense_labels=True,
        chains_pair_tokens=True,
    )
    model = LoopedConfig(
        vocab_size=635,
        d_model=64,
        num_heads=2,
        num_kv_heads=2,
        head_dim=32,
        mlp_dim=235,
        num_layers=1,
        num_loops=1,
        share_weights=False,
        rope_theta=10_000.0,
    )
    return ExperimentConfig(
        model=model,
        data=data,
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=100, weight_decay=0.1, end_learning_rate_ratio=0.05),
        train=TrainConfig(
            num_steps=1500, global_batch_size=64, log_every=100, eval_batches=4, output_dir="runs/baseline_chains"
        ),
        checkpoint=CheckpointConfig(save_every=500, keep=2),
    )
