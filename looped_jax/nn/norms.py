"""RMSNorm computed in float32 (Zhang & Sennrich 2019)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.nn.init import param


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, in float32, cast back to the input dtype.

    ``use_scale=False`` gives the parameter-free norm HRM uses.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, use_scale: bool = True):
        self.eps = eps
        self.scale = param(jnp.ones((dim,), jnp.float32), ("embed",)) if use_scale else None

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x32 = x_BTD.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.scale is not None:
            y = y * self.scale[...]
        return y.astype(x_BTD.dtype)
