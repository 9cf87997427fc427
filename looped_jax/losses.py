"""Losses, one implementation each, used by every layer above (models, the trainer, scripts).

All are computed in float32 whatever the input dtype:

* `softmax_cross_entropy` / `stablemax_cross_entropy`: per-token losses [B, T]; `TOKEN_LOSSES`
  maps the ``loss_type`` names of the HRM/TRM configs to them.
* `cross_entropy`: the weighted mean softmax cross-entropy with token accuracy (every LM family).
* `binary_cross_entropy_with_logits`: elementwise BCE with (possibly soft) targets (ACT halting,
  GRAM's halt and reward heads).
* `gaussian_kl`: elementwise KL between diagonal Gaussians given by (mean, log std); the
  standard-normal prior of the latent-thought model is ``mu_p = log_sigma_p = 0``.

Stable-max (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability") is the token loss
of HRM (Wang et al. 2025) and TRM (Jolicoeur-Martineau 2025):

    s(x) = x + 1  (x >= 0),   1 / (1 - x)  (x < 0),     log_stablemax(x)_i = log(s(x_i) / sum_j s(x_j))

s grows linearly instead of exponentially, so confident logits do not push the loss into float32
"softmax collapse" (the public code uses float64, unavailable on TPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _target_values(x_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def softmax_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-token softmax cross-entropy, float32 [B, T]."""
    logits = logits_BTV.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - _target_values(logits, targets_BT)


def stablemax_s(x: jax.Array) -> jax.Array:
    """s(x); both branches see clipped inputs so the unused one never gives inf/NaN gradients."""
    pos = jnp.maximum(x, 0.0)
    neg = jnp.minimum(x, 0.0)
    return jnp.where(x >= 0, pos + 1.0, 1.0 / (1.0 - neg))


def log_stablemax(logits: jax.Array, axis: int = -1) -> jax.Array:
    """log(s(x) / sum s(x)) along ``axis``, in float32."""
    s = stablemax_s(logits.astype(jnp.float32))
    return jnp.log(s) - jnp.log(jnp.sum(s, axis=axis, keepdims=True))


def stablemax_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-token negative log stable-max probability of the target, float32 [B, T]."""
    return -_target_values(log_stablemax(logits_BTV), targets_BT)


TOKEN_LOSSES = {"stablemax": stablemax_cross_entropy, "softmax": softmax_cross_entropy}


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> tuple[jax.Array, dict]:
    """Weighted mean softmax cross-entropy; returns (loss, metrics) with token accuracy.

    The denominator is max(sum(weights), 1) so an all-padding batch gives 0, not NaN.
    """
    logits = logits_BTV.astype(jnp.float32)
    nll_BT = softmax_cross_entropy(logits, targets_BT)
    weights = weights_BT.astype(jnp.float32)
    denom = jnp.maximum(weights.sum(), 1.0)
    loss = (nll_BT * weights).sum() / denom
    correct_BT = (jnp.argmax(logits, axis=-1) == targets_BT).astype(jnp.float32)
    metrics = {"loss": loss, "accuracy": (correct_BT * weights).sum() / denom, "num_tokens": weights.sum()}
    return loss, metrics


def binary_cross_entropy_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise max(x, 0) - x t + log(1 + exp(-|x|)) (stable for any logit; soft targets allowed)."""
    logits = logits.astype(jnp.float32)
    return jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def gaussian_kl(
    mu_q: jax.Array,
    log_sigma_q: jax.Array,
    mu_p: jax.Array | float = 0.0,
    log_sigma_p: jax.Array | float = 0.0,
) -> jax.Array:
    """Elementwise KL(N(mu_q, s_q^2) || N(mu_p, s_p^2)) = log s_p/s_q + (s_q^2 + (mu_q - mu_p)^2) / 2 s_p^2 - 1/2.

    Defaults give the KL to the standard normal, 0.5 (mu^2 + s^2 - log s^2 - 1).
    """
    var_ratio = jnp.exp(2.0 * (log_sigma_q - log_sigma_p))
    return log_sigma_p - log_sigma_q + 0.5 * (var_ratio + jnp.square((mu_q - mu_p) * jnp.exp(-log_sigma_p))) - 0.5
