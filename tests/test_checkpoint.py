import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from looped_jax.checkpoint import Checkpointer, CheckpointError, abstract_like

CONFIG = {"model": {"name": "toy", "width": 4}, "data": {"name": "chains"}, "train": {"num_steps": 10}}


def _state(seed):
    k = jax.random.key(seed)
    return {"step": jnp.int32(seed), "params": {"w": jax.random.normal(k, (4, 3)), "b": jnp.zeros(3)}}


def test_save_restore_roundtrip_with_data_state(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ck.save(step, _state(step), config=CONFIG, data_state={"pos": step * 10})
    ck.wait()
    assert ck.all_steps() == [2, 3]  # keep-N
    state, data_state, step = ck.restore(abstract_like(_state(0)), config=CONFIG)
    assert step == 3 and data_state == {"pos": 30}
    jax.tree.map(np.testing.assert_array_equal, state, _state(3))
    state2, _, _ = ck.restore(abstract_like(_state(0)), config=CONFIG, step=2)
    jax.tree.map(np.testing.assert_array_equal, state2, _state(2))
    ck.close()


def test_mismatched_config_is_refused_with_the_differing_field(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(1, _state(1), config=CONFIG)
    ck.wait()
    other = {**CONFIG, "model": {"name": "toy", "width": 8}}
    with pytest.raises(CheckpointError, match=r"model.width: checkpoint has 4, config has 8"):
        ck.restore(abstract_like(_state(0)), config=other)
    # Training-length changes are allowed on resume.
    ck.restore(abstract_like(_state(0)), config={**CONFIG, "train": {"num_steps": 99}})
    ck.close()


def test_shape_mismatch_and_missing_checkpoint_are_clear_errors(tmp_path):
    ck = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ck.restore(abstract_like(_state(0)), config=CONFIG)
    ck.save(1, _state(1), config=CONFIG)
    ck.wait()
    bad = {"step": jnp.int32(0), "params": {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}}
    with pytest.raises(CheckpointError, match="could not be restored"):
        ck.restore(abstract_like(bad), config=CONFIG)
    with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
        ck.restore(abstract_like(_state(0)), config=CONFIG, step=7)
    ck.close()


def test_corrupt_checkpoint_is_reported(tmp_path):
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(1, _state(1), config=CONFIG)
    ck.wait()
    for f in (tmp_path / "1").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="step 1"):
        ck.restore(abstract_like(_state(0)), config=CONFIG)
    ck.close()


def test_failed_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(1, _state(1), config=CONFIG)
    ck.wait()

    class Boom(RuntimeError):
        pass

    def explode(*args, **kwargs):
        raise Boom("disk full")

    # Fail while writing the array data of step 2.
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", explode)
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "save", explode, raising=False)
    with pytest.raises(Boom):
        ck.save(2, _state(2), config=CONFIG)
        ck.wait()
    monkeypatch.undo()
    ck2 = Checkpointer(tmp_path, async_save=False)
    assert ck2.latest_step() == 1
    state, _, step = ck2.restore(abstract_like(_state(0)), config=CONFIG)
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, state, _state(1))
    ck2.close()
