"""Parameter initialisers and the logical-axis convention for parameters.

Every parameter is an ``nnx.Param`` carrying ``logical_axes`` metadata: a tuple with one
logical name per dimension (``embed``, ``mlp``, ``heads``, ``kv_heads``, ``kv``, ``vocab``,
``layers``) or None. ``looped_jax.sharding`` maps those names onto mesh axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str | jnp.dtype) -> jnp.dtype:
    """Maps a config dtype name ("float32", "bfloat16", "float16") to a jnp dtype."""
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def truncated_normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    """Normal(0, std) cut at +-3 std (the convention of the recurrent-depth reference code)."""
    return std * jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)


def lecun_truncated(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """Truncated LeCun normal: std 1/sqrt(fan_in), cut at +-2 std, rescaled to unit variance."""
    # 0.87962566 is the std of a unit normal truncated to [-2, 2].
    std = 1.0 / math.sqrt(fan_in) / 0.87962566103423978
    return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """Wraps ``value`` in an ``nnx.Param`` annotated with one logical axis name per dim."""
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match parameter shape {value.shape}")
    return nnx.Param(value, logical_axes=tuple(axes))


def takase_std(d_model: int) -> float:
    """Small-init std sqrt(2 / (5 d)) (Takase et al. 2023; used by the recurrent-depth model)."""
    return math.sqrt(2.0 / (5.0 * d_model))
