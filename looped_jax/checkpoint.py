"""Orbax checkpoints: async save every N steps, keep-N, exact resume, config checks, fallback.

A checkpoint holds the train state (step, parameters, optimizer state) and a JSON item with
the experiment config and the data iterator's state, so a resumed run continues at the exact
step and data position. Orbax writes each step into a temporary directory and renames it
only once complete, so a save that fails leaves the last good checkpoint untouched; a partial
directory is never listed as a step, and the ones a crash leaves behind are removed when a
``Checkpointer`` opens the directory.

Paths go through ``etils.epath`` end to end, so ``gs://bucket/run`` (or any URL epath knows)
keeps its form. On restore, a step that cannot be read or verified (truncated files, non-finite
parameters) is skipped with a message saying why, and the next older step is tried; a step
written with a different model/data config is an error, never skipped.
"""

from __future__ import annotations

import errno
import json
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from looped_jax.config import diff_configs

# Config sections that must match between a checkpoint and the run that restores it. Training
# length, logging and the optimiser may change on resume; the architecture and data may not.
CHECKED_SECTIONS = ("model", "data")
# Fields of the checked sections that say where things live, not what they are.
LOCATION_FIELDS = ("data.data_dir",)
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Causes of a failed save, by errno, for the one-line message.
_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a path component is a file, not a directory",
    errno.EEXIST: "a file is in the way",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the current config."""


class CheckpointSaveError(CheckpointError):
    """A save failed (no space, not a directory, permission, non-finite state)."""


def as_path(path: str | epath.PathLike) -> epath.Path:
    """``path`` as an epath.Path: URLs (gs://...) keep their form, local paths are expanded."""
    p = epath.Path(path)
    if "://" in str(path):
        return p
    return epath.Path(p.expanduser().absolute())


def is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


def _cause(e: BaseException) -> str:
    while e is not None:
        if isinstance(e, OSError) and e.errno in _CAUSES:
            return f"{_CAUSES[e.errno]} ({type(e).__name__}: {e.strerror or e})"
        if isinstance(e, CheckpointError):
            return str(e)
        nxt = e.__cause__ or e.__context__
        if nxt is None:
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        e = nxt
    return "unknown error"


def state_nbytes(state: Any) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype"))


def all_finite(state: Any) -> bool:
    """True when every floating leaf of ``state`` is finite (one fused reduction per leaf)."""
    leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return True
    return bool(jax.device_get(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))))


