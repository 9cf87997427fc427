"""Latent-Thought Model: KL formula, inner-loop ELBO ascent, gradient routing, masks, banks, generation."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.models import build_model
from looped_jax.models.latent_thought import (
    LatentThoughtConfig,
    LatentThoughtModel,
    Posterior,
    gaussian_kl,
    generate,
    init_posterior,
    inner_learning_rates,
    next_token_batch,
    sample_latents,
)

TINY = LatentThoughtConfig(
    vocab_size=37,
    d_model=32,
    num_heads=2,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=64,
    num_layers=2,
    num_latents=3,
    window=4,
    latent_span=16,
    inner_steps=4,
)
B, T = 2, 16


def make(**kw) -> LatentThoughtModel:
    return build_model(dataclasses.replace(TINY, **kw), rngs=nnx.Rngs(0))


def tokens(seed=1, shape=(B, T)):
    return jax.random.randint(jax.random.key(seed), shape, 3, TINY.vocab_size)


def text_batch(seed=1):
    x = tokens(seed)
    batch = next_token_batch(x)
    batch["positions"] = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    batch["segment_ids"] = jnp.ones((B, T), jnp.int32)
    return batch


def test_kl_matches_hand_computation():
    # mu = (1, 0), sigma^2 = (1, 2): 0.5 * (1 + 1 - 0 - 1) + 0.5 * (0 + 2 - ln 2 - 1)
    post = Posterior(jnp.array([[1.0, 0.0]]), jnp.log(jnp.array([[1.0, 2.0]])))
    expected = 0.5 + 0.5 * (1.0 - math.log(2.0))
    np.testing.assert_allclose(gaussian_kl(post), [expected], rtol=1e-6)
    # The prior itself has KL 0; the batch axis is kept.
    zero = Posterior(jnp.zeros((3, 2, 4, 5)), jnp.zeros((3, 2, 4, 5)))
    np.testing.assert_allclose(gaussian_kl(zero), np.zeros(3), atol=1e-7)


def test_inner_learning_rate_is_cosine_to_a_tenth():
    lrs = inner_learning_rates(TINY, 5)
    np.testing.assert_allclose(lrs[0], 0.3, rtol=1e-6)
    np.testing.assert_allclose(lrs[-1], 0.03, rtol=1e-6)
    np.testing.assert_allclose(lrs[2], 0.165, rtol=1e-6)
    assert np.all(np.diff(lrs) < 0)


@pytest.fixture(scope="module")
def inner_runs():
    """16 inner steps on a fixed batch from the paper's init and from the prior's variance (one compile)."""
    model = make()
    graphdef, params = nnx.split(model)
    batch = text_batch()
    eps = jax.random.normal(jax.random.key(4), TINY.latent_shape(B))
    shape = TINY.latent_shape(B)
    paper = Posterior(0.01 * jax.random.normal(jax.random.key(5), shape), jnp.full(shape, -5.0))
    prior_var = Posterior(jnp.zeros(shape), jnp.zeros(shape))

    @jax.jit
    def run(params, post0):
        m = nnx.merge(graphdef, params)
        post, trace, _ = m.infer_posterior(batch, post0, eps, 16)
        nll_B, _ = m.row_nll(sample_latents(post, eps), batch)
        nll0_B, _ = m.row_nll(sample_latents(post0, eps), batch)
        return trace, nll0_B.sum(), nll_B.sum(), gaussian_kl(post).sum()

    return {name: [np.asarray(a) for a in run(params, p0)] for name, p0 in (("paper", paper), ("prior", prior_var))}


def test_inner_loop_increases_elbo(inner_runs):
    """On a fixed batch the negative ELBO (same eps) falls along the inner trajectory and after it."""
    trace, _, nll, kl = inner_runs["paper"]
    final = nll + kl
    checkpoints = np.append(trace[::4], final)
    assert np.all(np.diff(checkpoints) < 0), trace
    assert final < 0.5 * trace[0], (final, trace)


def test_inner_loop_improves_reconstruction(inner_runs):
    """Started at the prior's variance (KL = 0), the ELBO gain must come from log p(x | z)."""
    trace, nll0, nll, kl = inner_runs["prior"]
    np.testing.assert_allclose(trace[0], nll0, rtol=1e-5)  # KL(prior || prior) = 0
    assert nll + kl < nll0
    assert nll < nll0 - 1.0, (nll0, nll)


