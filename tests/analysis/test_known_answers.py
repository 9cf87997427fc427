"""Known answers for the analysis toolkit on maps whose dynamics are known in closed form."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from looped_jax import analysis as an

B, T = 2, 3


def linear_spec(a_DD: np.ndarray, x0_BTD: np.ndarray, shift_D: np.ndarray | None = None, readout=False):
    """step(x) = A (x - c) + c: fixed point c, Jacobian A."""
    d = a_DD.shape[0]
    c = np.zeros(d) if shift_D is None else shift_D
    params = {"a": jnp.asarray(a_DD, jnp.float32), "c": jnp.asarray(c, jnp.float32)}
    params["w"] = jnp.asarray(np.random.default_rng(5).normal(size=(d, 7)), jnp.float32)

    def step(p, x, inputs):
        return jnp.einsum("de,bte->btd", p["a"], x - p["c"]) + p["c"]

    ro = (lambda p, x: x @ p["w"]) if readout else None
    return an.LoopSpec(step, params, jnp.asarray(x0_BTD, jnp.float32), None, readout=ro)


def matrix_with_eigs(eigs, seed=0):
    """A real matrix with the given eigenvalues (a complex pair as a 2x2 rotation-scaling block), non-normal."""
    rng = np.random.default_rng(seed)
    blocks = []
    for e in eigs:
        if isinstance(e, complex):
            r, th = abs(e), math.atan2(e.imag, e.real)
            blocks.append(r * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]]))
        else:
            blocks.append(np.array([[e]]))
    d = sum(b.shape[0] for b in blocks)
    m = np.zeros((d, d))
    i = 0
    for b in blocks:
        n = b.shape[0]
        m[i : i + n, i : i + n] = b
        i += n
    q = rng.normal(size=(d, d)) + 2 * np.eye(d)
    return q @ m @ np.linalg.inv(q)


def x0(d, seed=1):
    return np.random.default_rng(seed).normal(size=(B, T, d))


@pytest.mark.parametrize(
    "eigs, rho",
    [((0.9, 0.5, -0.3, 0.1), 0.9), ((0.8j + 0.0, 0.6, -0.5, 0.2), 0.8), ((-0.95, 0.94, 0.3), 0.95)],
)
def test_spectral_radius_of_linear_map(eigs, rho):
    a = matrix_with_eigs(eigs)
    spec = linear_spec(a, x0(a.shape[0]))
    s = an.jacobian_spectrum(spec, spec.carry, power_steps=30, arnoldi_steps=6)
    np.testing.assert_allclose(s.radius_B, rho, atol=1e-3)
    assert s.contractive_B.all()
    # The second-largest Ritz magnitude is the next eigenvalue's.
    mags = sorted({round(abs(e), 6) for e in eigs}, reverse=True)
    np.testing.assert_allclose(s.top_magnitudes_BM[:, 2 if isinstance(eigs[0], complex) else 1], mags[1], atol=1e-3)


def test_divergent_map_flagged():
    a = matrix_with_eigs((1.5, 0.4, 0.2))
    spec = linear_spec(a, x0(3))
    s = an.jacobian_spectrum(spec, spec.carry, power_steps=30, arnoldi_steps=4)
    np.testing.assert_allclose(s.radius_B, 1.5, atol=1e-3)
    assert not s.contractive_B.any()
    traj = an.trajectory(spec, 60, period_window=4)
    sh = an.shares(traj, 60)
    assert sh["diverged"] == 1.0 and sh["converged"] == 0.0
    assert an.shares(traj, 5)["diverged"] == 0.0  # growth 1.5^5 ~ 7.6 is not yet a blow-up
    np.testing.assert_allclose(traj.ftle_B, math.log(1.5), atol=0.03)


@pytest.mark.parametrize("period", [3, 5, 7])
def test_rotation_period_exact(period):
    th = 2 * math.pi / period
    a = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    spec = linear_spec(a, x0(2))
    traj = an.trajectory(spec, 40, period_window=8)
    cls, per = an.classify(traj, 40)
    assert (cls == 1).all() and (per == period).all()
    sh = an.shares(traj, 40)
    assert sh["cycling"] == 1.0 and sh["periods"] == {period: B * T}
    np.testing.assert_allclose(traj.ftle_B, 0.0, atol=1e-4)  # orthogonal: no growth or decay
    # More Arnoldi steps than the state size: the Krylov space breaks down after 2 and must stay exact.
    s = an.jacobian_spectrum(spec, spec.carry, power_steps=10, arnoldi_steps=5)
    np.testing.assert_allclose(s.radius_B, 1.0, atol=1e-4)
    np.testing.assert_allclose(s.top_magnitudes_BM[:, :2], 1.0, atol=1e-4)
    np.testing.assert_allclose(s.top_magnitudes_BM[:, 2:], 0.0, atol=1e-6)


def test_two_cycle():
    a = -np.eye(3)
    spec = linear_spec(a, x0(3))
    traj = an.trajectory(spec, 10, period_window=4)
    cls, per = an.classify(traj, 10)
    assert (cls == 1).all() and (per == 2).all()
    # Before step 2 the period-2 test has nothing to compare with: the orbit counts as wandering.
    assert (an.classify(traj, 1)[0] == 2).all()


def test_fixed_point_distance_and_rate():
    rho = 0.7
    d = 4
    c = np.array([1.0, -2.0, 0.5, 3.0])
    a = rho * np.eye(d)
    spec = linear_spec(a, x0(d), shift_D=c, readout=True)
    ref = an.long_run_reference(spec, 200)
    np.testing.assert_allclose(np.asarray(ref.state_BTD), np.broadcast_to(c, (B, T, d)), atol=1e-5)
    traj = an.trajectory(spec, 30, reference_BTD=ref.state_BTD)
    k = np.arange(1, 31)[:, None, None]
    want = rho**k * np.linalg.norm(x0(d) - c, axis=-1) / np.linalg.norm(c)
    np.testing.assert_allclose(traj.distance_RBT, want, rtol=2e-4, atol=1e-7)
    rate, slope = an.fit_rate(traj.distance_RBT, floor=1e-5)
    np.testing.assert_allclose(rate, rho, atol=1e-4)
    # Residual ||s_k - s_{k-1}|| / ||s_k|| falls geometrically too; the first step below a tolerance.
    xk = c + rho ** k[..., None] * (x0(d) - c)
    want_res = rho ** (k - 1) * (1 - rho) * np.linalg.norm(x0(d) - c, axis=-1) / np.linalg.norm(xk, axis=-1)
    np.testing.assert_allclose(traj.residual_RBT, want_res, rtol=1e-3, atol=1e-7)
    hit = an.first_step_below(traj.residual_RBT, 1e-3)
    manual = (traj.residual_RBT < 1e-3).argmax(0) + 1
    np.testing.assert_array_equal(hit, manual)
    assert (hit > 1).all()
    assert an.first_step_below(traj.residual_RBT, 1e-30).max() == 0  # never: 0
    # The readout settles: KL between successive readouts decreases to ~0, the argmax stops changing.
    assert traj.kl_RBT[-1].max() < 1e-8 < traj.kl_RBT[0].max()
    assert not traj.argmax_change_RBT[-5:].any()
    np.testing.assert_allclose(traj.ftle_B, math.log(rho), atol=1e-4)
    assert (an.classify(traj, 30)[0] == 0).all()


def test_tracked_path_and_pca():
    rho = 0.5
    a = rho * np.eye(3)
    spec = linear_spec(a, x0(3))
    traj = an.trajectory(spec, 12, track=[(0, 1), (1, 2)], lyapunov=False)
    assert traj.path_RND.shape == (12, 2, 3) and traj.log_growth_RB is None
    want = rho ** np.arange(1, 13)[:, None] * x0(3)[0, 1][None]
    np.testing.assert_allclose(traj.path_RND[:, 0], want, rtol=1e-5, atol=1e-7)
    coords, share = an.pca_2d(traj.path_RND[:, 0])
    np.testing.assert_allclose(share, [1.0, 0.0], atol=1e-9)  # a straight line to the origin
    np.testing.assert_allclose(np.abs(coords[:, 0]), np.linalg.norm(want - want.mean(0), axis=-1), rtol=1e-5)


def test_bad_arguments_named():
    spec = linear_spec(np.eye(2), x0(2))
    with pytest.raises(ValueError, match="num_steps"):
        an.trajectory(spec, 0)
    with pytest.raises(ValueError, match="probe"):
        an.trajectory(spec, 2, activations=True)
    with pytest.raises(ValueError, match="track"):
        an.trajectory(spec, 2, track=[(5, 0)])
    with pytest.raises(ValueError, match="step must be in"):
        an.classify(an.trajectory(spec, 2), 3)


def test_activation_statistics_known_values():
    from looped_jax.analysis import activations as A

    onehot = jnp.eye(8)[None]
    np.testing.assert_allclose(A.hoyer(onehot), 1.0, atol=1e-6)
    np.testing.assert_allclose(A.hoyer(jnp.ones((2, 8))), 0.0, atol=1e-6)
    x = jnp.ones((2, 5, 6)).at[1, 3, 4].set(-500.0)
    m = A.massive_activations(x)
    assert int(m["token"]) == 3 and int(m["dim"]) == 4
    np.testing.assert_allclose(float(m["ratio"]), 500.0)
    p = jnp.full((1, 2, 4, 4), 0.25)
    np.testing.assert_allclose(A.attention_entropy(p), math.log(4), rtol=1e-6)
    np.testing.assert_allclose(A.attention_overlap(p, p), 1.0, rtol=1e-6)
    q = jnp.broadcast_to(jnp.eye(4), (1, 2, 4, 4))
    np.testing.assert_allclose(A.attention_overlap(p, q), 0.25, rtol=1e-6)
    np.testing.assert_allclose(A.attention_column_sums(q), 1.0)
    h = jnp.array([0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(float(A.near_zero_share(h)), 0.5)
