"""scripts/retrofit.py: a tiny random Llama (tests/fixtures/llama, made by
scripts/make_parity_fixtures.py llama with transformers) retrofitted into a recurrent-depth model
reproduces the original's logits at one loop."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.export import load_params_safetensors, model_from_params

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures" / "llama"
sys.path.insert(0, str(REPO / "scripts"))
import retrofit  # noqa: E402


@pytest.fixture(scope="module")
def ref():
    return np.load(FIX / "official_outputs.npz")


def test_one_loop_reproduces_llama(ref, tmp_path):
    out = retrofit.main(["--hf_dir", str(FIX / "checkpoint"), "--prelude", "0,1", "--core", "2-3", "--coda", "4,5",
                         "--out", str(tmp_path / "r")])  # fmt: skip
    cfg, params = load_params_safetensors(out)
    assert (cfg.num_prelude_layers, cfg.num_core_layers, cfg.num_coda_layers, cfg.norm_style) == (2, 2, 2, "pre")
    model = model_from_params(cfg, params)
    ids = jnp.asarray(ref["input_ids"])
    forward = nnx.jit(lambda m, x, r: m(x, num_loops=1, rng=r))
    for rng in (None, jax.random.key(3)):  # the adapter ignores the state: s_0 noise changes nothing at one loop
        got = np.asarray(forward(model, ids, rng))
        np.testing.assert_allclose(got, ref["logits"], rtol=1e-5, atol=1e-5)
    # the [0; I] adapter ignores the state, so at initialisation every loop count gives the original
    # model; continued training (with the recurrence curriculum) teaches the core to use the state
    np.testing.assert_allclose(np.asarray(model(ids, num_loops=3)), ref["logits"], rtol=1e-5, atol=1e-5)


def test_layer_selection_errors():
    with pytest.raises(ValueError, match=r"--coda layer indices \[9\]"):
        retrofit.retrofit_llama(FIX / "checkpoint", [0], [1], [9])


def test_curriculum_mean_loops_moves_the_sampled_depth():
    """The trainer's recurrence curriculum passes a traced mean; E[r] = max(mean, k) + 1 (Eq. 2)."""
    from looped_jax.config import TrainConfig
    from looped_jax.models.recurrent_depth import RecurrentDepthConfig, RecurrentDepthModel

    model = nnx.eval_shape(
        lambda: RecurrentDepthModel(RecurrentDepthConfig(mean_loops=16, grad_steps=1), rngs=nnx.Rngs(0))
    )
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.jit(jax.vmap(lambda k, m: model.sample_num_loops(k, m), in_axes=(0, None)))
    for mean in (2.0, 8.0, 16.0):
        assert abs(float(draw(keys, jnp.float32(mean)).mean()) - (mean + 1)) < 0.05 * (mean + 1)
    default = jax.vmap(model.sample_num_loops)(keys[:200])
    np.testing.assert_array_equal(default, draw(keys[:200], jnp.float32(16.0)))  # same draws as the fixed mean
    with pytest.raises(ValueError, match="mean_loops_ramp_start"):
        TrainConfig(mean_loops_ramp_steps=10, mean_loops_ramp_start=0.5)
