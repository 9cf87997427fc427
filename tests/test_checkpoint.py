import errno
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from looped_jax.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointSaveError,
    ConfigMismatchError,
    abstract_like,
    map_data_state,
)

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


@pytest.mark.parametrize("async_save", [False, True])
def test_failed_save_raises_at_once_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, async_save):
    ck = Checkpointer(tmp_path, async_save=async_save)
    ck.save(1, _state(1), config=CONFIG)
    ck.wait()

    async def explode(*args, **kwargs):  # async, so the other items' coroutines are awaited too
        raise OSError(errno.ENOSPC, "No space left on device")

    # Fail while writing the array data of step 2: the save itself raises one clear line.
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", explode)
    with pytest.raises(CheckpointSaveError, match=rf"save of step 2 into {tmp_path} failed: no space left on device"):
        ck.save(2, _state(2), config=CONFIG)
    monkeypatch.undo()
    ck.close()
    ck2 = Checkpointer(tmp_path, async_save=False)
    assert ck2.latest_step() == 1
    state, _, step = ck2.restore(abstract_like(_state(0)), config=CONFIG)
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, state, _state(1))
    ck2.close()


def _truncate_arrays(step_dir):
    """Empties every array data file of a step (a crash / disk-full mid-write)."""
    n = 0
    for f in step_dir.rglob("*"):
        if f.is_file() and "state" in f.parts and "ocdbt" in str(f) or (f.is_file() and f.parent.name == "d"):
            f.write_bytes(b"")
            n += 1
    assert n, f"no array files found under {step_dir}"


@pytest.mark.parametrize("damage", ["truncate", "empty_dir", "delete_meta"])
def test_resume_falls_back_past_a_damaged_newest_step(tmp_path, damage):
    ck = Checkpointer(tmp_path, keep=3, async_save=False)
    for step in (1, 2):
        ck.save(step, _state(step), config=CONFIG, data_state={"next_index": step})
    ck.close()
    newest = tmp_path / "2"
    if damage == "truncate":
        _truncate_arrays(newest)
    elif damage == "empty_dir":
        shutil.rmtree(newest)
        newest.mkdir()
    else:
        shutil.rmtree(newest / "meta")
    logs = []
    ck2 = Checkpointer(tmp_path, log=logs.append)
    state, data_state, step = ck2.restore(abstract_like(_state(0)), config=CONFIG)
    assert step == 1 and data_state == {"next_index": 1}
    jax.tree.map(np.testing.assert_array_equal, state, _state(1))
    assert any(line.startswith("[checkpoint] skipping step 2:") for line in logs), logs
    # The damaged step is moved aside, so the run can save step 2 again.
    assert ck2.all_steps() == [1] and (tmp_path / "corrupt_step_2").is_dir()
    ck2.save(2, _state(2), config=CONFIG)
    ck2.close()


def test_nonfinite_state_is_never_saved_and_never_restored(tmp_path):
    ck = Checkpointer(tmp_path, async_save=False)
    bad = _state(1)
    bad["params"]["w"] = bad["params"]["w"].at[0, 0].set(jnp.nan)
    with pytest.raises(CheckpointSaveError, match="refusing to save step 1.*not finite"):
        ck.save(1, bad, config=CONFIG)
    assert ck.all_steps() == []
    ck.close()


def test_partial_step_directories_are_removed_at_start(tmp_path):
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(1, _state(1), config=CONFIG)
    ck.close()
    (tmp_path / "2.orbax-checkpoint-tmp-1234").mkdir()
    (tmp_path / "2.orbax-checkpoint-tmp-1234" / "x").write_text("partial")
    logs = []
    ck2 = Checkpointer(tmp_path, log=logs.append)
    assert not (tmp_path / "2.orbax-checkpoint-tmp-1234").exists()
    assert ck2.removed_partial == ["2.orbax-checkpoint-tmp-1234"] and "removed 1 partial" in logs[0]
    assert ck2.all_steps() == [1]
    ck2.close()


