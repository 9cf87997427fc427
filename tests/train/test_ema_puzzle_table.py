"""EMA (trainer.ema_update) averages the network but not the sparse puzzle-embedding table (TRM EMAHelper)."""

import jax.numpy as jnp
import numpy as np

from looped_jax.train.trainer import ema_update


def test_ema_skips_puzzle_embedding_table():
    ema = {"puzzle_emb": jnp.zeros((3, 2)), "block": {"w": jnp.zeros((2,))}}
    params = {"puzzle_emb": jnp.ones((3, 2)), "block": {"w": jnp.ones((2,))}}
    out = ema_update(ema, params, 0.9)
    np.testing.assert_allclose(out["block"]["w"], 0.1)  # averaged
    np.testing.assert_array_equal(out["puzzle_emb"], 1.0)  # the live table, not averaged
