"""train.init_params_from: a fresh run starts from a params-only export (retrofit, fine-tuning)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from looped_jax.config import ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.export.params import params_of, save_params_safetensors
from looped_jax.models import build_model
from looped_jax.models.recurrent_depth import RecurrentDepthConfig
from looped_jax.train.trainer import Trainer
from tests.train.tiny import single_device_mesh, tiny_chains_data

MODEL = RecurrentDepthConfig(
    vocab_size=35, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
    num_prelude_layers=1, num_core_layers=1, num_coda_layers=1, mean_loops=3, grad_steps=2,
)  # fmt: skip


def _cfg(data, out, model=MODEL, init=""):
    return ExperimentConfig(
        model=model,
        data=data,
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=1),
        train=TrainConfig(num_steps=2, global_batch_size=8, output_dir=str(out), init_params_from=init),
    )


def test_fresh_run_starts_from_the_exported_params_and_refuses_another_model(tmp_path):
    data = tiny_chains_data(str(tmp_path / "tfds"))
    saved = params_of(build_model(MODEL, rngs=nnx.Rngs(7)))
    save_params_safetensors(tmp_path / "init", MODEL, saved)

    state = Trainer(_cfg(data, tmp_path / "a", init=str(tmp_path / "init")), mesh=single_device_mesh()).init_state()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(saved))
    seeded = Trainer(_cfg(data, tmp_path / "b"), mesh=single_device_mesh()).init_state()
    assert not np.array_equal(seeded.params["embed"]["table_VD"], state.params["embed"]["table_VD"])

    other = dataclasses.replace(MODEL, mlp_dim=96)
    with pytest.raises(
        ValueError, match=r"init_params_from=.* another model: model.mlp_dim: export has 64, config has 96"
    ):
        Trainer(_cfg(data, tmp_path / "c", model=other, init=str(tmp_path / "init")), mesh=single_device_mesh()).fit()