class Checkpointer:
    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        keep: int = 3,
        save_every: int = 0,
        async_save: bool = True,
        log=print,
    ):
        self.directory = as_path(directory)
        self.save_every = save_every
        self.log = log
        self._check_directory()
        self.removed_partial = self._clean_partial()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:
            raise CheckpointSaveError(f"cannot open checkpoint directory {self.directory}: {_cause(e)}") from e

    # -- directory checks ------------------------------------------------------------------------

    def _check_directory(self) -> None:
        d = self.directory
        for parent in [d, *d.parents]:
            if parent.exists():
                if not parent.is_dir():
                    where = "" if parent == d else f" (its parent {parent} is a file)"
                    raise CheckpointSaveError(
                        f"checkpoint directory {d} is not a directory{where}: a file is in the way"
                    )
                break
        if is_local(d):
            try:
                d.mkdir(parents=True, exist_ok=True)
                probe = d / ".write_probe"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                raise CheckpointSaveError(f"checkpoint directory {d} is not writable: {_cause(e)}") from e

    def _clean_partial(self) -> list[str]:
        """Removes temporary step directories a crashed save left behind (process 0 only)."""
        if jax.process_index() != 0 or not self.directory.exists():
            return []
        removed = []
        for child in self.directory.iterdir():
            if TMP_SUFFIX in child.name:
                _remove_tree(child)
                removed.append(child.name)
        if removed:
            noun = "directory" if len(removed) == 1 else "directories"
            self.log(f"[checkpoint] removed {len(removed)} partial step {noun}: {sorted(removed)}")
        return removed

    # -- queries ---------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    # -- save --------------------------------------------------------------------------------------

    def check_for_errors(self) -> None:
        """Raises a one-line CheckpointSaveError if an earlier async save failed."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise CheckpointSaveError(f"checkpoint save into {self.directory} failed: {_cause(e)}") from e

    def save(self, step: int, state: Any, *, config: dict, data_state: dict | None = None) -> None:
        """Starts an (async) save of ``state``; call ``wait()`` before reading it back.

        Raises CheckpointSaveError (path and cause on one line) when an earlier async save failed,
        the disk cannot hold the state, ``state`` has non-finite parameters, or the write fails.
        """
        self.check_for_errors()
        if not all_finite(state):
            raise CheckpointSaveError(f"refusing to save step {step} into {self.directory}: the state is not finite")
        if is_local(self.directory):
            free = shutil.disk_usage(str(self.directory)).free
            need = state_nbytes(state)
            if free < need:
                raise CheckpointSaveError(
                    f"checkpoint save of step {step} into {self.directory} failed: no space left on device "
                    f"({free / 2**20:.1f} MiB free, the state needs {need / 2**20:.1f} MiB)"
                )
        # Every process's own data-iterator position (hosts read different shards, so their states
        # differ for packed text); process 0's JSON item holds them all, each restores its own.
        meta = {"step": int(step), "config": config, "data_state": data_state, "data_states": gather_json(data_state)}
        try:
            self.manager.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
        except Exception as e:
            raise CheckpointSaveError(
                f"checkpoint save of step {step} into {self.directory} failed: {_cause(e)}"
            ) from e

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointSaveError(f"checkpoint save into {self.directory} failed: {_cause(e)}") from e

    def delete_all(self) -> list[int]:
        """Deletes every step (``train.overwrite=true``); returns the steps deleted."""
        steps = self.all_steps()
        for step in steps:
            self.manager.delete(step)
        return steps

    # -- restore ---------------------------------------------------------------------------------

    def read_meta(self, step: int) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises a variety of errors for damaged directories
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable: {_first_line(e)}") from e

    def restore(
        self,
        abstract_state: Any,
        *,
        config: dict,
        step: int | None = None,
        allow_batch_change: bool = False,
    ) -> tuple[Any, dict | None, int]:
        """Restores (state, data_state, step). ``abstract_state`` gives shapes, dtypes and shardings.

        With ``step=None`` the newest step that restores and verifies is used; steps skipped on the
        way are reported (and moved aside to ``corrupt_step_<n>`` so they are not saved over).
        Refuses a checkpoint whose model or data config (or batch size) differs from ``config``.
        """
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {steps}")
            return self._restore_one(abstract_state, config, step, allow_batch_change)
        skipped = []
        for candidate in reversed(steps):
            try:
                out = self._restore_one(abstract_state, config, candidate, allow_batch_change)
            except ConfigMismatchError:
                raise
            except CheckpointError as e:
                self.log(f"[checkpoint] skipping step {candidate}: {e}")
                skipped.append((candidate, str(e)))
                continue
            self._move_aside([s for s, _ in skipped])
            return out
        raise CheckpointError(
            f"no checkpoint in {self.directory} restores: " + "; ".join(f"step {s}: {why}" for s, why in skipped)
        )

    def _restore_one(self, abstract_state, config, step, allow_batch_change):
        meta = self.read_meta(step)
        check_config(
            meta.get("config", {}), config, where=f"{self.directory} step {step}", allow_batch_change=allow_batch_change
        )
        if meta.get("step", step) != step:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} says it is step {meta.get('step')}")
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )["state"]
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} could not be restored into the current train state "
                f"(corrupt files or different parameter shapes): {_first_line(e)}"
            ) from e
        if not all_finite(restored):
            raise CheckpointError(f"checkpoint step {step} in {self.directory} has non-finite parameters")
        data_state = own_data_state(meta)
        if allow_batch_change:
            old = meta.get("config", {}).get("train", {}).get("global_batch_size")
            new = config.get("train", {}).get("global_batch_size")
            if old is not None and new is not None:
                data_state = map_data_state(data_state, old, new)
        return restored, data_state, step

    def _move_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            for s in steps:
                src = self.directory / str(s)
                if src.exists():
                    src.rename(self.directory / f"corrupt_step_{s}")
            self.log(f"[checkpoint] moved unrestorable steps {steps} to corrupt_step_<n> in {self.directory}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("looped_jax_checkpoint_move_aside")
        self.manager.reload()

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()


class ConfigMismatchError(CheckpointError):
    """The checkpoint was written with a different model/data config (never skipped on restore)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def check_config(saved: dict, current: dict, *, where: str, allow_batch_change: bool = False) -> None:
    diffs = []
    for section in CHECKED_SECTIONS:
        diffs += diff_configs(saved.get(section, {}), current.get(section, {}), prefix=f"{section}.")
    diffs = [d for d in diffs if d.split(":", 1)[0] not in LOCATION_FIELDS]
    saved_batch = saved.get("train", {}).get("global_batch_size")
    current_batch = current.get("train", {}).get("global_batch_size")
    batch_note = ""
    if (
        saved_batch is not None
        and current_batch is not None
        and saved_batch != current_batch
        and not allow_batch_change
    ):
        diffs.append(f"train.global_batch_size: checkpoint has {saved_batch!r}, config has {current_batch!r}")
        batch_note = " (or set --config.train.allow_batch_change=true to continue at the same number of rows)"
    if diffs:
        raise ConfigMismatchError(
            f"checkpoint {where} was written with a different config:\n  "
            + "\n  ".join(diffs)
            + f"\nuse a fresh train.output_dir, or the config the checkpoint was trained with{batch_note}"
        )


