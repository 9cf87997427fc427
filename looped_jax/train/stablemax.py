"""Stable-max cross-entropy (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability"),
the token loss of HRM (Wang et al. 2025) and TRM (Jolicoeur-Martineau 2025).

    s(x) = x + 1            x >= 0
    s(x) = 1 / (1 - x)      x <  0
    log_stablemax(x)_i = log(s(x_i) / sum_j s(x_j))

s grows linearly instead of exponentially, so confident logits do not push the loss into
float32 "softmax collapse". Computed in float32 (the public code uses float64, unavailable on TPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stablemax_s(x: jax.Array) -> jax.Array:
    """s(x); both branches are evaluated on clipped inputs so the unused one never gives inf/NaN grads."""
    pos = jnp.maximum(x, 0.0)
    neg = jnp.minimum(x, 0.0)
    return jnp.where(x >= 0, pos + 1.0, 1.0 / (1.0 - neg))


def log_stablemax(logits: jax.Array, axis: int = -1) -> jax.Array:
    """log(s(x) / sum s(x)) along ``axis``, in float32."""
    s = stablemax_s(logits.astype(jnp.float32))
    return jnp.log(s) - jnp.log(jnp.sum(s, axis=axis, keepdims=True))


def stablemax_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-token negative log stable-max probability of the target, float32 [B, T]."""
    logp_BTV = log_stablemax(logits_BTV)
    return -jnp.take_along_axis(logp_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def softmax_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-token softmax cross-entropy, float32 [B, T] (the alternative ``loss_type``)."""
    logits = logits_BTV.astype(jnp.float32)
    logz_BT = jax.nn.logsumexp(logits, axis=-1)
    return logz_BT - jnp.take_along_axis(logits, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]


TOKEN_LOSSES = {"stablemax": stablemax_cross_entropy, "softmax": softmax_cross_entropy}
