"""Token losses and accuracy, computed in float32 with per-token weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> tuple[jax.Array, dict]:
    """Weighted mean softmax cross-entropy; returns (loss, metrics) with token accuracy.

    The denominator is max(sum(weights), 1) so an all-padding batch gives 0, not NaN.
    """
    logits = logits_BTV.astype(jnp.float32)
    logz_BT = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    nll_BT = logz_BT - target_logit_BT
    weights = weights_BT.astype(jnp.float32)
    denom = jnp.maximum(weights.sum(), 1.0)
    loss = (nll_BT * weights).sum() / denom
    correct_BT = (jnp.argmax(logits, axis=-1) == targets_BT).astype(jnp.float32)
    metrics = {"loss": loss, "accuracy": (correct_BT * weights).sum() / denom, "num_tokens": weights.sum()}
    return loss, metrics
