"""Local stability at a fixed point: the spectral radius of the step Jacobian d step / d s.

Matrix-free: the Jacobian is only applied to vectors, J v = ``jax.jvp(step, (s*,), (v,))``.
Examples never interact in a step, so one batched JVP applies each example's own Jacobian
and every estimate is per example.

1. Power iteration (von Mises): v <- J v / ||J v||; ||J v|| tends to |lambda_1| when one
   eigenvalue dominates in magnitude (convergence ~ |lambda_2 / lambda_1|^k).
2. Arnoldi (Saad 2011, "Numerical Methods for Large Eigenvalue Problems", Alg. 6.1) started
   from the power-iterated vector plus a fresh random one: m steps of modified Gram-Schmidt give the Hessenberg
   H_m = V_m^T J V_m, whose eigenvalues (Ritz values) estimate the top eigenvalues; a complex
   pair, which makes the power ratio oscillate, is resolved exactly once the power vector
   lies in its invariant plane; the random part gives the next Ritz values (exact when
   m >= the state size, approximate otherwise). The radius is the largest Ritz magnitude.

The map is locally contractive at s* when the radius is < 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from looped_jax.analysis.loop import LoopSpec, example_dot, example_norm, scale_examples, tangent_like

_EPS = 1e-30


class Spectrum(NamedTuple):
    radius_B: np.ndarray  # max |Ritz value| (Arnoldi), the headline estimate
    power_radius_B: np.ndarray  # last power-iteration ratio ||J v|| / ||v||
    power_ratios_KB: np.ndarray  # the power ratios of every iteration
    top_magnitudes_BM: np.ndarray  # |Ritz values|, sorted descending
    ritz_BM: np.ndarray  # complex Ritz values, same order

    @property
    def contractive_B(self) -> np.ndarray:
        return self.radius_B < 1.0


def _sub_scaled(y, x, a_B):
    """y - a_B * x for carries (float leaves)."""
    xs = scale_examples(x, a_B)

    def f(yy, xx):
        if not jnp.issubdtype(jnp.result_type(yy), jnp.inexact):
            return yy
        return yy - xx

    return jax.tree.map(f, y, xs)


def jacobian_spectrum(
    spec: LoopSpec,
    carry_star,
    *,
    power_steps: int = 50,
    arnoldi_steps: int = 8,
    seed: int = 0,
) -> Spectrum:
    """Spectral radius and top Ritz magnitudes of d step / d carry at ``carry_star``, per example."""
    if not isinstance(power_steps, int) or power_steps < 1:
        raise ValueError(f"power_steps must be a Python int >= 1, got {power_steps!r}")
    if not isinstance(arnoldi_steps, int) or arnoldi_steps < 1:
        raise ValueError(f"arnoldi_steps must be a Python int >= 1, got {arnoldi_steps!r}")
    step = spec.step

    def go(params, c_star, inputs):
        def jvp(v):
            return jax.jvp(lambda c: step(params, c, inputs), (c_star,), (v,))[1]

        def normalise(w):
            n = example_norm(w)
            return scale_examples(w, jnp.where(n > _EPS, 1.0 / jnp.maximum(n, _EPS), 0.0)), n

        def power_body(v, _):
            w, n = normalise(jvp(v))
            return w, n

        v0 = tangent_like(c_star, jax.random.key(seed))
        v, ratios = jax.lax.scan(power_body, v0, None, length=power_steps)
        # Arnoldi from v + a fresh random direction: the power vector keeps the top eigenvalue
        # exact, the random part lets the Krylov space reach the next ones.
        u = tangent_like(c_star, jax.random.key(seed + 1))
        v, _ = normalise(
            jax.tree.map(lambda a, b: a + b if jnp.issubdtype(jnp.result_type(a), jnp.inexact) else a, v, u)
        )
        basis = [v]
        b = example_norm(v).shape[0]
        h = jnp.zeros((b, arnoldi_steps + 1, arnoldi_steps), jnp.float32)
        for j in range(arnoldi_steps):
            w = jvp(basis[j])
            n_in = example_norm(w)
            for i in range(j + 1):
                hij = example_dot(basis[i], w)
                w = _sub_scaled(w, basis[i], hij)
                h = h.at[:, i, j].set(hij)
            # One re-orthogonalisation pass (classical Gram-Schmidt twice is enough in practice).
            for i in range(j + 1):
                c = example_dot(basis[i], w)
                w = _sub_scaled(w, basis[i], c)
                h = h.at[:, i, j].add(c)
            # Breakdown (the Krylov space is invariant): what is left is rounding noise, drop it.
            n = example_norm(w)
            keep = n > 1e-5 * n_in
            w = scale_examples(w, jnp.where(keep, 1.0 / jnp.maximum(n, _EPS), 0.0))
            h = h.at[:, j + 1, j].set(jnp.where(keep, n, 0.0))
            basis.append(w)
        return ratios, h[:, :arnoldi_steps, :arnoldi_steps]

    ratios, h = jax.device_get(jax.jit(go)(spec.params, carry_star, spec.inputs))
    ritz = np.linalg.eigvals(np.asarray(h, np.float64))
    order = np.argsort(-np.abs(ritz), axis=-1)
    ritz = np.take_along_axis(ritz, order, axis=-1)
    mags = np.abs(ritz)
    return Spectrum(
        radius_B=mags[:, 0],
        power_radius_B=np.asarray(ratios[-1]),
        power_ratios_KB=np.asarray(ratios),
        top_magnitudes_BM=mags,
        ritz_BM=ritz,
    )
