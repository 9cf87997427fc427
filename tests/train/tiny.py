"""Shared set-up of the small trainer tests: a tiny chains data set and a one-device mesh."""

import jax
import numpy as np

from looped_jax.data import DataConfig, prepare


def tiny_chains_data(data_dir: str) -> DataConfig:
    """A 64-row chains data set (2-hop test split) built into ``data_dir``."""
    data = DataConfig(name="chains", data_dir=data_dir, seq_len=40, num_train=64, num_test=16, test_hops=(2,))
    prepare(data)
    return data


def single_device_mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
