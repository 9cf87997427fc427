"""`iterate_to_convergence` vs a reference loop that records every state in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from looped_jax.recurrence import ConvergenceResult, iterate_to_convergence, kl_divergence

B, T, D, V = 2, 5, 8, 11
MAX_STEPS = 60


def make_problem(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    w_DD = jax.random.normal(k[0], (D, D))
    w_DD = w_DD / jnp.linalg.norm(w_DD, ord=2)  # spectral norm 1
    # Per-token contraction rates, so tokens settle after different step counts.
    scale_BT = jax.random.permutation(k[1], jnp.linspace(0.05, 0.8, B * T)).reshape(B, T)
    params = {"w_DD": w_DD, "scale_BT": scale_BT, "v_DV": jax.random.normal(k[2], (D, V))}
    x_BTD = jax.random.normal(k[3], (B, T, D))
    state_BTD = jnp.zeros((B, T, D))
    return params, state_BTD, x_BTD


def step(params, s_BTD, x_BTD):
    """s <- tanh(a_t W s + x): a contraction with rate a_t per token, no token mixing."""
    return jnp.tanh(params["scale_BT"][..., None] * (s_BTD @ params["w_DD"]) + x_BTD)


def readout(params, s_BTD):
    return 3.0 * s_BTD @ params["v_DV"]


def log_softmax64(logits):
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def reference(
    params, state, x, *, max_steps=MAX_STEPS, tol=None, kl_tol=None, patience=None, granularity="token", min_steps=1
):
    """Steps and converged flags from an unmasked run (tokens do not interact)."""
    states = [state]
    jit_step = jax.jit(step)
    for _ in range(max_steps):
        states.append(jit_step(params, states[-1], x))
    s_KBTD = np.stack([np.asarray(s, np.float64) for s in states])
    axes = (-1,) if granularity == "token" else (-2, -1)
    diff = np.linalg.norm(s_KBTD[1:] - s_KBTD[:-1], axis=axes)
    rel = diff / np.linalg.norm(s_KBTD[1:], axis=axes)  # [M, elements]
    ok = np.ones_like(rel, bool)
    if tol is not None:
        ok &= rel < tol
    if kl_tol is not None or patience is not None:
        lp = log_softmax64(s_KBTD @ np.asarray(readout(params, jnp.eye(D)), np.float64))
        kl = np.sum(np.exp(lp[1:]) * (lp[1:] - lp[:-1]), axis=-1)  # [M, B, T]
        if kl_tol is not None:
            ok &= (kl if granularity == "token" else kl.max(-1)) < kl_tol
        if patience is not None:
            same = lp.argmax(-1)[1:] == lp.argmax(-1)[:-1]
            count = np.zeros_like(same, int)
            for k in range(max_steps):
                count[k] = np.where(same[k], (count[k - 1] if k else 0) + 1, 0)
            ok &= (count if granularity == "token" else count.min(-1)) >= patience
    ok[: min_steps - 1] = False
    converged = ok.any(0)
    steps = np.where(converged, ok.argmax(0) + 1, max_steps)
    return steps, converged, s_KBTD, rel


def check_state(result, steps, s_KBTD, granularity="token"):
    """Each element's final state is the reference state after its own step count."""
    if granularity == "example":
        steps = np.broadcast_to(steps[:, None], (B, T))
    b, t = np.meshgrid(np.arange(B), np.arange(T), indexing="ij")
    want = s_KBTD[steps, b, t]
    np.testing.assert_allclose(result.state, want, rtol=1e-5, atol=1e-6)


def test_token_tol_matches_reference():
    params, state, x = make_problem()
    tol = 1e-4
    run = jax.jit(lambda p, s, xx: iterate_to_convergence(step, p, s, xx, max_steps=MAX_STEPS, tol=tol))
    res = run(params, state, x)
    assert isinstance(res, ConvergenceResult)
    steps, converged, s_KBTD, rel = reference(params, state, x, tol=tol)
    assert converged.all() and len(np.unique(steps)) > 4
    assert res.steps.shape == (B, T) and res.steps.dtype == jnp.int32
    np.testing.assert_array_equal(res.steps, steps)
    np.testing.assert_array_equal(res.converged, converged)
    assert int(res.num_iterations) == steps.max()
    assert res.kl is None
    check_state(res, steps, s_KBTD)
    # The final state meets the tolerance: one more step barely moves it.
    s = np.asarray(res.state, np.float64)
    s_next = np.asarray(step(params, res.state, x), np.float64)
    assert (np.linalg.norm(s_next - s, axis=-1) / np.linalg.norm(s_next, axis=-1) < tol).all()
    # Residual rows: max over still-active tokens; NaN after the loop ended.
    n = int(res.num_iterations)
    assert res.residuals.shape == (MAX_STEPS, B) and res.residuals.dtype == jnp.float32
    assert np.isnan(res.residuals[n:]).all()
    active_KBT = np.arange(1, n + 1)[:, None, None] <= steps[None]
    want_res = np.where(active_KBT, rel[:n], 0.0).max(-1)
    np.testing.assert_allclose(res.residuals[:n], want_res, rtol=1e-3, atol=1e-7)


def test_max_steps_cap():
    params, state, x = make_problem()
    max_steps, tol = 8, 1e-4
    res = iterate_to_convergence(step, params, state, x, max_steps=max_steps, tol=tol)
    steps, converged, s_KBTD, _ = reference(params, state, x, max_steps=max_steps, tol=tol)
    assert converged.any() and not converged.all()
    assert int(res.num_iterations) == max_steps
    np.testing.assert_array_equal(res.steps, steps)
    np.testing.assert_array_equal(res.converged, converged)
    assert res.residuals.shape == (max_steps, B) and not np.isnan(res.residuals).any()
    check_state(res, steps, s_KBTD)


