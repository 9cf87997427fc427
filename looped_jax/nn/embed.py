"""Token embedding with an optional tied output head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.nn.init import param, truncated_normal
from looped_jax.nn.linear import dense, dense_t


class Embed(nnx.Module):
    """``__call__`` looks tokens up; ``attend`` is the tied output head (logits in float32)."""

    def __init__(self, vocab_size: int, d_model: int, *, init_std: float, dtype=jnp.float32, rngs: nnx.Rngs):
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.table_VD = param(truncated_normal(rngs.params(), (vocab_size, d_model), init_std), ("vocab", "embed"))

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return jnp.take(self.table_VD[...], tokens_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        return dense_t(
            x_BTD.astype(self.dtype), self.table_VD[...].astype(self.dtype), preferred_element_type=jnp.float32
        )


class Unembed(nnx.Module):
    """Untied output head D -> V (logits in float32)."""

    def __init__(self, d_model: int, vocab_size: int, *, init_std: float, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.w_DV = param(truncated_normal(rngs.params(), (d_model, vocab_size), init_std), ("embed", "vocab"))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        return dense(x_BTD.astype(self.dtype), self.w_DV[...].astype(self.dtype), preferred_element_type=jnp.float32)
