"""Orbax checkpoints: async save every N steps, keep-N, exact resume, config checks.

A checkpoint holds the train state (step, parameters, optimizer state) and a JSON item with
the experiment config and the data iterator's state, so a resumed run continues at the exact
step and data position. Orbax writes each step into a temporary directory and renames it
only once complete, so a save that fails leaves the last good checkpoint untouched; a partial
directory is never listed as a step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from looped_jax.config import diff_configs

# Config sections that must match between a checkpoint and the run that restores it. Training
# length, logging and the optimiser may change on resume; the architecture and data may not.
CHECKED_SECTIONS = ("model", "data")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the current config."""


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, save_every: int = 0, async_save: bool = True):
        self.directory = Path(directory).expanduser().absolute()
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any, *, config: dict, data_state: dict | None = None) -> None:
        """Starts an (async) save of ``state``; call ``wait()`` before reading it back."""
        meta = {"step": int(step), "config": config, "data_state": data_state}
        self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises a variety of errors for damaged directories
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable: {e}") from e

    def restore(self, abstract_state: Any, *, config: dict, step: int | None = None) -> tuple[Any, dict | None, int]:
        """Restores (state, data_state, step). ``abstract_state`` gives shapes, dtypes and shardings.

        Refuses a checkpoint whose model or data config differs from ``config``.
        """
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        meta = self.read_meta(step)
        check_config(meta.get("config", {}), config, where=f"{self.directory} step {step}")
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )["state"]
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} could not be restored into the current train state "
                f"(corrupt files or different parameter shapes): {e}"
            ) from e
        return restored, meta.get("data_state"), step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_config(saved: dict, current: dict, *, where: str) -> None:
    diffs = []
    for section in CHECKED_SECTIONS:
        diffs += diff_configs(saved.get(section, {}), current.get(section, {}), prefix=f"{section}.")
    if diffs:
        raise CheckpointError(
            f"checkpoint {where} was written with a different config:\n  "
            + "\n  ".join(diffs)
            + "\nuse a fresh train.output_dir, or the config the checkpoint was trained with"
        )


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a pytree of arrays, for ``Checkpointer.restore``."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
