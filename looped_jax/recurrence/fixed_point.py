"""Gradients through a fixed point z* = step(params, z*, inputs).

Two estimators:

* `fixed_point_one_step`: the one-step gradient of HRM (Wang et al. 2025,
  "Hierarchical Reasoning Model", Sec. 2, "approximate gradient"): iterate
  without gradient, differentiate only the last application. It is the first
  term of the Neumann series of the implicit gradient below.
* `fixed_point_implicit`: the implicit-function-theorem gradient of Deep
  Equilibrium Models (Bai et al. 2019, Eq. 5 / Theorem 1): with J = d step / d z
  at z*, the cotangent g of z* is mapped to u = (I - J)^T^{-1} g, computed by
  iterating the adjoint fixed point u <- g + J^T u, and the parameter / input
  gradients are the VJP of step at z* with u.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from looped_jax.recurrence.unroll import PyTree, StepFn, is_static_int, unroll

_TINY = float(jnp.finfo(jnp.float32).tiny)


def fixed_point_one_step(
    step: StepFn,
    params: PyTree,
    carry: PyTree,
    inputs: PyTree = None,
    *,
    num_steps: int | jax.Array,
) -> PyTree:
    """``num_steps`` applications, gradients through the last one only (HRM)."""
    if is_static_int(num_steps) and num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    out, _ = unroll(step, params, carry, inputs, num_steps=num_steps, grad_steps=1)
    return out


def _tree_norm(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _iterate(f, z0: PyTree, max_steps: int, tol: float) -> PyTree:
    """Iterates z <- f(z) until ||z_k - z_{k-1}|| / ||z_k|| < tol or max_steps."""

    def cond(val):
        k, _, rel = val
        return (k < max_steps) & (rel >= tol)

    def body(val):
        k, z, _ = val
        z_new = f(z)
        diff = jax.tree.map(jnp.subtract, z_new, z)
        rel = _tree_norm(diff) / jnp.maximum(_tree_norm(z_new), _TINY)
        return k + 1, z_new, rel

    init = (jnp.zeros((), jnp.int32), z0, jnp.array(jnp.inf, jnp.float32))
    _, z, _ = jax.lax.while_loop(cond, body, init)
    return z


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _implicit(step, max_steps, tol, adjoint_max_steps, adjoint_tol, params, carry, inputs):
    return _iterate(lambda z: step(params, z, inputs), carry, max_steps, tol)


def _implicit_fwd(step, max_steps, tol, adjoint_max_steps, adjoint_tol, params, carry, inputs):
    z_star = _implicit(step, max_steps, tol, adjoint_max_steps, adjoint_tol, params, carry, inputs)
    return z_star, (params, z_star, inputs)


def _implicit_bwd(step, max_steps, tol, adjoint_max_steps, adjoint_tol, res, g):
    params, z_star, inputs = res
    _, vjp_z = jax.vjp(lambda z: step(params, z, inputs), z_star)

    def adjoint_step(u):
        (jt_u,) = vjp_z(u)
        return jax.tree.map(jnp.add, g, jt_u)

    u = _iterate(adjoint_step, g, adjoint_max_steps, adjoint_tol)
    _, vjp_params_inputs = jax.vjp(lambda p, x: step(p, z_star, x), params, inputs)
    g_params, g_inputs = vjp_params_inputs(u)
    return g_params, jax.tree.map(jnp.zeros_like, z_star), g_inputs


_implicit.defvjp(_implicit_fwd, _implicit_bwd)


def fixed_point_implicit(
    step: StepFn,
    params: PyTree,
    carry: PyTree,
    inputs: PyTree = None,
    *,
    max_steps: int,
    tol: float,
    adjoint_max_steps: int | None = None,
    adjoint_tol: float | None = None,
) -> PyTree:
    """Solves z* = step(params, z*, inputs) by iteration; implicit (DEQ) gradient.

    Forward: ``z <- step(params, z, inputs)`` from ``carry`` until the relative
    change (global norm over the carry pytree) drops below ``tol`` or after
    ``max_steps`` iterations. Backward: the adjoint u = g + J^T u is iterated the
    same way (defaults: ``adjoint_max_steps=max_steps``, ``adjoint_tol=tol``), then
    params / inputs get ``vjp(step at z*)(u)``; the initial carry gets zeros.
    The iterations converge when step is a contraction in z (spectral radius of
    J below 1). ``step`` must take every differentiable value via params/inputs.
    """
    if not is_static_int(max_steps) or max_steps < 1:
        raise ValueError(f"max_steps must be a Python int >= 1, got {max_steps!r}.")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}.")
    adjoint_max_steps = max_steps if adjoint_max_steps is None else adjoint_max_steps
    adjoint_tol = tol if adjoint_tol is None else adjoint_tol
    if not is_static_int(adjoint_max_steps) or adjoint_max_steps < 1:
        raise ValueError(f"adjoint_max_steps must be a Python int >= 1, got {adjoint_max_steps!r}.")
    if not adjoint_tol > 0:
        raise ValueError(f"adjoint_tol must be > 0, got {adjoint_tol!r}.")
    return _implicit(
        step,
        max_steps,
        float(tol),
        adjoint_max_steps,
        float(adjoint_tol),
        params,
        carry,
        inputs,
    )
