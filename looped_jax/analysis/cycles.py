"""Converge, cycle or wander: classifying each token's orbit at a given step.

At step k a token is

* ``diverged`` if its latent is non-finite or its norm grew by more than ``blowup`` over
  the initial norm (and ``blowup`` * 1 for a zero start);
* ``converged`` if its relative residual ||s_k - s_{k-1}|| / ||s_k|| < tol;
* ``cycling`` with period p (the smallest 2 <= p <= P) if ||s_k - s_{k-p}|| / ||s_k|| < tol;
* ``wandering`` otherwise.

The finite-time Lyapunov exponent (`Trajectory.ftle_B`) complements it: > 0 on chaotic
orbits, < 0 on attracting fixed points or cycles.
"""

from __future__ import annotations

import numpy as np

from looped_jax.analysis.trajectory import Trajectory

CLASSES = ("converged", "cycling", "wandering", "diverged")


def classify(traj: Trajectory, step: int, *, tol: float = 1e-3, blowup: float = 1e6) -> tuple[np.ndarray, np.ndarray]:
    """(class index into CLASSES [B, T], period [B, T]: 1 converged, p cycling, 0 otherwise) at ``step`` (1-based)."""
    if not 1 <= step <= traj.num_steps:
        raise ValueError(f"step must be in [1, {traj.num_steps}] (the recorded steps), got {step}")
    r = step - 1
    rec_PBT = traj.recurrence_RPBT[r]
    norm = traj.norm_RBT[r]
    n0 = np.maximum(traj.initial_norm_BT, 1.0)
    diverged = ~np.isfinite(norm) | (norm > blowup * n0) | ~np.isfinite(traj.residual_RBT[r])
    converged = ~diverged & (traj.residual_RBT[r] < tol)
    with np.errstate(invalid="ignore"):
        below_PBT = np.nan_to_num(rec_PBT, nan=np.inf) < tol
    below_PBT[0] = False  # p = 1 is convergence
    has_cycle = below_PBT.any(axis=0)
    period = np.where(has_cycle, below_PBT.argmax(axis=0) + 1, 0)
    cycling = ~diverged & ~converged & has_cycle
    cls = np.full(norm.shape, 2, np.int32)
    cls[cycling] = 1
    cls[converged] = 0
    cls[diverged] = 3
    period = np.where(converged, 1, np.where(cycling, period, 0)).astype(np.int32)
    return cls, period


def shares(traj: Trajectory, step: int, *, tol: float = 1e-3, blowup: float = 1e6) -> dict:
    """Share of the counted tokens in each class at ``step``, and a histogram of cycle periods."""
    cls, period = classify(traj, step, tol=tol, blowup=blowup)
    mask = traj.token_mask_BT
    c = cls[mask]
    n = max(c.size, 1)
    out = {name: float((c == i).sum() / n) for i, name in enumerate(CLASSES)}
    periods = period[mask][c == 1]
    out["periods"] = {int(p): int((periods == p).sum()) for p in np.unique(periods)}
    return out


def shares_by_step(traj: Trajectory, *, tol: float = 1e-3, blowup: float = 1e6) -> dict[str, np.ndarray]:
    """The class shares at every recorded step -> {class: [R]}."""
    out = {name: np.zeros(traj.num_steps) for name in CLASSES}
    for k in range(1, traj.num_steps + 1):
        s = shares(traj, k, tol=tol, blowup=blowup)
        for name in CLASSES:
            out[name][k - 1] = s[name]
    return out
