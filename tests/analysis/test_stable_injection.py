"""Stable injection: the state path of the recurrent-depth adapter has spectral radius < 1."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from looped_jax.config import load_config
from looped_jax.models.recurrent_depth import RecurrentDepthConfig, RecurrentDepthModel

CFG = dict(
    vocab_size=11,
    d_model=16,
    num_heads=2,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=32,
    num_prelude_layers=0,
    num_core_layers=1,
    num_coda_layers=0,
    mean_loops=2,
    grad_steps=1,
)


def test_state_path_contractive_for_any_rate():
    model = RecurrentDepthModel(RecurrentDepthConfig(**CFG, stable_injection=True), rngs=nnx.Rngs(0))
    assert not hasattr(model.core, "adapter_ED")
    rng = np.random.default_rng(0)
    for log_rate in (-20.0, -1.0, 0.0, 3.0):
        model.core.log_rate_D[...] = jnp.asarray(rng.normal(size=16) + log_rate, jnp.float32)
        s = jnp.asarray(rng.normal(size=(1, 3, 16)), jnp.float32)
        e = jnp.asarray(rng.normal(size=(1, 3, 16)), jnp.float32)
        jac = jax.jacobian(lambda s: model.core.inject(s, e)[0, 1])(s)[:, 0, 1]  # d x_1 / d s_1: diagonal
        np.testing.assert_allclose(jac, np.diag(np.diag(jac)), atol=0)
        assert np.abs(np.linalg.eigvals(jac)).max() < 1.0
    # Injection is normalised: scaling the prelude output does not change it.
    a = model.core.inject(jnp.zeros((1, 3, 16)), e)
    np.testing.assert_allclose(
        model.core.inject(jnp.zeros((1, 3, 16)), 100.0 * e), a, rtol=1e-4, atol=1e-5
    )  # eps of the norm


def test_default_has_the_paper_adapter_and_config_file():
    model = RecurrentDepthModel(RecurrentDepthConfig(**CFG), rngs=nnx.Rngs(0))
    assert hasattr(model.core, "adapter_ED") and not hasattr(model.core, "log_rate_D")
    cfg = load_config("configs/recurrent_depth_chains_stable.py")
    assert cfg.model.stable_injection and cfg.train.output_dir.endswith("_stable")
    base = load_config("configs/recurrent_depth_chains.py")
    assert dataclasses_equal_except(cfg.model, base.model, "stable_injection")


def dataclasses_equal_except(a, b, field):
    import dataclasses

    return dataclasses.replace(a, **{field: getattr(b, field)}) == b
