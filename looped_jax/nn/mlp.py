"""SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.nn.init import param, truncated_normal
from looped_jax.nn.linear import dense


class SwiGLU(nnx.Module):
    def __init__(
        self,
        d_model: int,
        mlp_dim: int,
        *,
        init_std: float,
        out_init_std: float,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.gate_DF = param(truncated_normal(rngs.params(), (d_model, mlp_dim), init_std), ("embed", "mlp"))
        self.up_DF = param(truncated_normal(rngs.params(), (d_model, mlp_dim), init_std), ("embed", "mlp"))
        self.down_FD = param(truncated_normal(rngs.params(), (mlp_dim, d_model), out_init_std), ("mlp", "embed"))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(self.dtype)
        gate_BTF = dense(x, self.gate_DF[...].astype(self.dtype))
        up_BTF = dense(x, self.up_DF[...].astype(self.dtype))
        h_BTF = jax.nn.silu(gate_BTF) * up_BTF
        return dense(h_BTF, self.down_FD[...].astype(self.dtype))
