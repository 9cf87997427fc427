"""Implicit and one-step fixed-point gradients vs backprop and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from looped_jax.recurrence import fixed_point_implicit, fixed_point_one_step, unroll

B, D = 3, 6


def step(params, z_BD, x_BD):
    return jnp.tanh(z_BD @ params["w_DD"] + x_BD @ params["u_DD"] + params["b_D"])


def make_problem(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 5)
    w_DD = jax.random.normal(k[0], (D, D))
    params = {
        "w_DD": 0.5 * w_DD / jnp.linalg.norm(w_DD, ord=2),  # contraction rate 0.5
        "u_DD": jax.random.normal(k[1], (D, D)) / np.sqrt(D),
        "b_D": 0.1 * jax.random.normal(k[2], (D,)),
    }
    z0_BD = 0.1 * jax.random.normal(k[3], (B, D))
    x_BD = jax.random.normal(k[4], (B, D))
    return jax.tree.map(lambda a: a.astype(dtype), (params, z0_BD, x_BD))


def loss(z_BD):
    proj_BD = jnp.arange(B * D, dtype=z_BD.dtype).reshape(B, D) / (B * D) - 0.5
    return jnp.sum(jnp.sin(z_BD) * proj_BD)


def assert_trees_close(a, b, rtol, atol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def implicit_loss(params, z0, x, **kw):
    return loss(fixed_point_implicit(step, params, z0, x, max_steps=200, tol=1e-7, **kw))


def test_implicit_matches_full_backprop():
    params, z0, x = make_problem()
    z_star = fixed_point_implicit(step, params, z0, x, max_steps=200, tol=1e-7)
    np.testing.assert_allclose(step(params, z_star, x), z_star, rtol=1e-6, atol=1e-6)

    def unrolled_loss(p, z, xx):  # 60 steps at rate 0.5: truncation error ~1e-18
        return loss(unroll(step, p, z, xx, num_steps=60)[0])

    want = jax.grad(unrolled_loss, argnums=(0, 2))(params, z0, x)
    g_params, g_z0, g_x = jax.jit(jax.grad(implicit_loss, argnums=(0, 1, 2)))(params, z0, x)
    assert_trees_close((g_params, g_x), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(g_z0, jnp.zeros_like(z0))


def test_implicit_matches_finite_differences_float64():
    with jax.enable_x64(True):
        params, z0, x = make_problem(1, jnp.float64)

        @jax.jit
        def f(p):
            return loss(fixed_point_implicit(step, p, z0, x, max_steps=200, tol=1e-13))

        grads = jax.grad(f)(params)
        rng = np.random.default_rng(0)
        eps = 1e-5
        for _ in range(3):
            direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
            plus = jax.tree.map(lambda a, d: a + eps * d, params, direction)
            minus = jax.tree.map(lambda a, d: a - eps * d, params, direction)
            fd = (f(plus) - f(minus)) / (2 * eps)
            analytic = sum(
                jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
            )
            np.testing.assert_allclose(analytic, fd, rtol=1e-7, atol=1e-9)


def test_implicit_matches_finite_differences_float32():
    params, z0, x = make_problem(2)
    grads = jax.grad(implicit_loss)(params, z0, x)
    eps = 1e-2
    direction = jax.tree.map(jnp.ones_like, params)
    plus = jax.tree.map(lambda a, d: a + eps * d, params, direction)
    minus = jax.tree.map(lambda a, d: a - eps * d, params, direction)
    fd = (implicit_loss(plus, z0, x) - implicit_loss(minus, z0, x)) / (2 * eps)
    analytic = sum(jnp.sum(g) for g in jax.tree.leaves(grads))
    # Central differences: O(eps^2) truncation plus float32 rounding / eps.
    np.testing.assert_allclose(analytic, fd, rtol=1e-3, atol=1e-4)


def test_implicit_pytree_carry_and_no_inputs():
    params, _, x = make_problem(3)

    def pair_step(p, carry, inputs):
        a_BD, b_BD = carry
        new_a = jnp.tanh(b_BD @ p["w_DD"] + p["b_D"])
        new_b = jnp.tanh(0.5 * a_BD @ p["u_DD"].T * 0.3 + p["b_D"])
        return new_a, new_b

    carry = (jnp.zeros((B, D)), jnp.ones((B, D)))

    def pair_loss(z):
        return loss(z[0]) + loss(z[1] ** 2)

    def implicit(p):
        return pair_loss(fixed_point_implicit(pair_step, p, carry, max_steps=300, tol=1e-7))

    def unrolled(p):
        return pair_loss(unroll(pair_step, p, carry, num_steps=80)[0])

    assert_trees_close(jax.grad(implicit)(params), jax.grad(unrolled)(params), rtol=1e-4, atol=1e-6)


def test_adjoint_settings_are_used():
    params, z0, x = make_problem()
    exact = jax.grad(implicit_loss)(params, z0, x)
    # One adjoint iteration: u = g + J^T g, a two-term Neumann series, visibly off.
    crude = jax.grad(implicit_loss)(params, z0, x, adjoint_max_steps=1)
    diff = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(exact), jax.tree.leaves(crude), strict=True)
    )
    assert diff > 1e-3


def test_one_step_gradient_is_last_step_gradient():
    params, z0, x = make_problem(4)
    n = 7
    z_prev = z0
    for _ in range(n - 1):
        z_prev = step(params, z_prev, x)

    def last_only(p, xx):
        return loss(step(p, jax.lax.stop_gradient(z_prev), xx))

    want = jax.grad(last_only, argnums=(0, 1))(params, x)

    def one_step(p, xx, num_steps):
        return loss(fixed_point_one_step(step, p, z0, xx, num_steps=num_steps))

    assert_trees_close(jax.grad(one_step, argnums=(0, 1))(params, x, n), want, 1e-6, 1e-6)
    traced = jax.jit(jax.grad(one_step, argnums=(0, 1)))(params, x, jnp.int32(n))
    assert_trees_close(traced, want, 1e-6, 1e-6)


def test_one_step_gradient_at_the_fixed_point():
    params, z0, x = make_problem(5)
    z_star = fixed_point_implicit(step, params, z0, x, max_steps=200, tol=1e-7)

    def at_fixed_point(p):
        return loss(step(p, z_star, x))

    def one_step(p):
        return loss(fixed_point_one_step(step, p, z0, x, num_steps=40))

    assert_trees_close(jax.grad(one_step)(params), jax.grad(at_fixed_point)(params), 1e-5, 1e-6)


def test_errors():
    params, z0, x = make_problem()
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        fixed_point_one_step(step, params, z0, x, num_steps=0)
    with pytest.raises(ValueError, match="max_steps must be"):
        fixed_point_implicit(step, params, z0, x, max_steps=0, tol=1e-5)
    with pytest.raises(ValueError, match="tol must be > 0"):
        fixed_point_implicit(step, params, z0, x, max_steps=5, tol=0.0)
    with pytest.raises(ValueError, match="adjoint_max_steps must be"):
        fixed_point_implicit(step, params, z0, x, max_steps=5, tol=1e-5, adjoint_max_steps=0)