def test_outer_gradient_sees_only_the_final_latents():
    """Flag off (default): d loss / d theta equals the gradient of the ELBO at the final z held fixed."""
    batch = text_batch()
    rng = jax.random.key(5)
    graphdef, params = nnx.split(make())
    n = batch["weights"].sum()

    @jax.jit
    def grads(params):
        (loss, metrics), g = jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(batch, rng=rng), has_aux=True)(
            params
        )
        post, eps, _, _ = nnx.merge(graphdef, params)._posterior_for(batch, TINY.inner_steps, rng)
        z = jax.lax.stop_gradient(sample_latents(post, eps))

        def at_fixed_z(p):
            nll_B, _ = nnx.merge(graphdef, p).row_nll(z, batch)
            return (nll_B.sum() + gaussian_kl(post).sum()) / n

        return loss, metrics, g, jax.grad(at_fixed_z)(params)

    loss, metrics, g_off, g_fixed = grads(params)
    np.testing.assert_allclose(flat(g_off), flat(g_fixed), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss, metrics["nll"] + metrics["kl"], rtol=1e-5)
    assert metrics["inner_first"] > loss  # the inner loop improved the objective


@pytest.mark.slow
def test_inner_grads_to_decoder_adds_the_inner_steps_gradients():
    """Flag on: the gradient differs from flag off by exactly the inner steps' decoder gradients / N."""
    batch = text_batch()
    rng = jax.random.key(5)
    graphdef, params = nnx.split(make())
    graphdef_on, _ = nnx.split(make(inner_grads_to_decoder=True))
    n = batch["weights"].sum()

    @jax.jit
    def grads(params):
        g_off = jax.grad(lambda p: nnx.merge(graphdef, p).loss(batch, rng=rng)[0])(params)
        g_on = jax.grad(lambda p: nnx.merge(graphdef_on, p).loss(batch, rng=rng)[0])(params)
        _, _, _, acc = nnx.merge(graphdef_on, params)._posterior_for(batch, TINY.inner_steps, rng, True)
        return g_off, g_on, acc

    g_off, g_on, acc = grads(params)
    inner = flat(acc) / float(n)
    assert np.abs(inner).max() > 1e-3
    np.testing.assert_allclose(flat(g_on) - flat(g_off), inner, rtol=1e-4, atol=1e-6)


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_causal_sliding_window_given_fixed_latents():
    """A changed token at position t changes logits at t .. t + layers * (window - 1) only."""
    model = make()
    graphdef, params = nnx.split(model)
    z = jax.random.normal(jax.random.key(7), TINY.latent_shape(B))
    x = tokens()
    t = 5
    x2 = x.at[:, t].set((x[:, t] + 1 - 3) % (TINY.vocab_size - 3) + 3)
    decode = jax.jit(lambda p, x: nnx.merge(graphdef, p).decode(z, x))
    diff = np.abs(np.asarray(decode(params, x) - decode(params, x2))).max(axis=(0, 2))
    reach = t + TINY.num_layers * (TINY.window - 1)
    assert np.all(diff[:t] == 0), diff
    assert np.all(diff[t : reach + 1] > 1e-6), diff
    assert np.all(diff[reach + 1 :] == 0), diff
    # The same holds with explicit positions/segments (the masked, non-fused path).
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = jnp.ones((B, T), jnp.int32)
    dec2 = jax.jit(lambda p, x: nnx.merge(graphdef, p).decode(z, x, pos, seg))
    np.testing.assert_allclose(dec2(params, x), decode(params, x), atol=1e-5)
    logits = jax.jit(lambda p: nnx.merge(graphdef, p)(x, num_loops=0))(params)  # posterior = its init
    assert logits.shape == (B, T, TINY.vocab_size)


