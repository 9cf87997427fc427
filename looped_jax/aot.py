"""Ahead-of-time compilation of the sharded train step for a TPU topology, on any machine.

With libtpu installed (the ``tpu`` extra), ``jax.experimental.topologies`` describes a TPU
slice (e.g. ``v5e:16x16``) without the hardware; lowering and compiling the train step for its
devices checks the sharding and reports per-chip memory before a pod is ever booked.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from looped_jax import sharding as shd
from looped_jax.config import ExperimentConfig


def topology_devices(topology: str) -> list:
    """Devices of a TPU topology such as ``v5e:4x4``; needs libtpu (``pip install looped_jax[tpu]``)."""
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # missing libtpu or an unknown topology name
        raise RuntimeError(
            f"could not describe TPU topology {topology!r} (is libtpu installed? pip install 'looped_jax[tpu]'): {e}"
        ) from e
    return list(desc.devices)


def compile_train_step(cfg: ExperimentConfig, devices: list) -> dict:
    """Lowers and compiles the train step for ``devices``; returns memory and timing stats."""
    from looped_jax.train.trainer import BATCH_KEYS, Trainer

    mesh = shd.make_mesh(cfg.mesh, devices)
    trainer = Trainer(cfg, mesh=mesh, log=False)
    state = trainer.abstract_state()
    shape = (cfg.train.global_batch_size, cfg.data.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32, sharding=trainer.batch_sharding)
        for k in BATCH_KEYS
    }
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = trainer.train_step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    gib = 1024**3
    per_chip = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return {
        "devices": len(devices),
        "platform": devices[0].platform,
        "device_kind": getattr(devices[0], "device_kind", ""),
        "mesh": dict(mesh.shape),
        "lower_s": round(t1 - t0, 3),
        "compile_s": round(t2 - t1, 3),
        "argument_gib_per_chip": mem.argument_size_in_bytes / gib,
        "output_gib_per_chip": mem.output_size_in_bytes / gib,
        "temp_gib_per_chip": mem.temp_size_in_bytes / gib,
        "peak_estimate_gib_per_chip": per_chip / gib,
    }
