"""Fixed points of a loop: a long-run reference s*, distance to it and the convergence rate.

For a map contracting at rate rho near its fixed point, ||s_k - s*|| ~ C rho^k, so the slope
of log ||s_k - s*|| against k is log rho. `fit_rate` fits it per token by least squares over
the steps where the distance is above a floor (below it, float rounding dominates).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from looped_jax.analysis.loop import LoopSpec, relative_distance, run, state_of


class Reference(NamedTuple):
    carry: object  # device pytree s* (the full carry)
    state_BTD: jax.Array  # s* in the space of state_fn
    residual_BT: np.ndarray  # relative change of the last step: how fixed s* is
    num_steps: int


def long_run_reference(spec: LoopSpec, num_steps: int) -> Reference:
    """s* = the carry after ``num_steps`` steps (e.g. 4R), with the residual of one more step."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a Python int >= 1, got {num_steps!r}")
    carry = run(spec, num_steps)
    nxt = run(spec, 1, carry)
    x, x1 = state_of(spec, carry), state_of(spec, nxt)
    res = np.asarray(jax.device_get(relative_distance(x1, x)))
    return Reference(carry, x, res, num_steps)


def first_step_below(x_RBT: np.ndarray, tol: float) -> np.ndarray:
    """Per token, the first step k (1-based) with x_k < tol; 0 where it never is."""
    below = np.asarray(x_RBT) < tol
    hit = below.any(axis=0)
    return np.where(hit, below.argmax(axis=0) + 1, 0).astype(np.int32)


def fit_rate(
    distance_RBT: np.ndarray, *, floor: float = 1e-6, start: int = 0, min_points: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Per-token least-squares slope of log distance over steps start+1.. where distance > floor.

    Returns (rate_BT = exp(slope), slope_BT); NaN where fewer than ``min_points`` steps qualify.
    Steps are counted from 1 (row r of the trajectory is step r + 1).
    """
    d = np.asarray(distance_RBT, np.float64)[start:]
    k = np.arange(start + 1, start + 1 + d.shape[0], dtype=np.float64)
    # Only the prefix before the distance first hits the floor: afterwards it is rounding noise.
    ok = np.isfinite(d) & (d > floor)
    ok = np.cumprod(ok, axis=0).astype(bool)
    w = ok.astype(np.float64)
    n = w.sum(0)
    logd = np.log(np.where(ok, d, 1.0))
    kk = k.reshape((-1,) + (1,) * (d.ndim - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        km = (w * kk).sum(0) / n
        lm = (w * logd).sum(0) / n
        cov = (w * (kk - km) * (logd - lm)).sum(0)
        var = (w * (kk - km) ** 2).sum(0)
        slope = cov / var
    slope = np.where(n >= min_points, slope, np.nan)
    return np.exp(slope), slope
