"""The analysis on tiny instances of every looped family: finite numbers of the right shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax import analysis as an
from looped_jax.models import build_model
from looped_jax.models.gram import GramConfig
from looped_jax.models.hrm import HRMConfig
from looped_jax.models.loop_access import NotLoopingError, loop_spec
from looped_jax.models.looped import LoopedConfig
from looped_jax.models.recurrent_depth import RecurrentDepthConfig
from looped_jax.models.trm import TRMConfig

B, T, V = 2, 8, 11
R = 6

SMALL = dict(vocab_size=V, d_model=16, num_heads=2, head_dim=8, mlp_dim=32)
CONFIGS = {
    "recurrent_depth": RecurrentDepthConfig(
        **SMALL, num_kv_heads=2, num_prelude_layers=1, num_core_layers=2, num_coda_layers=1, mean_loops=4
    ),
    "looped": LoopedConfig(**SMALL, num_kv_heads=2, num_layers=1, num_loops=4),
    "hrm": HRMConfig(**SMALL, seq_len=T, num_h_layers=1, num_l_layers=1, puzzle_emb_dim=16, halt_max_steps=4),
    "trm": TRMConfig(
        **SMALL, seq_len=T, puzzle_emb_dim=16, puzzle_emb_len=2, latent_steps=2, recursions=2, halt_max_steps=4
    ),
    "gram": GramConfig(**SMALL, seq_len=T),
}


def batch():
    rng = np.random.default_rng(0)
    w = np.ones((B, T), np.float32)
    w[:, :2] = 0
    return {"inputs": rng.integers(0, V, (B, T)).astype(np.int32), "weights": w}


# Default suite: the recurrent-depth family; the others (~8-11 s each on 2 cores) are marked slow.
FAMILIES = [n if n == "recurrent_depth" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CONFIGS)]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = build_model(CONFIGS[request.param], rngs=nnx.Rngs(0))
    return request.param, model, loop_spec(model, batch())


def test_summaries_finite_and_shaped(family):
    name, _, spec = family
    ref = an.long_run_reference(spec, 2 * R)
    traj = an.trajectory(spec, R, period_window=3, reference_BTD=ref.state_BTD, track=[(0, 3)])
    for f in ("residual_RBT", "norm_RBT", "distance_RBT", "kl_RBT", "entropy_RBT"):
        x = getattr(traj, f)
        assert x.shape == (R, B, T), (name, f, x.shape)
        assert np.isfinite(x).all(), (name, f)
    assert traj.recurrence_RPBT.shape == (R, 3, B, T)
    assert traj.log_growth_RB.shape == (R, B) and np.isfinite(traj.log_growth_RB).all()
    assert traj.path_RND.shape[:2] == (R, 1)
    assert traj.token_mask_BT.sum() == B * (T - 2)
    assert (traj.residual_RBT > 0).any(), name  # the loop moves
    s = an.jacobian_spectrum(spec, ref.carry, power_steps=5, arnoldi_steps=3)
    assert s.radius_B.shape == (B,) and np.isfinite(s.radius_B).all() and (s.radius_B > 0).all(), name
    sh = an.shares(traj, R)
    assert abs(sum(sh[c] for c in an.CLASSES) - 1.0) < 1e-9


def test_probe_matches_step_and_statistics(family):
    name, _, spec = family
    if spec.probe is None:
        pytest.skip(f"{name} has no activation probe")
    new = spec.step(spec.params, spec.carry, spec.inputs)
    probed, acts = spec.probe(spec.params, spec.carry, spec.inputs)
    np.testing.assert_allclose(np.asarray(probed), np.asarray(new), rtol=1e-5, atol=1e-5)
    n_layers = acts["resid_LBTD"].shape[0]
    np.testing.assert_allclose(np.asarray(acts["attn_LBNTS"]).sum(-1), 1.0, atol=1e-5)
    traj = an.trajectory(spec, 3, activations=True, lyapunov=False)
    a = traj.acts
    assert a["massive_ratio"].shape == (3, n_layers) and (a["massive_ratio"] >= 1).all()
    assert a["attn_entropy_LN"].shape == (3, n_layers, 2)
    assert np.isnan(a["attn_overlap_LN"][0]).all()  # no previous map at step 1
    ov = a["attn_overlap_LN"][1:]
    assert ((ov > 0) & (ov <= 1 + 1e-5)).all()
    assert ((a["mlp_hoyer"] >= 0) & (a["mlp_hoyer"] <= 1)).all()


def test_non_looping_and_unknown_refused():
    unshared = build_model(LoopedConfig(**SMALL, num_kv_heads=2, num_loops=2, share_weights=False), rngs=nnx.Rngs(0))
    with pytest.raises(NotLoopingError, match="share_weights"):
        loop_spec(unshared, batch())
    one = build_model(
        HRMConfig(**SMALL, seq_len=T, h_cycles=1, l_cycles=1, halt_max_steps=1, puzzle_emb_dim=0), rngs=nnx.Rngs(0)
    )
    with pytest.raises(NotLoopingError, match="plain transformer"):
        loop_spec(one, batch())

    class Other(nnx.Module):
        cfg = type("C", (), {"name": "titans"})()

    with pytest.raises(ValueError, match="no loop accessor for model family 'titans'"):
        loop_spec(Other(), batch())


@pytest.mark.slow
def test_segment_jacobian_is_not_cut_by_stop_gradient():
    """HRM's own segment detaches its carry; the accessor's rebuilt segment must not."""
    model = build_model(CONFIGS["hrm"], rngs=nnx.Rngs(0))
    spec = loop_spec(model, batch())
    z = spec.carry
    new = spec.step(spec.params, z, spec.inputs)
    ref, _, _, _ = model.segment(z, {k: jnp.asarray(v) for k, v in spec.inputs.items()})
    np.testing.assert_allclose(np.asarray(new[0]), np.asarray(ref[0]), rtol=1e-5, atol=1e-5)
    _, jv = jax.jvp(lambda c: spec.step(spec.params, c, spec.inputs), (z,), (jax.tree.map(jnp.ones_like, z),))
    assert float(jnp.abs(jv[0]).max()) > 0
