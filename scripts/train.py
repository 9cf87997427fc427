"""Train any looped_jax model from a config file.

    python scripts/train.py --config configs/recurrent_depth_chains.py --config.train.num_steps=2000

Resumes from the newest good checkpoint in ``train.output_dir`` when there is one.

Multi-host (TPU VMs, SLURM, or ``--distributed`` with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set): `jax.distributed.initialize` runs before
anything else touches JAX, so every process knows its index before the data pipeline shards by it;
process 0 builds the data set before the others look for it (tests/train/test_multihost.py).

Exit status: 0 done; 2 a bad config, command line or checkpoint (one line on stderr naming the
field or path; the traceback with ``--debug``); 3 training went non-finite
(``train.nonfinite_policy``); 75 stopped by SIGTERM/SIGINT after saving (run it again to resume).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looped_jax.config import load_config, parse_cli_overrides  # noqa: E402

USAGE = "usage: train.py --config configs/<name>.py [--config.section.field=value ...] [--distributed] [--debug]"
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
# How long the other processes wait for process 0 to build the data set.
PREPARE_TIMEOUT_S = 3 * 3600


def wants_distributed(argv_flag: bool, environ=os.environ) -> bool:
    """Whether this process is one of several: asked for, or told so by the cluster's environment."""
    if argv_flag or environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return "," in environ.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice


def init_distributed() -> None:
    """`jax.distributed.initialize` from the environment (explicit variables first, else auto-detect).

    CPU processes exchange collectives through gloo: the default of jax 0.10, set explicitly so a
    release whose default is "none" cannot leave a multi-process CPU run without cross-process
    collectives (``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` in the environment wins). CPU backend only.
    """
    import jax

    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        jax.distributed.initialize(
            coordinator_address=addr,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()  # TPU VM / SLURM auto-detection


def main(argv: list[str]) -> int:
    flags = {"--debug", "--distributed"}
    debug, distributed = "--debug" in argv, "--distributed" in argv
    argv = [a for a in argv if a not in flags]
    try:
        path, overrides = parse_cli_overrides(argv)
        if path is None:
            print(USAGE, file=sys.stderr)
            return EXIT_BAD_INPUT
        cfg = load_config(path, overrides)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        return _fail(e, debug, EXIT_BAD_INPUT)

    if wants_distributed(distributed):
        init_distributed()  # before any other JAX call initialises the backend

    import jax

    from looped_jax.checkpoint import CheckpointError
    from looped_jax.data import prepare, split_names
    from looped_jax.train.trainer import EXIT_PREEMPTED, NonFiniteError, Trainer

    try:
        prepare_data(cfg.data, prepare)
        trainer = Trainer(cfg)
        if jax.process_index() == 0:
            print(
                f"devices: {jax.device_count()} x {jax.devices()[0].platform}  processes: {jax.process_count()}  "
                f"mesh: {dict(trainer.mesh.shape)}",
                flush=True,
            )
        _, history = trainer.fit(eval_splits=tuple(s for s in split_names(cfg.data) if s != "train"))
    except NonFiniteError as e:
        return _fail(e, debug, EXIT_NONFINITE)
    except (CheckpointError, ValueError) as e:
        return _fail(e, debug, EXIT_BAD_INPUT)
    if history["stopped_by"] == "signal":
        print(f"stopped by {history.get('signal')} at step {history['steps']} (saved); run again to resume")
        return EXIT_PREEMPTED
    if history["stopped_by"] == "already_done":
        print(
            f"error: the checkpoint is already at train.num_steps={cfg.train.num_steps}; nothing to train "
            "(raise train.num_steps to continue)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if jax.process_index() == 0:
        print("final eval:", history["eval"])
    return 0


def prepare_data(data_cfg, prepare) -> None:
    """Builds the data set once: process 0 first, then the others (a no-op on a shared directory,
    a local build where each host has its own disk). Several processes building into one directory
    at once race on TFDS's final rename ("Destination ... already exists")."""
    import jax

    if jax.process_count() == 1:
        prepare(data_cfg)
        return
    if jax.process_index() == 0:
        prepare(data_cfg)
    _barrier("looped_jax_prepare_data", timeout_s=PREPARE_TIMEOUT_S)
    if jax.process_index() != 0:
        prepare(data_cfg)


def _barrier(name: str, *, timeout_s: int) -> None:
    """Waits until every process reaches ``name``: on the coordination service when there is one (its
    timeout is ours; a device collective's would be the collectives library's), else a device sync."""
    from jax._src import distributed  # the client orbax uses for its own barriers

    client = distributed.global_state.client
    if client is not None:
        client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _fail(e: BaseException, debug: bool, code: int) -> int:
    print(f"error: {e}", file=sys.stderr)
    if debug:
        traceback.print_exc()
    else:
        print("(run with --debug for the traceback)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