def gather_json(value: Any) -> list:
    """``value`` (JSON-able) of every process, in process order (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
    length = int(sizes.max())
    padded = np.zeros((length,), np.uint8)
    padded[: raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), length)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes, strict=True)]


def own_data_state(meta: dict) -> dict | None:
    """This process's data state from a checkpoint's meta: its own entry when the checkpoint was written
    by as many processes as run now, else the shared one (older checkpoints, or a changed host count)."""
    states = meta.get("data_states")
    if isinstance(states, list) and len(states) == jax.process_count():
        return states[jax.process_index()]
    return meta.get("data_state")


def map_data_state(data_state: dict | None, old_batch: int, new_batch: int) -> dict | None:
    """The iterator state after the same number of rows at ``new_batch`` rows per global batch.

    Pipelines count global batches (``next_index``); ``next_index * old_batch`` rows were consumed.
    """
    if data_state is None or old_batch == new_batch:
        return data_state
    if set(data_state) != {"next_index"}:
        raise CheckpointError(
            f"train.allow_batch_change: cannot map a data state of the form {sorted(data_state)} to a new batch size"
        )
    rows = int(data_state["next_index"]) * old_batch
    if rows % new_batch:
        raise CheckpointError(
            f"train.allow_batch_change: the checkpoint consumed {rows} rows, not a multiple of the new "
            f"train.global_batch_size={new_batch}; pick a batch size that divides {rows}"
        )
    return {"next_index": rows // new_batch}


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a pytree of arrays, for ``Checkpointer.restore``."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


__all__ = ["Checkpointer", "CheckpointError", "CheckpointSaveError", "ConfigMismatchError", "as_path"]


def _remove_tree(path: epath.Path, attempts: int = 20, pause_s: float = 0.1) -> None:
    """Removes a partial step directory. A failed async save can leave a writer thread that is still
    finishing a file in it, so a removal that meets a file created meanwhile (ENOTEMPTY) or one already
    gone (ENOENT) is retried for up to ``attempts * pause_s`` seconds before the error is raised."""
    for attempt in range(attempts):
        try:
            if path.is_dir():
                path.rmtree()
            elif path.exists():
                path.unlink()
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.ENOENT) or attempt == attempts - 1:
                raise
            time.sleep(pause_s)
