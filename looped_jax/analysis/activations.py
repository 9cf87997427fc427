"""Activation and attention statistics, pure functions over arrays.

* Massive activations (Sun et al. 2024, "Massive Activations in Large Language Models"):
  the largest |activation| of a layer's residual stream, its ratio to the median |activation|
  (they call a value massive when it is ~1000x the median), and the token position and
  feature dimension that carry it.
* MLP sparsity: the share of hidden activations whose magnitude is below ``rel_eps`` times
  the layer's RMS, and the Hoyer measure (Hoyer 2004, Eq. 1)
  (sqrt(n) - ||h||_1 / ||h||_2) / (sqrt(n) - 1): 0 for a flat vector, 1 for a one-hot one.
* Attention: entropy of each query's distribution per head, the overlap sum_s min(p_s, q_s)
  of one loop step's attention map with the previous one's (1 = frozen attention), and
  the column sums sum_t p_ts (how much attention each key receives).

`step_statistics` turns one step's probe output into the small per-layer summaries the
trajectory records.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def massive_activations(x_BTD: jax.Array) -> dict:
    """max |x|, median |x|, their ratio and the (token, dim) of the max, over one layer's [B, T, D]."""
    a = jnp.abs(x_BTD.astype(jnp.float32))
    flat = a.reshape(-1)
    i = jnp.argmax(flat)
    _, t, d = a.shape
    mx = flat[i]
    med = jnp.median(flat)
    return {
        "max": mx,
        "median": med,
        "ratio": mx / jnp.maximum(med, 1e-30),
        "token": ((i // d) % t).astype(jnp.int32),
        "dim": (i % d).astype(jnp.int32),
    }


def hoyer(h_NF: jax.Array) -> jax.Array:
    """Hoyer sparsity of each row of [..., F] (0 flat, 1 one-hot); 0 for an all-zero row."""
    h = jnp.abs(h_NF.astype(jnp.float32))
    n = h.shape[-1]
    l1 = jnp.sum(h, axis=-1)
    l2 = jnp.sqrt(jnp.sum(h * h, axis=-1))
    ratio = jnp.where(l2 > 0, l1 / jnp.maximum(l2, 1e-30), jnp.sqrt(n))
    return (jnp.sqrt(n) - ratio) / (jnp.sqrt(n) - 1.0)


def near_zero_share(h: jax.Array, rel_eps: float = 0.01) -> jax.Array:
    """Share of entries with |h| < rel_eps * RMS(h) (over the whole array)."""
    h = jnp.abs(h.astype(jnp.float32))
    rms = jnp.sqrt(jnp.mean(h * h))
    return jnp.mean((h < rel_eps * rms).astype(jnp.float32))


def attention_entropy(p_BNTS: jax.Array) -> jax.Array:
    """Entropy (nats) of each query's attention distribution -> [B, N, T]."""
    p = p_BNTS.astype(jnp.float32)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def attention_overlap(p_BNTS: jax.Array, q_BNTS: jax.Array) -> jax.Array:
    """sum_s min(p, q) per query -> [B, N, T]: 1 for identical maps, 0 for disjoint ones."""
    return jnp.sum(jnp.minimum(p_BNTS.astype(jnp.float32), q_BNTS.astype(jnp.float32)), axis=-1)


def attention_column_sums(p_BNTS: jax.Array) -> jax.Array:
    """sum_t p_ts: attention each key receives, per head -> [B, N, S]."""
    return jnp.sum(p_BNTS.astype(jnp.float32), axis=-2)


def _masked_mean(x_BNT: jax.Array, mask_BT: jax.Array | None) -> jax.Array:
    """Mean over B and T of [B, N, T] (counted tokens only) -> [N]."""
    if mask_BT is None:
        return jnp.mean(x_BNT, axis=(0, 2))
    w = mask_BT.astype(jnp.float32)[:, None, :]
    return jnp.sum(x_BNT * w, axis=(0, 2)) / jnp.maximum(jnp.sum(w, axis=(0, 2)), 1.0)


def step_statistics(acts: dict, prev_attn_LBNTS: jax.Array | None, mask_BT: jax.Array | None) -> tuple[dict, jax.Array]:
    """Per-layer summaries of one step's probe output (see the module docstring).

    Returns (stats, attention maps to compare the next step with). Stats keys, each with a
    leading layer axis L: ``massive_{max,median,ratio,token,dim}``, ``mlp_near_zero``,
    ``mlp_hoyer``, ``attn_entropy_LN``, ``attn_overlap_LN``, ``attn_colsum_LNS``.
    """
    stats: dict = {}
    if "resid_LBTD" in acts:
        m = jax.vmap(massive_activations)(acts["resid_LBTD"])
        stats.update({f"massive_{k}": v for k, v in m.items()})
    if "mlp_LBTF" in acts:
        h = acts["mlp_LBTF"]
        stats["mlp_near_zero"] = jax.vmap(near_zero_share)(h)
        hoy_LBT = hoyer(h)
        if mask_BT is None:
            stats["mlp_hoyer"] = jnp.mean(hoy_LBT, axis=(1, 2))
        else:
            w = mask_BT.astype(jnp.float32)
            stats["mlp_hoyer"] = jnp.sum(hoy_LBT * w, axis=(1, 2)) / jnp.maximum(jnp.sum(w), 1.0)
    attn = acts.get("attn_LBNTS")
    if attn is not None:
        stats["attn_entropy_LN"] = jax.vmap(lambda p: _masked_mean(attention_entropy(p), mask_BT))(attn)
        if prev_attn_LBNTS is not None:
            ov = jax.vmap(lambda p, q: _masked_mean(attention_overlap(p, q), mask_BT))(attn, prev_attn_LBNTS)
            stats["attn_overlap_LN"] = ov
        stats["attn_colsum_LNS"] = jnp.mean(jax.vmap(attention_column_sums)(attn), axis=1)
    return stats, attn
