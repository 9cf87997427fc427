"""configs/gram_sudoku_cpu.py trained with the paper's objective (``objective="paper"``): posterior-sampled
trajectories, the KL of every transition, TRM deep supervision with a trainer carry (one supervision step of
2 transitions per training step, up to 4 per puzzle, halting head with exploration 0.1) and halting at test
time (``scripts/gram_eval.py --halting``). Everything else (model, data, beta = 1, sigma caps, optimiser)
is the CPU config's, so the two runs differ only in the objective.

A training step here runs one supervision step where gram_sudoku_cpu.py runs four, so 12,000 steps match
its 3,000 in supervision steps (forward and backward passes):

    python scripts/gram_eval.py --config configs/gram_sudoku_cpu_paper.py --config.train.num_steps=12000 \
        --depths 1,2,4,8,16 --max_batches 4 --halting --name gram_eval_paper
"""

from pathlib import Path

from looped_jax.config import ExperimentConfig, apply_overrides, load_config


def get_config() -> ExperimentConfig:
    return apply_overrides(
        load_config(Path(__file__).with_name("gram_sudoku_cpu.py")),
        {
            "model.objective": "paper",
            "model.carry_posterior": True,
            "model.prior_ce_weight": 0.0,
            "model.halt_exploration_prob": 0.1,
            "train.num_steps": 12_000,
            "train.output_dir": "runs/gram_sudoku_cpu_paper",
        },
    )
