"""Rotary position embeddings (Su et al. 2021), half-split ("NeoX") layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies theta^(-2i/H) for i in [0, H/2)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotates pairs (x[i], x[i + H/2]) by angle position * theta^(-2i/H); math in float32."""
    head_dim = x_BTNH.shape[-1]
    inv_freq_F = rope_frequencies(head_dim, theta)
    angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq_F
    sin_BT1F = jnp.sin(angles_BTF)[:, :, None, :]
    cos_BT1F = jnp.cos(angles_BTF)[:, :, None, :]
    x32 = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], -1)
    return out.astype(x_BTNH.dtype)
