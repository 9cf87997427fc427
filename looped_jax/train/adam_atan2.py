"""AdamATan2 (Everett et al. 2024, "Scaling Exponents Across Parameterizations and Optimizers",
Sec. 4.4) and sign-SGD for sparse puzzle embeddings, as used by HRM (Wang et al. 2025) and TRM.

AdamATan2 replaces Adam's m / (sqrt(v) + eps) with atan2(m, sqrt(v)), which is bounded and
scale invariant and needs no epsilon. With decoupled weight decay (AdamW style), at step t:

    p <- p * (1 - lr * wd)
    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * atan2(m, sqrt(v / (1 - b2^t)))

The puzzle-identifier embedding of HRM/TRM is trained by sign-SGD with decoupled weight decay
on the rows a batch touched: p <- p * (1 - lr * wd) - lr * sign(g).

Schedules are called with the number of updates already taken (optax convention); HRM's
``linear_warmup`` gives step t = count + 1 the rate lr * min(1, t / warmup_steps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


def linear_warmup(peak_value: float, warmup_steps: int) -> optax.Schedule:
    """lr * min(1, (count + 1) / warmup_steps): HRM's warmup to a constant rate (lr_min_ratio 1)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def schedule(count):
        if warmup_steps == 0:
            return jnp.asarray(peak_value, jnp.float32)
        frac = jnp.minimum((jnp.asarray(count, jnp.float32) + 1.0) / warmup_steps, 1.0)
        return peak_value * frac

    return schedule


def _lr(learning_rate: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    return learning_rate(count) if callable(learning_rate) else jnp.asarray(learning_rate, jnp.float32)


class AdamATan2State(NamedTuple):
    count: jax.Array  # int32: updates taken so far
    mu: Any
    nu: Any


def adam_atan2(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.95,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """AdamATan2 with decoupled weight decay on every parameter (as the HRM/TRM code does).

    Returns the full update (apply with ``optax.apply_updates``); needs ``params`` when
    ``weight_decay`` is non-zero.
    """
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must be in [0, 1), got ({b1}, {b2})")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")

    def init_fn(params):
        zeros = lambda p: jnp.zeros_like(p, jnp.float32)
        return AdamATan2State(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def update_fn(updates, state, params=None):
        if weight_decay and params is None:
            raise ValueError("adam_atan2 with weight_decay > 0 needs params in update()")
        lr = _lr(learning_rate, state.count)
        t = (state.count + 1).astype(jnp.float32)
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g.astype(jnp.float32), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, updates)
        step_size = lr / (1.0 - b1**t)
        bc2 = 1.0 - b2**t

        def direction(m, v):
            return -step_size * jnp.arctan2(m, jnp.sqrt(v / bc2))

        if params is None:
            new = jax.tree.map(direction, mu, nu)
        else:
            new = jax.tree.map(
                lambda m, v, p: (direction(m, v) - lr * weight_decay * p.astype(jnp.float32)).astype(p.dtype),
                mu,
                nu,
                params,
            )
        return new, AdamATan2State(state.count + 1, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


class SignSGDState(NamedTuple):
    count: jax.Array


def sign_sgd(learning_rate: ScalarOrSchedule, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Sign-SGD with decoupled weight decay for [num_ids, dim] embedding tables (HRM's sparse
    puzzle-embedding optimizer): only rows with a non-zero gradient (the ids in the batch) move."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")

    def init_fn(params):
        del params
        return SignSGDState(jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("sign_sgd needs params in update()")
        lr = _lr(learning_rate, state.count)

        def leaf(g, p):
            g = g.astype(jnp.float32)
            touched = jnp.any(g != 0, axis=tuple(range(1, g.ndim)), keepdims=True) if g.ndim else g != 0
            u = -lr * jnp.sign(g) - lr * weight_decay * p.astype(jnp.float32)
            return jnp.where(touched, u, 0.0).astype(p.dtype)

        return jax.tree.map(leaf, updates, params), SignSGDState(state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


def puzzle_labels(params, key: str = "puzzle_emb") -> Any:
    """Labels every leaf "puzzle" if ``key`` is on its path, else "main"."""

    def label(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return "puzzle" if key in names else "main"

    return jax.tree_util.tree_map_with_path(label, params)


def hrm_optimizer(
    learning_rate: ScalarOrSchedule,
    *,
    weight_decay: float,
    puzzle_learning_rate: ScalarOrSchedule,
    puzzle_weight_decay: float,
    b1: float = 0.9,
    b2: float = 0.95,
) -> optax.GradientTransformation:
    """AdamATan2 on the network, sign-SGD on the ``puzzle_emb`` table (HRM/TRM pretrain.py)."""
    return optax.multi_transform(
        {
            "main": adam_atan2(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay),
            "puzzle": sign_sgd(puzzle_learning_rate, weight_decay=puzzle_weight_decay),
        },
        puzzle_labels,
    )
