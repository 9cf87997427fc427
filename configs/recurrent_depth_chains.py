"""Tiny recurrent-depth model on the variable-chains task (the README's main job, CPU minutes).

Trained on 1-4 hop problems (topological order, one token per assignment, every assignment
supervised) with loop counts
sampled around mean_loops; evaluated on the query answer of 1-8 hop problems
with 1..64 loops to show test-time depth scaling.

All the depth is in the loop: no prelude or coda layers (s_i = Core(Adapter([s_{i-1}; E(x)])),
logits = Head(norm(s_r))). With one prelude and one coda layer (the Huginn layout) the two
unshared layers learn to resolve 1-2 hop chains on their own within the 1500 steps, the core
settles on a near-identity and accuracy stays flat in the loop count (3-8 hops ~0.55-0.79 at
every r from 1 to 32). Two heads of width 32 rather than four of 16: a lookup matches one
variable among 20 in a single head, and the wider heads train the match in fewer steps.
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.recurrent_depth import RecurrentDepthConfig


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
    model = RecurrentDepthConfig(
        vocab_size=635,
        d_model=64,
        num_heads=2,
        num_kv_heads=2,
        head_dim=32,
        mlp_dim=192,
        num_prelude_layers=0,
        num_core_layers=1,
        num_coda_layers=0,
        mean_loops=6,
        grad_steps=4,
        max_train_loops=32,
        eval_loops=6,
        rope_theta=10_000.0,
    )
    return ExperimentConfig(
        model=model,
        data=data,
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=100, weight_decay=0.1, end_learning_rate_ratio=0.05),
        train=TrainConfig(
            num_steps=1500,
            global_batch_size=64,
            log_every=100,
            eval_batches=4,
            output_dir="runs/recurrent_depth_chains",
        ),
        checkpoint=CheckpointConfig(save_every=500, keep=2),
    )
