"""2-D PCA of a token's latent path across loop steps."""

from __future__ import annotations

import numpy as np


def pca_2d(path_RD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projects a path [R, D] onto its top two principal axes.

    Returns (coords [R, 2], explained-variance share of the two axes [2]); a constant path
    gives zeros and shares of 0.
    """
    x = np.asarray(path_RD, np.float64)
    if x.ndim != 2:
        raise ValueError(f"path must be [steps, features], got shape {x.shape}")
    xc = x - x.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    k = min(2, s.shape[0])
    coords = np.zeros((x.shape[0], 2))
    coords[:, :k] = u[:, :k] * s[:k]
    total = float((s**2).sum())
    share = np.zeros(2)
    if total > 0:
        share[:k] = s[:k] ** 2 / total
    return coords, share