def test_checkpoint_path_that_is_a_file_fails_at_once(tmp_path):
    f = tmp_path / "ckpt"
    f.write_text("not a dir")
    with pytest.raises(CheckpointSaveError, match=rf"checkpoint directory {f} is not a directory"):
        Checkpointer(f)
    with pytest.raises(CheckpointSaveError, match=r"its parent .*ckpt is a file"):
        Checkpointer(f / "sub")


def test_batch_size_is_checked_but_data_dir_is_not(tmp_path):
    cfg = {**CONFIG, "data": {"name": "chains", "data_dir": "/a"}, "train": {"global_batch_size": 8}}
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(1, _state(1), config=cfg, data_state={"next_index": 3})
    moved = {**cfg, "data": {"name": "chains", "data_dir": "/b"}}
    _, _, step = ck.restore(abstract_like(_state(0)), config=moved)  # the cache moved: fine
    assert step == 1
    bigger = {**cfg, "train": {"global_batch_size": 12}}
    with pytest.raises(
        ConfigMismatchError, match=r"(?s)global_batch_size: checkpoint has 8, config has 12.*allow_batch"
    ):
        ck.restore(abstract_like(_state(0)), config=bigger)
    # 3 batches of 8 = 24 rows = 2 batches of 12.
    _, data_state, _ = ck.restore(abstract_like(_state(0)), config=bigger, allow_batch_change=True)
    assert data_state == {"next_index": 2}
    with pytest.raises(CheckpointError, match="consumed 24 rows, not a multiple"):
        ck.restore(
            abstract_like(_state(0)), config={**cfg, "train": {"global_batch_size": 16}}, allow_batch_change=True
        )
    ck.close()
    assert map_data_state({"next_index": 5}, 4, 4) == {"next_index": 5}


def test_each_process_restores_its_own_data_state(monkeypatch):
    """Hosts read different shards; the checkpoint keeps every host's iterator state and each gets its own."""
    import looped_jax.checkpoint as ck

    meta = {"data_state": {"pos": 0}, "data_states": [{"pos": 0}, {"pos": 17}, {"pos": 5}]}
    monkeypatch.setattr(ck.jax, "process_count", lambda: 3)
    for index, want in enumerate(meta["data_states"]):
        monkeypatch.setattr(ck.jax, "process_index", lambda index=index: index)
        assert ck.own_data_state(meta) == want
    monkeypatch.setattr(ck.jax, "process_count", lambda: 2)  # another host count: the shared state
    assert ck.own_data_state(meta) == {"pos": 0}
    assert ck.own_data_state({"data_state": {"pos": 3}}) == {"pos": 3}  # a checkpoint from before


def test_saved_meta_holds_every_process_data_state(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    state = {"w": np.ones((2,), np.float32)}
    ckpt.save(1, state, config={}, data_state={"next_index": 4})
    ckpt.wait()
    assert ckpt.read_meta(1)["data_states"] == [{"next_index": 4}]
    ckpt.close()


def test_partial_step_removal_retries_while_a_late_writer_finishes(tmp_path, monkeypatch):
    """A failed async save can leave a thread finishing a file in the partial step directory; the clean-up
    of the next Checkpointer retries the removal instead of failing with 'Directory not empty'."""
    partial = tmp_path / "2.orbax-checkpoint-tmp"
    partial.mkdir()
    (partial / "meta").write_text("{}")
    real = type(epath.Path(partial)).rmtree
    calls = []

    def flaky_rmtree(self, *args, **kwargs):
        calls.append(str(self))
        if len(calls) == 1:  # a late write lands during the first removal
            raise OSError(errno.ENOTEMPTY, "Directory not empty", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(epath.Path(partial)), "rmtree", flaky_rmtree)
    ck = Checkpointer(tmp_path, async_save=False)
    assert not partial.exists() and len(calls) == 2
    ck.close()
