"""The engine's per-step options: xs, step index, stacked params, grad_steps=0, and for
iterate_to_convergence the aux carry, the active mask and initial_logits. Each is checked
against a plain Python loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from looped_jax.recurrence import iterate_to_convergence, kl_divergence, unroll

B, D, N = 2, 4, 5


def make(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {"w_DD": 0.5 * jax.random.normal(k[0], (D, D)) / np.sqrt(D), "b_D": 0.1 * jax.random.normal(k[1], (D,))}
    carry_BD = jax.random.normal(k[2], (B, D))
    xs_ND = jax.random.normal(k[3], (N, D))
    return params, carry_BD, xs_ND


def step_xs(params, c_BD, inputs, *, xs):
    return jnp.tanh(c_BD @ params["w_DD"] + params["b_D"] + xs)


def reference(params, c, xs_ND, n, grad_steps=None, index_scale=0.0, per_step=None):
    """Python loop: steps before n - grad_steps run on stop_gradient-ed values."""
    sg = jax.lax.stop_gradient
    first_grad = 0 if grad_steps is None else max(n - grad_steps, 0)
    for t in range(n):
        p = params if per_step is None else jax.tree.map(lambda a, t=t: a[t], per_step)
        x = xs_ND[t] + index_scale * t
        if t < first_grad:
            p, c, x = jax.tree.map(sg, p), sg(c), sg(x)
        c = jnp.tanh(c @ p["w_DD"] + p["b_D"] + x)
    if grad_steps == 0:
        c = sg(c)
    return c


def loss(c):
    return jnp.sum(jnp.sin(c) * jnp.arange(1.0, 1.0 + c.size).reshape(c.shape))


@pytest.mark.parametrize("grad_steps", [None, 2, 0])
def test_xs_static_and_traced(grad_steps):
    params, c0, xs = make()
    want = reference(params, c0, xs, 4, grad_steps)
    got, _ = unroll(step_xs, params, c0, None, num_steps=4, grad_steps=grad_steps, xs=xs[:4])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    g_want = jax.grad(lambda p, x: loss(reference(p, c0, x, 4, grad_steps)), argnums=(0, 1))(params, xs[:4])
    g_got = jax.grad(
        lambda p, x: loss(unroll(step_xs, p, c0, None, num_steps=4, grad_steps=grad_steps, xs=x)[0]), argnums=(0, 1)
    )(params, xs[:4])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), g_got, g_want)
    if grad_steps is None:
        return
    # Traced depth: xs has max_steps entries, only the first r are used.
    traced = jax.jit(
        lambda p, x, r: unroll(step_xs, p, c0, None, num_steps=r, grad_steps=grad_steps, xs=x, max_steps=N)[0]
    )
    for r in (0, 1, 3, 5):
        want_r = reference(params, c0, xs, r, grad_steps)
        np.testing.assert_allclose(traced(params, xs, jnp.int32(r)), want_r, rtol=1e-6, atol=1e-6)
        g_r = jax.grad(lambda p, x: loss(traced(p, x, jnp.int32(r))), argnums=(0, 1))(params, xs)
        g_ref = jax.grad(lambda p, x: loss(reference(p, c0, x, r, grad_steps)), argnums=(0, 1))(params, xs)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), g_r, g_ref)


def test_grad_steps_zero_blocks_every_gradient():
    params, c0, xs = make()
    g = jax.grad(lambda p: loss(unroll(step_xs, p, c0, None, num_steps=3, grad_steps=0, xs=xs)[0]))(params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))
    traced = jax.grad(
        lambda p: loss(unroll(step_xs, p, c0, None, num_steps=jnp.int32(3), grad_steps=0, xs=xs, max_steps=N)[0])
    )(params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(traced))
    # num_steps == 0: the initial carry comes back, still without gradient.
    for n in (0, jnp.int32(0)):
        run = lambda c, n=n: unroll(step_xs, params, c, None, num_steps=n, grad_steps=0, xs=xs, max_steps=N)[0]
        g0 = jax.grad(lambda c: loss(run(c)))(c0)
        assert float(jnp.abs(g0).max()) == 0.0


def test_index_counts_every_step():
    params, c0, xs = make()

    def step(p, c, inputs, *, xs, index):
        return step_xs(p, c, inputs, xs=xs + 0.1 * index)

    for grad_steps in (None, 2):
        got, _ = unroll(step, params, c0, None, num_steps=4, grad_steps=grad_steps, xs=xs, with_index=True)
        want = reference(params, c0, xs, 4, grad_steps, index_scale=0.1)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    got, _ = jax.jit(
        lambda r: unroll(step, params, c0, None, num_steps=r, grad_steps=2, xs=xs, with_index=True, max_steps=N)
    )(jnp.int32(5))
    np.testing.assert_allclose(got, reference(params, c0, xs, 5, 2, index_scale=0.1), rtol=1e-6, atol=1e-6)


def test_stacked_params_match_per_step_loop():
    _, c0, xs = make()
    k = jax.random.split(jax.random.key(3), 2)
    stacked = {"w_DD": 0.5 * jax.random.normal(k[0], (N, D, D)) / np.sqrt(D), "b_D": jax.random.normal(k[1], (N, D))}
    got, traj = unroll(step_xs, stacked, c0, None, num_steps=N, xs=xs, stacked_params=True, record_fn=jnp.sum)
    want = reference(None, c0, xs, N, per_step=stacked)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert traj.shape == (N,)
    g = jax.grad(
        lambda p: loss(unroll(step_xs, p, c0, None, num_steps=N, grad_steps=2, xs=xs, stacked_params=True)[0])
    )(stacked)
    g_ref = jax.grad(lambda p: loss(reference(None, c0, xs, N, 2, per_step=p)))(stacked)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), g, g_ref)
    # Bodies of the gradient-free prefix get exactly zero gradient; the last two do not.
    assert float(jnp.abs(g["w_DD"][: N - 2]).max()) == 0.0 and float(jnp.abs(g["w_DD"][N - 2 :]).min()) > 0.0


def test_step_axis_errors():
    params, c0, xs = make()
    with pytest.raises(ValueError, match=r"xs has a leading step axis of length 5; expected >= num_steps=6"):
        unroll(step_xs, params, c0, None, num_steps=6, xs=xs)
    with pytest.raises(ValueError, match=r"expected == max_steps=7"):
        unroll(step_xs, params, c0, None, num_steps=jnp.int32(2), grad_steps=1, xs=xs, max_steps=7)
    with pytest.raises(ValueError, match="needs a static max_steps"):
        unroll(step_xs, params, c0, None, num_steps=jnp.int32(2), grad_steps=1, xs=xs)
    with pytest.raises(ValueError, match="same leading step axis"):
        unroll(step_xs, params, c0, None, num_steps=2, xs={"a": xs, "b": xs[:3]})


# ----------------------------------------------------------------------------- iterate_to_convergence


def contraction(params, s_BD, inputs):
    """s <- a * s + (1 - a) * target: converges geometrically, row b with rate a_b."""
    return params["a_B1"] * s_BD + (1 - params["a_B1"]) * inputs


def test_aux_index_and_active_mask():
    params = {"a_B1": jnp.array([[0.2], [0.7]])}
    s0 = jnp.ones((B, D))
    target = jnp.zeros((B, D)) + 0.5

    def step(p, carry, inputs, *, index, active):
        s, aux = carry
        # aux counts the iterations each row was active for, and sums the indices seen.
        return contraction(p, s, inputs), {"count_B": aux["count_B"] + active, "index_sum": aux["index_sum"] + index}

    aux0 = {"count_B": jnp.zeros((B,), jnp.int32), "index_sum": jnp.int32(0)}
    res = iterate_to_convergence(
        step, params, s0, target, max_steps=50, tol=1e-3, granularity="example", aux=aux0, with_index=True,
        with_active=True,
    )  # fmt: skip
    # Python reference of the per-row exit.
    steps = []
    for b in range(B):
        s, k = np.ones(D), 0
        while k < 50:
            new = 0.5 + float(params["a_B1"][b, 0]) * (s - 0.5)
            k += 1
            rel = np.linalg.norm(new - s) / np.linalg.norm(new)
            s = new
            if rel < 1e-3:
                break
        steps.append(k)
    np.testing.assert_array_equal(res.steps, steps)
    np.testing.assert_array_equal(res.aux["count_B"], steps)  # the mask the step saw matches the engine's
    n = int(res.num_iterations)
    assert n == max(steps) and int(res.aux["index_sum"]) == n * (n - 1) // 2


def test_initial_logits_sets_the_first_kl():
    params = {"a_B1": jnp.full((B, 1, 1), 0.5)}
    s0 = jax.random.normal(jax.random.key(1), (B, 1, D))
    target = jnp.zeros((B, 1, D))
    readout = lambda p, s: 3.0 * s
    default = iterate_to_convergence(contraction, params, s0, target, max_steps=2, readout=readout, kl_tol=1e-9)
    uniform = iterate_to_convergence(
        contraction, params, s0, target, max_steps=2, readout=readout, kl_tol=1e-9, initial_logits=jnp.zeros(())
    )
    s1 = contraction(params, s0, target)
    np.testing.assert_allclose(default.kl[0], kl_divergence(readout(params, s1), readout(params, s0))[:, 0], rtol=1e-5)
    np.testing.assert_allclose(uniform.kl[0], kl_divergence(readout(params, s1), jnp.zeros((B, 1, D)))[:, 0], rtol=1e-5)
    assert not np.allclose(default.kl[0], uniform.kl[0])
    np.testing.assert_allclose(default.kl[1], uniform.kl[1], rtol=1e-6)
    with pytest.raises(ValueError, match="initial_logits needs a readout"):
        iterate_to_convergence(contraction, params, s0, target, max_steps=2, tol=1e-3, initial_logits=jnp.zeros(()))