def test_layer_reads_only_its_own_bank():
    """Silencing layer l's cross-attention output removes every effect of bank l and of no other bank."""
    model = make()
    x = tokens()
    z = jax.random.normal(jax.random.key(8), TINY.latent_shape(B))
    for silenced in range(TINY.num_layers):
        graphdef, params = nnx.split(model)
        m = nnx.merge(graphdef, jax.tree.map(jnp.copy, params))
        o = m.blocks[silenced].cross_attn.o_NHD
        o[...] = jnp.zeros_like(o[...])
        decode = jax.jit(lambda z, m=m: m.decode(z, x))
        base = decode(z)
        for bank in range(TINY.num_layers):
            z2 = z.at[:, bank].add(1.0)
            changed = float(jnp.abs(decode(z2) - base).max())
            if bank == silenced:
                assert changed == 0.0, (silenced, bank)
            else:
                assert changed > 1e-4, (silenced, bank)


def test_generate_shapes_and_determinism():
    model = make()
    graphdef, params = nnx.split(model)
    prompt = tokens(shape=(B, 6))

    @jax.jit
    def run(params, rng):
        m = nnx.merge(graphdef, params)
        post = generate(m, prompt, num_new_tokens=5, rng=rng, num_inner_steps=2)
        prior_greedy = generate(m, prompt, num_new_tokens=5, rng=rng, from_prior=True, temperature=0.0)
        return post, prior_greedy

    a, b = run(params, jax.random.key(0)), run(params, jax.random.key(0))
    c = run(params, jax.random.key(1))
    for out in a:
        assert out.shape == (B, 11) and out.dtype == jnp.int32
        np.testing.assert_array_equal(out[:, :6], prompt)
        assert np.all((np.asarray(out) >= 0) & (np.asarray(out) < TINY.vocab_size))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) or not np.array_equal(a[1], c[1])


@pytest.mark.parametrize(
    ("field", "value"), [("num_latents", 0), ("window", 0), ("inner_lr", 0.0), ("inner_lr_end_ratio", 1.5)]
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        dataclasses.replace(TINY, **{field: value})


def test_decode_rejects_wrong_latent_shape():
    model = make()
    with pytest.raises(ValueError, match="latents must have shape"):
        model.decode(jnp.zeros((B, 1, 3, 32)), tokens())


def test_elbo_scores_with_fresh_eps():
    """``elbo`` estimates E_q log p(x | z) with eps independent of the one the posterior was fitted to."""
    model = make()
    graphdef, params = nnx.split(model)
    batch = text_batch()
    rng = jax.random.key(11)
    out = jax.jit(lambda p: nnx.merge(graphdef, p).elbo(batch, 0, rng, num_samples=2))(params)
    post0 = init_posterior(TINY, B, jax.random.split(jax.random.split(rng)[0], 3)[0])
    np.testing.assert_allclose(out["kl_sum"], gaussian_kl(post0).sum(), rtol=1e-5)
    assert float(out["nll_sum"]) != float(out["nll_sum_fitted_eps"])
    assert float(out["num_tokens"]) == float(batch["weights"].sum())


@pytest.mark.slow
def test_resampled_eps_inner_loop_still_ascends():
    """With ``resample_eps`` (fresh eps per step) the fresh-eps ELBO still improves with inner steps."""
    model = make(resample_eps=True)
    graphdef, params = nnx.split(model)
    batch = text_batch()
    run = jax.jit(lambda p: [nnx.merge(graphdef, p).elbo(batch, k, jax.random.key(2), num_samples=4) for k in (1, 16)])
    one, many = run(params)
    assert float(many["nll_sum"] + many["kl_sum"]) < float(one["nll_sum"] + one["kl_sum"])
