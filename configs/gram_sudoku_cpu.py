"""GRAM (Baek et al. 2026) on 4x4 Sudoku, CPU-sized: d_model 64, 3,000 steps (~7 minutes on 2 cores).

The 4x4 generator and sizes of the HRM / TRM CPU runs (3,000 training puzzles, here stored with 3 augmented
copies each rather than augmented on the fly; 500 test puzzles from symmetry classes never seen in
training). 300 steps on
6x6 solved no test puzzle; 3,000 steps on 4x4 solve 0.55 with one trajectory at depth 8 and 0.72 with
16 trajectories chosen by the reward head.

    python scripts/train.py --config configs/gram_sudoku_cpu.py
    python scripts/gram_eval.py --config configs/gram_sudoku_cpu.py   # accuracy vs N trajectories and depth

Deep supervision is unrolled inside the loss (4 steps x 2 transitions, gradient through the last transition
of each step); KL balancing alpha = 0.8, beta = 1 (see below).
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.gram import GramConfig


def get_config() -> ExperimentConfig:
    data = DataConfig(
        name="sudoku",
        seq_len=16,
        sudoku_size=4,
        num_train=3000,
        num_test=500,
        sudoku_num_aug=3,
        sudoku_hard_rating=0,
        seed=0,
    )
    model = GramConfig(
        vocab_size=6,
        seq_len=16,
        d_model=64,
        num_heads=4,
        head_dim=16,
        mlp_dim=128,
        num_layers_l=1,
        num_layers_h=1,
        l_cycles=2,
        num_transitions=2,
        supervision_steps=4,
        eval_transitions=8,
        # beta = 1 here, not the paper's 0.1: at 0.1 this tiny model's posterior carried the answer
        # (KL 6.8 nats/cell, posterior accuracy 1.0, prior 0.41 after 100 steps) and the core never learnt.
        beta=1.0,
        kl_balance=0.8,
        init_log_sigma=-2.3,  # noise std 0.1 at initialisation
        max_log_sigma=-1.2,  # noise std <= 0.3: uncapped, the prior std grew to 2.0 and swamped h (|h| ~ 1)
    )
    return ExperimentConfig(
        model=model,
        data=data,
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=50, weight_decay=0.1, end_learning_rate_ratio=0.1),
        train=TrainConfig(
            num_steps=3000,
            global_batch_size=64,
            log_every=250,
            eval_batches=4,
            output_dir="runs/gram_sudoku_cpu",
        ),
        checkpoint=CheckpointConfig(save_every=500, keep=2, async_save=False),
    )