def test_example_granularity_and_min_steps():
    params, state, x = make_problem(1)
    kwargs = dict(tol=1e-4, granularity="example", min_steps=3)
    res = iterate_to_convergence(step, params, state, x, max_steps=MAX_STEPS, **kwargs)
    steps, converged, s_KBTD, _ = reference(params, state, x, **kwargs)
    assert res.steps.shape == (B,) and res.converged.shape == (B,)
    np.testing.assert_array_equal(res.steps, steps)
    np.testing.assert_array_equal(res.converged, converged)
    check_state(res, steps, s_KBTD, "example")
    # The per-example change lies between its tokens' smallest and largest changes.
    token_steps, *_ = reference(params, state, x, tol=1e-4, min_steps=3)
    assert (token_steps.min(-1) < steps).all() and (steps <= token_steps.max(-1)).all()


def test_min_steps_forces_applications():
    params, state, x = make_problem()
    res = iterate_to_convergence(step, params, state, x, max_steps=20, tol=1e-1, min_steps=7)
    steps, *_ = reference(params, state, x, max_steps=20, tol=1e-1, min_steps=7)
    assert (np.asarray(res.steps) >= 7).all()
    np.testing.assert_array_equal(res.steps, steps)


@pytest.mark.parametrize("granularity", ["token", "example"])
def test_kl_criterion(granularity):
    params, state, x = make_problem(2)
    kwargs = dict(kl_tol=1e-6, granularity=granularity)
    res = iterate_to_convergence(step, params, state, x, max_steps=MAX_STEPS, readout=readout, **kwargs)
    steps, converged, s_KBTD, _ = reference(params, state, x, **kwargs)
    assert converged.all() and len(np.unique(steps)) > 1
    np.testing.assert_array_equal(res.steps, steps)
    check_state(res, steps, s_KBTD, granularity)
    n = int(res.num_iterations)
    assert res.kl.shape == (MAX_STEPS, B)
    assert np.isnan(res.kl[n:]).all() and (np.asarray(res.kl[:n]) >= -1e-6).all()
    # The last iteration of the slowest example recorded a KL below tolerance.
    assert float(jnp.max(res.kl[n - 1])) < 1e-6


@pytest.mark.parametrize("granularity", ["token", "example"])
def test_argmax_patience(granularity):
    params, state, x = make_problem(3)
    kwargs = dict(patience=3, granularity=granularity)
    res = iterate_to_convergence(
        step,
        params,
        state,
        x,
        max_steps=MAX_STEPS,
        readout=readout,
        argmax_patience=3,
        granularity=granularity,
    )
    steps, converged, s_KBTD, _ = reference(params, state, x, **kwargs)
    assert converged.all() and (steps >= 3).all()
    np.testing.assert_array_equal(res.steps, steps)
    check_state(res, steps, s_KBTD, granularity)


def test_combined_criteria():
    params, state, x = make_problem(4)
    kwargs = dict(tol=1e-3, kl_tol=1e-7)
    res = iterate_to_convergence(step, params, state, x, max_steps=MAX_STEPS, readout=readout, **kwargs)
    steps, _, s_KBTD, _ = reference(params, state, x, **kwargs)
    tol_steps, *_ = reference(params, state, x, tol=1e-3)
    kl_steps, *_ = reference(params, state, x, kl_tol=1e-7)
    assert (steps >= np.maximum(tol_steps, kl_steps)).all()
    np.testing.assert_array_equal(res.steps, steps)
    check_state(res, steps, s_KBTD)


def test_kl_divergence_accurate_for_close_distributions():
    rng = np.random.default_rng(0)
    logits_q = rng.normal(size=(4, 50)) * 4.0
    for eps in (1e-1, 1e-3, 1e-5):
        logits_p = logits_q + eps * rng.normal(size=logits_q.shape)
        p32, q32 = logits_p.astype(np.float32), logits_q.astype(np.float32)
        # Reference in float64 from the same float32 inputs.
        lp, lq = log_softmax64(p32.astype(np.float64)), log_softmax64(q32.astype(np.float64))
        want = np.sum(np.exp(lp) * (lp - lq), axis=-1)
        got = jax.jit(kl_divergence)(jnp.asarray(p32), jnp.asarray(q32))
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-15)
    # -inf logits on both sides are ignored; large divergences stay finite.
    masked = jnp.array([[0.0, 1.0, -jnp.inf]])
    np.testing.assert_allclose(kl_divergence(masked, masked), [0.0], atol=1e-7)
    assert np.isfinite(kl_divergence(jnp.array([[100.0, 0.0]]), jnp.array([[0.0, 100.0]]))).all()


def test_errors():
    params, state, x = make_problem()
    call = lambda **kw: iterate_to_convergence(step, params, state, x, **kw)
    with pytest.raises(ValueError, match="at least one criterion"):
        call(max_steps=5)
    with pytest.raises(ValueError, match="need a readout"):
        call(max_steps=5, kl_tol=1e-3)
    with pytest.raises(ValueError, match="need a readout"):
        call(max_steps=5, argmax_patience=2)
    with pytest.raises(ValueError, match="max_steps must be"):
        call(max_steps=0, tol=1e-3)
    with pytest.raises(ValueError, match="min_steps must be"):
        call(max_steps=5, tol=1e-3, min_steps=6)
    with pytest.raises(ValueError, match="granularity must be"):
        call(max_steps=5, tol=1e-3, granularity="sequence")
    with pytest.raises(ValueError, match="tol must be > 0"):
        call(max_steps=5, tol=-1.0)
    with pytest.raises(ValueError, match=r"shape \[B, ..., D\]"):
        iterate_to_convergence(step, params, jnp.zeros(3), x, max_steps=5, tol=1e-3)
