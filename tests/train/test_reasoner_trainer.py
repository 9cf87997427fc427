"""HRM / TRM through the shared Trainer: ACT carry kept across steps, AdamATan2 + sign-SGD from
``optim.name``, EMA weights for evaluation, checkpoint resume of the carry, evaluate() sums."""

import dataclasses

import jax
import numpy as np
import pytest

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig, prepare
from looped_jax.models.hrm import HRMConfig
from looped_jax.models.trm import TRMConfig
from looped_jax.train.trainer import Trainer


@pytest.fixture(scope="module")
def sudoku_data(tmp_path_factory):
    data = DataConfig(
        name="sudoku",
        data_dir=str(tmp_path_factory.mktemp("tfds")),
        sudoku_size=4,
        seq_len=16,
        num_train=64,
        num_test=16,
        sudoku_augment=True,
    )
    prepare(data)
    return data


def _cfg(data, out, model, *, steps=4, ema=0.0):
    return ExperimentConfig(
        model=model,
        data=data,
        optim=OptimConfig(
            name="adam_atan2",
            learning_rate=1e-3,
            warmup_steps=2,
            weight_decay=0.1,
            grad_clip=0.0,
            end_learning_rate_ratio=1.0,
            ema_decay=ema,
            puzzle_emb_learning_rate=1e-2,
        ),
        train=TrainConfig(num_steps=steps, global_batch_size=8, log_every=2, eval_batches=1, output_dir=str(out)),
        checkpoint=CheckpointConfig(save_every=2, keep=2, async_save=False),
    )


TINY_HRM = HRMConfig(
    vocab_size=6, seq_len=16, num_puzzle_ids=1, puzzle_emb_dim=32, d_model=32, num_heads=2, head_dim=16,
    mlp_dim=64, num_h_layers=1, num_l_layers=1, halt_max_steps=4,
)  # fmt: skip


def test_hrm_trains_in_the_trainer_and_resumes_its_carry(sudoku_data, tmp_path):
    cfg = _cfg(sudoku_data, tmp_path / "a", TINY_HRM)
    trainer = Trainer(cfg, log=False)
    assert trainer.stateful
    state, history = trainer.fit(eval_splits=("test",))
    assert int(state.step) == 4
    steps = np.asarray(jax.device_get(state.carry["steps"]))
    assert steps.shape == (8,) and steps.max() >= 1  # the ACT step counters advanced across optimizer steps
    assert np.isfinite(history["train"]["loss"])
    # evaluate() sums: token loss / accuracy plus whole-answer accuracy over the rows of one batch.
    ev = history["eval"]["test"]
    assert ev["num_rows"] == 8 and ev["exact_accuracy"] == ev["exact_sum"] / 8
    assert 0.0 <= ev["exact_accuracy"] <= 1.0
    assert np.isfinite(ev["loss"]) and 0.0 <= ev["accuracy"] <= 1.0
    # 2 steps + resume + 2 steps == 4 straight (carry, optimizer and data position restored).
    cfg_b = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(tmp_path / "b")))
    Trainer(cfg_b, log=False).fit(stop_at=2)
    resumed, _ = Trainer(cfg_b, log=False).fit()
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(state.carry), jax.tree.leaves(resumed.carry), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_trm_keeps_an_ema_for_evaluation(sudoku_data, tmp_path):
    model = TRMConfig(
        vocab_size=6, seq_len=16, num_puzzle_ids=1, puzzle_emb_dim=0, puzzle_emb_len=2, d_model=32, num_heads=2,
        head_dim=16, mlp_dim=64, latent_steps=2, recursions=2, halt_max_steps=3,
    )  # fmt: skip
    state, _ = Trainer(_cfg(sudoku_data, tmp_path, model, steps=3, ema=0.9), log=False).fit()
    ema, params = jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params)
    assert any(not np.allclose(np.asarray(e), np.asarray(p)) for e, p in zip(ema, params, strict=True))
    assert state.eval_params is state.ema_params
