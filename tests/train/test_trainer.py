"""Trainer: exact resume, sharded steps equal single-device steps, config edges, TPU AOT compile."""

import dataclasses
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from looped_jax.config import CheckpointConfig, ExperimentConfig, MeshConfig, OptimConfig, TrainConfig, load_config
from looped_jax.data import DataConfig, prepare
from looped_jax.models.looped import LoopedConfig
from looped_jax.models.recurrent_depth import RecurrentDepthConfig
from looped_jax.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    cfg = DataConfig(
        name="chains",
        data_dir=str(tmp_path_factory.mktemp("tfds")),
        seq_len=40,
        num_train=256,
        num_test=32,
        test_hops=(2, 6),
    )
    prepare(cfg)
    return cfg


def _rd_model(**kw):
    base = dict(
        vocab_size=35,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=64,
        num_prelude_layers=1,
        num_core_layers=1,
        num_coda_layers=1,
        mean_loops=4,
        grad_steps=2,
    )
    return RecurrentDepthConfig(**{**base, **kw})


def _cfg(data_cfg, out, *, model=None, mesh=None, steps=6, save_every=3, batch=8):
    return ExperimentConfig(
        model=model or _rd_model(),
        data=data_cfg,
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
        train=TrainConfig(num_steps=steps, global_batch_size=batch, log_every=2, output_dir=str(out)),
        mesh=mesh or MeshConfig(),
        checkpoint=CheckpointConfig(save_every=save_every, keep=2, async_save=True),
    )


def _params(state):
    return jax.tree.map(np.asarray, jax.device_get(state.params))


@pytest.mark.slow  # run by .ci/run after the default suite
def test_resume_continues_exactly(data_cfg, tmp_path):
    devices = jax.devices()[:1]
    mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    straight, _ = Trainer(_cfg(data_cfg, tmp_path / "a"), mesh=mesh, log=False).fit()
    Trainer(_cfg(data_cfg, tmp_path / "b"), mesh=mesh, log=False).fit(stop_at=3)
    resumed_trainer = Trainer(_cfg(data_cfg, tmp_path / "b"), mesh=mesh, log=False)
    resumed, _ = resumed_trainer.fit()
    assert int(resumed.step) == int(straight.step) == 6
    jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(straight))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.opt_state), jax.device_get(straight.opt_state))


def test_resume_refuses_a_different_model(data_cfg, tmp_path):
    devices = jax.devices()[:1]
    mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    Trainer(_cfg(data_cfg, tmp_path, steps=2, save_every=0), mesh=mesh, log=False).fit()
    other = _cfg(data_cfg, tmp_path, steps=4, model=_rd_model(d_model=48, head_dim=12))
    with pytest.raises(Exception, match=r"model.d_model: checkpoint has 32, config has 48"):
        Trainer(other, mesh=mesh, log=False).fit()


@pytest.mark.parametrize(
    "mesh_cfg",
    [
        MeshConfig(data=8),
        MeshConfig(data=1, fsdp=8),
        MeshConfig(data=4, tensor=2),
        MeshConfig(data=2, fsdp=2, tensor=2),
    ],
    ids=["dp8", "fsdp8", "dp4_tp2", "dp2_fsdp2_tp2"],
)
@pytest.mark.parametrize("family", ["recurrent_depth", "looped"])
def test_sharded_step_matches_single_device(data_cfg, tmp_path, mesh_cfg, family):
    model = (
        _rd_model()
        if family == "recurrent_depth"
        else LoopedConfig(
            vocab_size=35, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, num_layers=2, num_loops=2
        )
    )
    single_mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    single = Trainer(_cfg(data_cfg, tmp_path / "s", model=model, batch=8), mesh=single_mesh, log=False)
    sharded = Trainer(_cfg(data_cfg, tmp_path / "m", model=model, mesh=mesh_cfg, batch=8), log=False)
    assert sharded.mesh.devices.size == 8
    batch = next(single.make_train_iterator())
    s0, s1 = single.init_state(), sharded.init_state()
    jax.tree.map(np.testing.assert_array_equal, _params(s0), _params(s1))
    with jax.set_mesh(single.mesh):
        s0, m0 = single.train_step(s0, single.global_batch(batch))
    with jax.set_mesh(sharded.mesh):
        s1, m1 = sharded.train_step(s1, sharded.global_batch(batch))
    # The same rng stream (fold_in of the step) gives the same sampled loop count everywhere.
    np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m0["grad_norm"]), rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), _params(s1), _params(s0))
    if mesh_cfg.tensor > 1 or mesh_cfg.fsdp > 1:
        specs = [s.spec for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, s1.params))]
        assert any(any(ax is not None for ax in spec) for spec in specs), "no parameter was sharded"


def test_vocab_smaller_than_data_is_an_error(data_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"model.vocab_size=10.*35"):
        Trainer(_cfg(data_cfg, tmp_path, model=_rd_model(vocab_size=10)), log=False)


def test_batch_not_divisible_by_data_parallel_size(data_cfg, tmp_path):
    with pytest.raises(ValueError, match="global_batch_size=6"):
        Trainer(_cfg(data_cfg, tmp_path, mesh=MeshConfig(data=8), batch=6), log=False)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert dataclasses.is_dataclass(cfg.model) and dataclasses.is_dataclass(cfg.data)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install '.[tpu]')")
def test_aot_compile_for_tpu_topology(data_cfg, tmp_path):
    from looped_jax.aot import compile_train_step, topology_devices

    cfg = _cfg(data_cfg, tmp_path, mesh=MeshConfig(data=2, fsdp=2), batch=8)
    stats = compile_train_step(cfg, topology_devices("v5e:2x2"))
    assert stats["devices"] == 4 and stats["platform"] == "tpu"
    assert stats["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert 0 < stats["peak_gib_per_chip"] < 1 and stats["fits"]


@pytest.mark.slow  # run by .ci/run after the default suite
def test_max_minutes_stops_early_and_records_the_step(data_cfg, tmp_path):
    """A wall-clock budget shorter than one step stops after the first step, checkpointed there."""
    from looped_jax.checkpoint import Checkpointer

    devices = jax.devices()[:1]
    mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    cfg = _cfg(data_cfg, tmp_path, steps=20, save_every=0)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_minutes=1e-6))
    state, history = Trainer(cfg, mesh=mesh, log=False).fit()
    assert int(state.step) == 1 and history["steps"] == 1
    assert history["stopped_by"] == "max_minutes"
    assert history["train"] is not None and np.isfinite(history["train"]["loss"])
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    assert ckpt.latest_step() == 1
    ckpt.close()
    # Without a budget the same config runs to train.num_steps (resuming from the step-1 checkpoint).
    full = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_minutes=0.0, num_steps=3))
    state, history = Trainer(full, mesh=mesh, log=False).fit()
    assert history["steps"] == 3 and history["stopped_by"] is None
