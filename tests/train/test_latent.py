"""Latent prediction (cfg.latent): masks, targets, losses, the teacher's EMA, the families' hidden states and
the trainer's integration (loss = family + weight * latent, teacher update, predictor kept out of evaluation)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.config import CheckpointConfig, ExperimentConfig, LatentConfig, OptimConfig, TrainConfig
from looped_jax.models import build_model
from looped_jax.models.looped import LoopedConfig
from looped_jax.models.recurrent_depth import RecurrentDepthConfig
from looped_jax.models.titans import TitansConfig
from looped_jax.train import latent as lat
from looped_jax.train.trainer import Trainer, model_params
from tests.train.tiny import single_device_mesh, tiny_chains_data

TINY = dict(vocab_size=35, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)


def test_span_mask_only_valid_positions_in_spans():
    valid = jnp.asarray(np.arange(200)[None, :] < np.array([[150], [200], [40], [0]]))
    mask = np.asarray(lat.span_mask(jax.random.key(0), valid, ratio=0.3, span=3))
    assert not (mask & ~np.asarray(valid)).any()
    assert not mask[3].any()
    # spans started near the end of the valid part are cut there (over many draws, some start there)
    many = jax.vmap(lambda k: lat.span_mask(k, valid, ratio=0.6, span=4))(jax.random.split(jax.random.key(5), 16))
    assert not (np.asarray(many) & ~np.asarray(valid)[None]).any()
    frac = mask[1].mean()
    assert 0.15 < frac < 0.4, frac
    # every masked run is at least one span long unless cut by the end of the valid part
    for row, n in zip(mask, (150, 200, 40, 0), strict=True):
        runs, cur = [], 0
        for i, m in enumerate(row[:n]):
            cur = cur + 1 if m else 0
            if cur and (i + 1 == n or not row[i + 1]):
                runs.append((cur, i + 1 == n))
        assert all(length >= 3 or at_end for length, at_end in runs), runs


def test_instance_norm_uses_valid_positions_only():
    x = jax.random.normal(jax.random.key(1), (2, 10, 4)) * 3 + 5
    valid = jnp.asarray(np.arange(10)[None, :] < np.array([[7], [10]]))
    y = np.asarray(lat.instance_norm(x, valid))
    for b, n in enumerate((7, 10)):
        np.testing.assert_allclose(y[b, :n].mean(0), 0.0, atol=1e-5)
        np.testing.assert_allclose(y[b, :n].var(0), 1.0, atol=1e-3)
    x2 = x.at[0, 7:].set(1e3)  # padding values never enter the statistics
    np.testing.assert_allclose(np.asarray(lat.instance_norm(x2, valid))[0, :7], y[0, :7], rtol=1e-6, atol=1e-6)


def test_teacher_targets_average_the_top_k_normalised_states():
    states = jax.random.normal(jax.random.key(2), (4, 2, 6, 3))
    valid = jnp.ones((2, 6), bool)
    got = np.asarray(lat.teacher_targets(states, valid, 2))
    want = (np.asarray(lat.instance_norm(states[2], valid)) + np.asarray(lat.instance_norm(states[3], valid))) / 2
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="latent.top_k=5"):
        lat.teacher_targets(states, valid, 5)


def test_regression_losses_by_hand():
    pred = jnp.array([[[0.0, 0.0], [3.0, 0.0], [1.0, 1.0]]])
    target = jnp.array([[[0.5, -0.5], [0.0, 0.0], [2.0, 2.0]]])
    mask = jnp.array([[True, True, False]])
    cfg = LatentConfig(loss="smooth_l1", beta=1.0)
    # token 0: |d| = 0.5, 0.5 -> 0.125 each, mean 0.125; token 1: |d| = 3, 0 -> (2.5 + 0) / 2 = 1.25
    np.testing.assert_allclose(float(lat.regression_loss(pred, target, mask, cfg)), (0.125 + 1.25) / 2, rtol=1e-6)
    cos = LatentConfig(loss="cosine")
    # token 0: orthogonal to... (0,0) has no direction -> cos 0; token 2 is masked out; use tokens 1, 2
    mask2 = jnp.array([[False, False, True]])
    np.testing.assert_allclose(float(lat.regression_loss(pred, target, mask2, cos)), 0.0, atol=1e-6)
    pred3 = jnp.array([[[1.0, 0.0]]])
    np.testing.assert_allclose(
        float(lat.regression_loss(pred3, jnp.array([[[0.0, 2.0]]]), jnp.ones((1, 1), bool), cos)), 1.0
    )
    np.testing.assert_allclose(
        float(lat.regression_loss(pred3, jnp.array([[[-2.0, 0.0]]]), jnp.ones((1, 1), bool), cos)), 2.0
    )


def test_tau_schedule():
    cfg = LatentConfig(tau_start=0.99, tau_end=0.999)
    np.testing.assert_allclose(float(lat.tau_at(jnp.int32(0), cfg, 100)), 0.99)
    np.testing.assert_allclose(float(lat.tau_at(jnp.int32(50), cfg, 100)), 0.9945, rtol=1e-6)
    np.testing.assert_allclose(float(lat.tau_at(jnp.int32(500), cfg, 100)), 0.999, rtol=1e-6)
    short = dataclasses.replace(cfg, tau_steps=10)
    np.testing.assert_allclose(float(lat.tau_at(jnp.int32(10), short, 100)), 0.999, rtol=1e-6)


@pytest.mark.parametrize(
    "cfg",
    [
        LoopedConfig(**TINY, num_layers=1, num_loops=3, share_weights=True),
        LoopedConfig(**TINY, num_layers=1, num_loops=3, share_weights=False),
        RecurrentDepthConfig(
            **TINY, num_prelude_layers=1, num_core_layers=1, num_coda_layers=1, mean_loops=3, grad_steps=2, eval_loops=3
        ),  # fmt: skip
    ],
    ids=["looped", "unshared", "recurrent_depth"],
)
def test_hidden_states_end_in_the_state_the_head_reads(cfg):
    model = build_model(cfg, rngs=nnx.Rngs(0))
    x = jax.random.randint(jax.random.key(3), (2, 12), 0, 35)
    states = model.hidden_states(x)
    assert states.shape == (3, 2, 12, 32)
    logits = model(x)
    if isinstance(cfg, LoopedConfig):
        via_states = model.head(states[-1])
    else:
        via_states = model._logits(states[-1], jnp.broadcast_to(jnp.arange(12), (2, 12)), None)
    np.testing.assert_allclose(np.asarray(via_states), np.asarray(logits), rtol=1e-5, atol=1e-5)
    # states differ step to step (a record of every loop, not the last one repeated)
    assert float(jnp.abs(states[0] - states[-1]).max()) > 1e-3


def _exp(data, out, *, model=None, latent=None, steps=2):
    return ExperimentConfig(
        model=model or LoopedConfig(**TINY, num_layers=1, num_loops=3, share_weights=True),
        data=data,
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=1),
        train=TrainConfig(num_steps=steps, global_batch_size=4, log_every=1, output_dir=str(out)),
        checkpoint=CheckpointConfig(enabled=False),
        latent=latent or LatentConfig(),
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_chains_data(str(tmp_path_factory.mktemp("tfds")))


def test_trainer_adds_the_latent_loss_and_moves_the_teacher(data, tmp_path):
    latent = LatentConfig(weight=0.5, tau_start=0.9, tau_end=0.99, top_k=2, mask_span=2)
    trainer = Trainer(_exp(data, tmp_path, latent=latent), mesh=single_device_mesh(), log=False)
    state0 = trainer.init_state()
    assert lat.LATENT_KEY in state0.params and lat.LATENT_KEY not in state0.teacher_params
    assert lat.LATENT_KEY not in state0.eval_params
    init = jax.tree.map(np.asarray, state0.params)
    batch = trainer.global_batch(next(trainer.make_train_iterator()))
    with jax.set_mesh(trainer.mesh):
        state1, metrics = trainer.train_step(state0, batch)
        teacher1 = jax.tree.map(np.asarray, state1.teacher_params)
        state2, _ = trainer.train_step(state1, batch)  # step 0 has learning rate 0 (warm-up)
    metrics = jax.device_get(metrics)
    np.testing.assert_allclose(metrics["loss"], metrics["family_loss"] + 0.5 * metrics["latent_loss"], rtol=1e-6)
    assert metrics["latent_loss"] > 0 and 0 < metrics["masked_fraction"] < 1
    # teacher <- tau * teacher + (1 - tau) * new params, tau linear from 0.9 (step 0) to 0.99 (step 2): 0.945 at step 1
    new = jax.tree.map(np.asarray, model_params(state2.params))
    want = jax.tree.map(lambda t, p: 0.945 * t + 0.055 * p, teacher1, new)
    got = state2.teacher_params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-7), got, want)
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), got, teacher1))) > 0
    # the predictor is trained
    moved = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - b).max()), state2.params[lat.LATENT_KEY], init[lat.LATENT_KEY]
    )
    assert min(jax.tree.leaves(moved)) > 0
    # evaluation runs on the model's parameters alone
    ev = trainer.evaluate(state2.params, "test_h2", num_batches=1)
    assert np.isfinite(ev["loss"])


def test_latent_off_is_the_plain_objective(data, tmp_path):
    plain = Trainer(_exp(data, tmp_path / "a"), mesh=single_device_mesh(), log=False)
    s = plain.init_state()
    assert s.teacher_params is None and lat.LATENT_KEY not in s.params
    batch = plain.global_batch(next(plain.make_train_iterator()))
    with jax.set_mesh(plain.mesh):
        _, m = plain.train_step(s, batch)
    assert "latent_loss" not in m


def test_latent_refused_for_a_family_without_hidden_states(data, tmp_path):
    model = TitansConfig(vocab_size=35, d_model=32, num_heads=4, head_dim=8, mlp_dim=64, num_layers=1)
    with pytest.raises(ValueError, match=r"latent.weight=1.0 needs a model that exposes hidden_states"):
        Trainer(
            _exp(data, tmp_path, model=model, latent=LatentConfig(weight=1.0)), mesh=single_device_mesh(), log=False
        )


def test_latent_config_errors_name_the_field():
    with pytest.raises(ValueError, match="latent.loss"):
        LatentConfig(loss="l2")
    with pytest.raises(ValueError, match="latent.mask_ratio"):
        LatentConfig(mask_ratio=1.5)


def test_latent_state_checkpoints_and_resumes(data, tmp_path):
    latent = LatentConfig(weight=1.0, top_k=2)
    cfg = dataclasses.replace(
        _exp(data, tmp_path, latent=latent, steps=4),
        checkpoint=CheckpointConfig(save_every=2, keep=2, async_save=False),
    )
    full, _ = Trainer(cfg, mesh=single_device_mesh(), log=False).fit()
    cfg2 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(tmp_path / "b")))
    Trainer(cfg2, mesh=single_device_mesh(), log=False).fit(stop_at=2)
    resumed, _ = Trainer(cfg2, mesh=single_device_mesh(), log=False).fit()
    for a, b in ((full.params, resumed.params), (full.teacher_params, resumed.teacher_params)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7), a, b)
