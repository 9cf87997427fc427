"""What the probe configs share (configs/probes/<family>.py): model width, vocabulary, optimiser and training.

Not a config itself (no ``get_config``); the family files load it with ``runpy.run_path``. The data is a
placeholder that scripts/probe_suite.py replaces per probe (copy rows of strings up to 16 symbols).
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig

# Every probe's data vocabulary fits (copy 29, phone book 30, multiplication 15, dp 26 with the script's
# settings), so the embedding -- and the parameter count -- is the same on every probe.
VOCAB_SIZE = 32
D_MODEL = 64
NUM_HEADS = 4
HEAD_DIM = 16


def experiment(model, output_dir: str) -> ExperimentConfig:
    """``model`` with the shared placeholder data, optimiser and training settings."""
    return ExperimentConfig(
        model=model,
        data=DataConfig(name="copy", seq_len=40, copy_train_max_len=16, num_train=20_000, num_test=200),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=50, weight_decay=0.1, end_learning_rate_ratio=0.05),
        train=TrainConfig(num_steps=1000, global_batch_size=32, log_every=100, eval_batches=4, output_dir=output_dir),
        checkpoint=CheckpointConfig(enabled=False),
    )
