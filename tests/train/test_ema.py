"""The trainer's parameter EMA (optim.ema_decay > 0): ema_t = decay * ema_{t-1} + (1 - decay) * params_t,
started from the initial parameters, and used for evaluation."""

import jax
import numpy as np
import pytest

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import vocab_size
from looped_jax.models.looped import LoopedConfig
from looped_jax.train.trainer import Trainer
from tests.train.tiny import single_device_mesh, tiny_chains_data

DECAY = 0.75  # far from 0 and 1, so a swapped or missing term shows


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    data = tiny_chains_data(str(tmp_path_factory.mktemp("tfds")))
    model = LoopedConfig(
        vocab_size=vocab_size(data), d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32, num_layers=1,
        num_loops=2,
    )  # fmt: skip
    cfg = ExperimentConfig(
        model=model,
        data=data,
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, ema_decay=DECAY),
        train=TrainConfig(num_steps=2, global_batch_size=8, output_dir=str(tmp_path_factory.mktemp("out"))),
        checkpoint=CheckpointConfig(enabled=False),
    )
    mesh = single_device_mesh()
    return Trainer(cfg, mesh=mesh, log=False)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_ema_update_formula(trainer):
    state = trainer.init_state()
    params0, ema0 = _host(state.params), _host(state.ema_params)
    jax.tree.map(np.testing.assert_array_equal, ema0, params0)  # the EMA starts at the initial weights
    it = trainer.make_train_iterator()
    emas, params = [ema0], [params0]
    with jax.set_mesh(trainer.mesh):
        for _ in range(2):
            state, _ = trainer.train_step(state, trainer.global_batch(next(it)))  # donates the old state
            emas.append(_host(state.ema_params))
            params.append(_host(state.params))
    for t in (1, 2):
        moved = max(
            float(np.abs(a - b).max())
            for a, b in zip(jax.tree.leaves(params[t]), jax.tree.leaves(params[t - 1]), strict=True)
        )
        assert moved > 1e-4  # the optimizer step changed the weights, so the EMA lags them
        expected = jax.tree.map(lambda e, p: DECAY * e + (1.0 - DECAY) * p, emas[t - 1], params[t])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), emas[t], expected)
    assert state.eval_params is state.ema_params
