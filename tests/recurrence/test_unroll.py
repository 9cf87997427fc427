"""Parity tests for `unroll`: scan (static / traced depth) vs plain Python loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from looped_jax.recurrence import REMAT_POLICIES, unroll

B, D = 3, 8
GRAD_STEPS = 3


def step(params, carry_BD, x_BD):
    return jnp.tanh(carry_BD @ params["w_DD"] + x_BD @ params["u_DD"] + params["b_D"])


def make_problem(seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    params = {
        "w_DD": 0.6 * jax.random.normal(k[0], (D, D)) / np.sqrt(D),
        "u_DD": jax.random.normal(k[1], (D, D)) / np.sqrt(D),
        "b_D": 0.1 * jax.random.normal(k[2], (D,)),
    }
    carry_BD = jax.random.normal(k[3], (B, D))
    x_BD = jax.random.normal(k[4], (B, D))
    return params, carry_BD, x_BD


def reference_loop(params, carry, inputs, num_steps, grad_steps):
    """Python loop; the first num_steps - grad_steps steps under stop_gradient."""
    n_nograd = 0 if grad_steps is None else max(num_steps - grad_steps, 0)
    sg = jax.lax.stop_gradient
    for i in range(num_steps):
        if i < n_nograd:
            carry = step(jax.tree.map(sg, params), sg(carry), sg(inputs))
        else:
            carry = step(params, carry, inputs)
    return carry


PROJ_BD = jax.random.normal(jax.random.key(42), (B, D))


def loss(out_BD):
    return jnp.sum(jnp.sin(out_BD) * PROJ_BD)


def assert_trees_close(a, b, rtol=1e-6, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@jax.jit
def traced_unroll(params, carry, inputs, r):
    return unroll(step, params, carry, inputs, num_steps=r, grad_steps=GRAD_STEPS)[0]


@jax.jit
def traced_grad(params, carry, inputs, r):
    def f(p, c, x):
        return loss(unroll(step, p, c, x, num_steps=r, grad_steps=GRAD_STEPS)[0])

    return jax.grad(f, argnums=(0, 1, 2))(params, carry, inputs)


@pytest.mark.parametrize("r", [0, 1, GRAD_STEPS, GRAD_STEPS + 1, 7])
def test_static_and_traced_match_python_loop(r):
    params, carry, x = make_problem()
    want = reference_loop(params, carry, x, r, GRAD_STEPS)
    static, traj = unroll(step, params, carry, x, num_steps=r, grad_steps=GRAD_STEPS)
    assert traj is None
    traced = traced_unroll(params, carry, x, jnp.int32(r))
    np.testing.assert_allclose(static, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(traced, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("r", [0, 2, GRAD_STEPS, GRAD_STEPS + 2])
def test_gradients_match_truncated_python_loop(r):
    params, carry, x = make_problem(1)

    def ref(p, c, xx):
        return loss(reference_loop(p, c, xx, r, GRAD_STEPS))

    def static(p, c, xx):
        return loss(unroll(step, p, c, xx, num_steps=r, grad_steps=GRAD_STEPS)[0])

    want = jax.grad(ref, argnums=(0, 1, 2))(params, carry, x)
    got_static = jax.grad(static, argnums=(0, 1, 2))(params, carry, x)
    got_traced = traced_grad(params, carry, x, jnp.int32(r))
    assert_trees_close(got_static, want)
    assert_trees_close(got_traced, want)
    # The initial carry only gets a gradient when no step ran gradient-free.
    carry_grad_norm = float(jnp.linalg.norm(got_traced[1]))
    assert (carry_grad_norm > 0) == (r <= GRAD_STEPS)


def test_full_backprop_when_grad_steps_none():
    params, carry, x = make_problem(2)

    def ref(p):
        return loss(reference_loop(p, carry, x, 5, None))

    def got(p):
        return loss(unroll(step, p, carry, x, num_steps=5)[0])

    assert_trees_close(jax.grad(got)(params), jax.grad(ref)(params))


def test_traced_num_steps_compiles_once():
    params, carry, x = make_problem()
    traces = []

    @jax.jit
    def train_like(p, r):
        traces.append(None)

        def f(p):
            return loss(unroll(step, p, carry, x, num_steps=r, grad_steps=2)[0])

        return jax.value_and_grad(f)(p)

    for r in [0, 1, 4, 9, 2]:
        value, grads = train_like(params, jnp.int32(r))
        want = jax.grad(lambda p, r=r: loss(reference_loop(p, carry, x, r, 2)))(params)
        assert_trees_close(grads, want)
        assert np.isfinite(value)
    assert len(traces) == 1


def test_gradient_free_prefix_has_symbolic_zero_tangents():
    params, carry, x = make_problem()

    def fwd(p, r):
        return unroll(step, p, carry, x, num_steps=r, grad_steps=2)[0]

    def while_outvar_counts(jaxpr):
        return [len(e.outvars) for e in jaxpr.jaxpr.eqns if e.primitive.name == "while"]

    r = jnp.int32(6)
    primal = jax.make_jaxpr(fwd)(params, r)
    tangents = jax.tree.map(jnp.ones_like, params)
    jvp = jax.make_jaxpr(lambda p, t: jax.jvp(lambda q: fwd(q, r), (p,), (t,)))(params, tangents)
    # Same while_loop carry in the JVP as in the primal: no tangents are carried.
    assert while_outvar_counts(primal) and while_outvar_counts(jvp) == (while_outvar_counts(primal))


def test_activation_memory_independent_of_num_steps():
    params, carry, x = make_problem()

    def temp_bytes(num_steps, grad_steps):
        def f(p):
            out = unroll(step, p, carry, x, num_steps=num_steps, grad_steps=grad_steps)
            return loss(out[0])

        compiled = jax.jit(jax.grad(f)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(4, 2) == temp_bytes(64, 2)
    assert temp_bytes(64, None) > temp_bytes(64, 2)


@pytest.mark.parametrize("policy", sorted(REMAT_POLICIES))
def test_remat_policy_same_values_and_grads(policy):
    params, carry, x = make_problem(3)

    def f(p, r, remat_policy):
        out = unroll(step, p, carry, x, num_steps=r, grad_steps=2, remat_policy=remat_policy)
        return loss(out[0])

    for r in (3, jnp.int32(3)):
        want = jax.value_and_grad(f)(params, r, None)
        got = jax.value_and_grad(f)(params, r, policy)
        assert_trees_close(got, want)


def test_record_fn_static_trajectory():
    params, carry, x = make_problem(4)
    out, traj = unroll(step, params, carry, x, num_steps=5, grad_steps=2, record_fn=lambda c: c)
    assert traj.shape == (5, B, D)
    c = carry
    for t in range(5):
        c = step(params, c, x)
        np.testing.assert_allclose(traj[t], c, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(traj[-1], out)

    def summary(c):
        return {"norm_B": jnp.linalg.norm(c, axis=-1), "mean": jnp.mean(c)}

    _, padded = unroll(step, params, carry, x, num_steps=3, record_fn=summary, max_steps=6)
    assert padded["norm_B"].shape == (6, B) and padded["mean"].shape == (6,)
    np.testing.assert_allclose(padded["norm_B"][:3], jnp.linalg.norm(traj[:3], axis=-1), rtol=1e-6)
    # Entries past num_steps repeat the final record.
    np.testing.assert_array_equal(padded["mean"][3:], jnp.full(3, padded["mean"][2]))


@pytest.mark.parametrize("r", [0, 2, 5, 8])
def test_record_fn_traced_matches_static(r):
    params, carry, x = make_problem(5)
    max_steps = 8

    def run(p, num_steps):
        return unroll(
            step,
            p,
            carry,
            x,
            num_steps=num_steps,
            grad_steps=3,
            record_fn=lambda c: c,
            max_steps=max_steps,
        )

    out_s, traj_s = run(params, r)
    out_t, traj_t = jax.jit(run)(params, jnp.int32(r))
    assert traj_t.shape == (max_steps, B, D)
    np.testing.assert_allclose(out_t, out_s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(traj_t, traj_s, rtol=1e-6, atol=1e-6)
    if r == 0:
        np.testing.assert_array_equal(traj_t, jnp.broadcast_to(carry, traj_t.shape))

    def traj_loss(p, num_steps):
        return jnp.sum(jnp.cos(run(p, num_steps)[1]))

    g_s = jax.grad(traj_loss)(params, r)
    g_t = jax.jit(jax.grad(traj_loss))(params, jnp.int32(r))
    assert_trees_close(g_t, g_s)


def test_traced_num_steps_clipped_to_max_steps():
    params, carry, x = make_problem()
    out, _ = unroll(step, params, carry, x, num_steps=jnp.int32(9), grad_steps=2, max_steps=4)
    np.testing.assert_allclose(out, reference_loop(params, carry, x, 4, 2), rtol=1e-6, atol=1e-6)


def test_errors():
    params, carry, x = make_problem()
    r = jnp.int32(3)
    with pytest.raises(ValueError, match="num_steps must be >= 0"):
        unroll(step, params, carry, x, num_steps=-1)
    with pytest.raises(ValueError, match="grad_steps must be None or a Python int >= 0"):
        unroll(step, params, carry, x, num_steps=3, grad_steps=-1)
    with pytest.raises(ValueError, match="grad_steps must be a static int"):
        unroll(step, params, carry, x, num_steps=r)
    with pytest.raises(ValueError, match="needs a static max_steps"):
        unroll(step, params, carry, x, num_steps=r, grad_steps=1, record_fn=lambda c: c)
    with pytest.raises(ValueError, match="exceeds max_steps"):
        unroll(step, params, carry, x, num_steps=5, max_steps=4)
    with pytest.raises(ValueError, match="integer scalar"):
        unroll(step, params, carry, x, num_steps=jnp.ones(2, jnp.int32), grad_steps=1)
    with pytest.raises(ValueError, match="integer scalar"):
        unroll(step, params, carry, x, num_steps=jnp.float32(2.0), grad_steps=1)
    with pytest.raises(ValueError, match="Python int or an integer JAX scalar"):
        unroll(step, params, carry, x, num_steps=2.0)
    with pytest.raises(ValueError, match="dots_saveable"):
        unroll(step, params, carry, x, num_steps=2, remat_policy="save_all_the_things")
