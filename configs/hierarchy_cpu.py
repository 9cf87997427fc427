"""Next-token prediction on random-hierarchy-model sentences (``data.name="hierarchy"``), a 4-layer
transformer of width 64 (the unshared ``looped`` baseline: one layer per body, 4 bodies), the
latent-prediction objective off. ``scripts/latent_efficiency.py`` sweeps the grammar depth, the number
of training sentences and ``latent.weight`` from here:

    python scripts/latent_efficiency.py --name latent_efficiency

Grammar: v = 16 symbols per level, m = 8 productions per symbol, branching s = 2, depth L = 3
(8 leaves; rows of 16 fit L <= 4). The theory's sample scale for learning level-l symbols is about
v * m^l sentences (Cagnetta et al. 2024).
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, LatentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.looped import LoopedConfig


def get_config() -> ExperimentConfig:
    model = LoopedConfig(
        vocab_size=18,
        d_model=64,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        mlp_dim=192,
        num_layers=1,
        num_loops=4,
        share_weights=False,
    )
    return ExperimentConfig(
        model=model,
        data=DataConfig(
            name="hierarchy",
            seq_len=16,
            grammar_depth=3,
            grammar_vocab=16,
            grammar_rules=8,
            grammar_branching=2,
            num_train=4096,
            num_test=1000,
        ),
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=50, end_learning_rate_ratio=0.1, weight_decay=0.1, b2=0.95),
        train=TrainConfig(
            num_steps=1000, global_batch_size=64, log_every=100, eval_batches=8, output_dir="runs/hierarchy_cpu"
        ),  # fmt: skip
        checkpoint=CheckpointConfig(enabled=False),
        latent=LatentConfig(weight=0.0, mask_ratio=0.3, mask_span=2, top_k=2),
    )
