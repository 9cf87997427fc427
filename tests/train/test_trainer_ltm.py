"""Trainer with a latent-thought model: evaluation reports the ELBO (NLL + KL), not the plain
cross-entropy of the logits, with the inner loop run on the evaluated rows at ``inner_steps``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import make_pipeline, vocab_size
from looped_jax.models.latent_thought import LatentThoughtConfig
from looped_jax.train.trainer import Trainer
from tests.train.tiny import single_device_mesh, tiny_chains_data

EVAL_BATCH = 8
EVAL_BATCHES = 2


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    data = tiny_chains_data(str(tmp_path_factory.mktemp("tfds")))
    model = LatentThoughtConfig(
        vocab_size=vocab_size(data),
        d_model=32,
        num_heads=2,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=64,
        num_layers=1,
        num_latents=2,
        window=8,
        latent_span=40,
        inner_steps=3,
    )
    cfg = ExperimentConfig(
        model=model,
        data=data,
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=1),
        train=TrainConfig(num_steps=1, global_batch_size=EVAL_BATCH, output_dir=str(tmp_path_factory.mktemp("out"))),
        checkpoint=CheckpointConfig(enabled=False),
    )
    mesh = single_device_mesh()
    return Trainer(cfg, mesh=mesh, log=False)


def test_evaluate_reports_the_elbo(trainer):
    """Trainer.evaluate == sum over batches of model.elbo(batch, inner_steps, key 0) computed directly."""
    state = trainer.init_state()
    params = jax.device_get(state.params)
    got = trainer.evaluate(state.params, "test_h2", num_batches=EVAL_BATCHES)

    cfg = trainer.cfg
    it = make_pipeline(cfg.data, split="test_h2", global_batch_size=EVAL_BATCH, seed=0, shuffle=False, num_epochs=1)

    @jax.jit
    def direct(params, batch):
        model = nnx.merge(trainer.graphdef, params)
        return model.elbo(batch, cfg.model.inner_steps, jax.random.key(0))

    sums = dict(nll=0.0, kl=0.0, correct=0.0, num_tokens=0.0)
    for _, batch in zip(range(EVAL_BATCHES), it, strict=False):
        elbo = direct(params, {k: jnp.asarray(v) for k, v in batch.items()})
        sums["nll"] += float(elbo["nll_sum"])
        sums["kl"] += float(elbo["kl_sum"])
        sums["correct"] += float(elbo["correct"])
        sums["num_tokens"] += float(elbo["num_tokens"])
    n = sums["num_tokens"]
    assert n > 0 and got["num_tokens"] == n
    assert sums["kl"] / n > 1.0  # large: a loss without the KL (the logits' cross-entropy) cannot pass
    np.testing.assert_allclose(got["loss"], (sums["nll"] + sums["kl"]) / n, rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], sums["correct"] / n, rtol=1e-6)
