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
    generate,
    init_posterior,
    inner_learning_rates,
    kl_to_prior,
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
    np.testing.assert_allclose(kl_to_prior(post), [expected], rtol=1e-6)
    # The prior itself has KL 0; the batch axis is kept.
    zero = Posterior(jnp.zeros((3, 2, 4, 5)), jnp.zeros((3, 2, 4, 5)))
    np.testing.assert_allclose(kl_to_prior(zero), np.zeros(3), atol=1e-7)


def test_inner_learning_rate_is_cosine_to_a_tenth():
    lrs = inner_learning_rates(TINY, 5)
    np.testing.assert_allclose(lrs[0], 0.3, rtol=1e-6)
    np.testing.assert_allclose(lrs[-1], 0.03, rtol=1e-6)
    np.testing.assert_allclose(lrs[2], 0.165, rtol=1e-6)
    assert np.all(np.diff(lrs) < 0)


def reference_inner_adam(model, batch, post0, eps_of_step, num_steps, *, weight_decay=0.0, span=None):
    """The inner loop written out by hand: Adam (Kingma & Ba 2015, Alg. 1) on (mu, log sigma^2) of the
    summed negative ELBO, learning rate inner_lr -> inner_lr * end_ratio by a cosine over the steps
    (decay ratio t / span, span = num_steps - 1 by default); step t samples z with eps_of_step(t).
    ``weight_decay`` > 0 is torch's AdamW: x <- x - lr (adam step + weight_decay x)."""
    cfg = model.cfg
    span = max(num_steps - 1, 1) if span is None else span
    has_tokens = (batch["weights"].sum(-1) > 0).astype(jnp.float32)

    def neg_elbo(mu, logvar, eps):
        nll_B, _ = model.row_nll(mu + jnp.exp(0.5 * logvar) * eps, batch)
        kl_B = 0.5 * jnp.sum(mu * mu + jnp.exp(logvar) - logvar - 1.0, axis=(1, 2, 3))
        return jnp.sum(nll_B + cfg.kl_weight * kl_B * has_tokens)

    x = [post0.mu, post0.logvar]
    m = [jnp.zeros_like(a) for a in x]
    v = [jnp.zeros_like(a) for a in x]
    values = []
    end = cfg.inner_lr * cfg.inner_lr_end_ratio
    for t in range(num_steps):
        lr = end + (cfg.inner_lr - end) * 0.5 * (1.0 + math.cos(math.pi * t / span))
        value, g = jax.value_and_grad(neg_elbo, argnums=(0, 1))(*x, eps_of_step(t))
        values.append(value)
        for i in range(2):
            m[i] = cfg.inner_b1 * m[i] + (1.0 - cfg.inner_b1) * g[i]
            v[i] = cfg.inner_b2 * v[i] + (1.0 - cfg.inner_b2) * g[i] * g[i]
            m_hat = m[i] / (1.0 - cfg.inner_b1 ** (t + 1))
            v_hat = v[i] / (1.0 - cfg.inner_b2 ** (t + 1))
            x[i] = x[i] - lr * (m_hat / (jnp.sqrt(v_hat) + cfg.inner_eps) + weight_decay * x[i])
    return Posterior(*x), jnp.stack(values)


@pytest.mark.parametrize("resample", [False, True], ids=["fixed_eps", "resampled_eps"])
def test_inner_loop_is_adam_on_the_cosine_schedule(resample):
    """The model's optax inner loop equals the hand-written Adam step for step (non-default b1, b2,
    eps and schedule end, so each of them matters); with an ``eps_key`` step t uses its own eps.
    One decoder layer: the optimiser does not depend on the depth, and the compile stays short."""
    model = make(
        num_layers=1, inner_b1=0.8, inner_b2=0.95, inner_eps=1e-2, inner_lr=0.2, inner_lr_end_ratio=0.25, kl_weight=0.5
    )
    graphdef, params = nnx.split(model)
    batch = text_batch()
    shape = model.cfg.latent_shape(B)
    eps = jax.random.normal(jax.random.key(4), shape)
    eps_key = jax.random.key(9) if resample else None
    post0 = init_posterior(model.cfg, B, jax.random.key(6))

    def eps_of_step(t):
        return jax.random.normal(jax.random.fold_in(eps_key, t), shape) if resample else eps

    @jax.jit
    def run(params):
        m = nnx.merge(graphdef, params)
        post, trace, _ = m.infer_posterior(batch, post0, eps, 4, eps_key=eps_key)
        return post, trace, reference_inner_adam(m, batch, post0, eps_of_step, 4)

    post, trace, (ref_post, ref_trace) = run(params)
    assert float(jnp.abs(ref_post.mu - post0.mu).max()) > 1e-2  # the steps moved the posterior
    np.testing.assert_allclose(post.mu, ref_post.mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(post.logvar, ref_post.logvar, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(trace, ref_trace, rtol=1e-6)


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
        return trace, nll0_B.sum(), nll_B.sum(), kl_to_prior(post).sum()

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
        (loss, metrics), g = jax.value_and_grad(
            lambda p: nnx.merge(graphdef, p).loss(batch, rng=rng)[:2], has_aux=True
        )(params)
        post, eps, _, _ = nnx.merge(graphdef, params)._posterior_for(batch, TINY.inner_steps, rng)
        z = jax.lax.stop_gradient(sample_latents(post, eps))

        def at_fixed_z(p):
            nll_B, _ = nnx.merge(graphdef, p).row_nll(z, batch)
            return (nll_B.sum() + kl_to_prior(post).sum()) / n

        return loss, metrics, g, jax.grad(at_fixed_z)(params)

    loss, metrics, g_off, g_fixed = grads(params)
    np.testing.assert_allclose(flat(g_off), flat(g_fixed), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss, metrics["nll"] + metrics["kl"], rtol=1e-5)
    assert metrics["inner_first"] > loss  # the inner loop improved the objective


def test_inner_grads_to_decoder_adds_the_inner_steps_gradients():
    """Flag on: the gradient differs from flag off by exactly the inner steps' decoder gradients / N.
    (One layer, two inner steps: the routing is the same at any size, and the compile stays short.)"""
    small = dict(num_layers=1, inner_steps=2)
    batch = text_batch()
    rng = jax.random.key(5)
    graphdef, params = nnx.split(make(**small))
    graphdef_on, _ = nnx.split(make(inner_grads_to_decoder=True, **small))
    n = batch["weights"].sum()

    @jax.jit
    def grads(params):
        g_off = jax.grad(lambda p: nnx.merge(graphdef, p).loss(batch, rng=rng).loss)(params)
        g_on = jax.grad(lambda p: nnx.merge(graphdef_on, p).loss(batch, rng=rng).loss)(params)
        _, _, _, acc = nnx.merge(graphdef_on, params)._posterior_for(batch, small["inner_steps"], rng, True)
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
    ("field", "value"),
    [
        ("num_latents", 0),
        ("window", 0),
        ("inner_lr", 0.0),
        ("inner_lr_end_ratio", 1.5),
        ("latent_positions", "middle"),
        ("inner_optimizer", "sgd"),
        ("inner_schedule", "linear"),
        ("inner_weight_decay", -0.1),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        dataclasses.replace(TINY, **{field: value})


def test_paper_latent_positions_need_room_for_every_latent():
    """latent_positions='paper' spaces the latents latent_span // (num_latents * num_layers) apart: a span
    shorter than num_latents * num_layers (interval 0) is an error naming latent_span."""
    with pytest.raises(ValueError, match="model.latent_span"):
        dataclasses.replace(TINY, latent_positions="paper", latent_span=5)


def test_paper_latent_positions_follow_the_authors_interval():
    """'paper': k * (latent_span // (num_latents * num_layers)) (16 // 6 = 2: 0, 2, 4), the same for every
    layer; 'spread' (ours): evenly over [0, latent_span - 1]; the positions reach the decoder's logits."""
    paper, spread = make(latent_positions="paper"), make()
    np.testing.assert_allclose(paper.latent_positions(), [[0.0, 2.0, 4.0]])
    np.testing.assert_allclose(spread.latent_positions(), [[0.0, 7.5, 15.0]])
    _, params = nnx.split(spread)
    graphdef_paper, _ = nnx.split(paper)
    z = jax.random.normal(jax.random.key(3), TINY.latent_shape(B))
    a = jax.jit(lambda p: nnx.merge(graphdef_paper, p).decode(z, tokens()))(params)
    b = jax.jit(lambda p: spread.decode(z, tokens()))(params)
    assert float(jnp.abs(a - b).max()) > 1e-4  # same weights, other positions: other logits


def test_paper_inner_schedule_decays_by_t_over_steps():
    """'paper' (the authors'): lr_t = end + (lr - end) (1 + cos(pi t / N)) / 2, so step N - 1 is above the end."""
    cfg = dataclasses.replace(TINY, inner_schedule="paper")
    lrs = np.asarray(inner_learning_rates(cfg, 4))
    end = 0.03
    expected = [end + (0.3 - end) * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert lrs[-1] > end * 1.5


def test_inner_loop_is_adamw_on_the_paper_schedule():
    """inner_optimizer='adamw' with inner_schedule='paper' equals the hand-written torch AdamW (decoupled
    decay on mu and log sigma^2; a large decay so that it matters) on the authors' schedule, step for step."""
    # The Adam test's non-default b1, b2, eps and schedule: with b2 = 0.999 and eps ~ 0 Adam divides tiny
    # gradients by their own size and amplifies the scan's float32 rounding (~2e-6, with or without decay).
    model = make(
        num_layers=1,
        inner_optimizer="adamw",
        inner_weight_decay=0.5,
        inner_schedule="paper",
        inner_b1=0.8,
        inner_b2=0.95,
        inner_eps=1e-2,
        inner_lr=0.2,
        inner_lr_end_ratio=0.25,
        kl_weight=0.5,
    )
    graphdef, params = nnx.split(model)
    batch = text_batch()
    eps = jax.random.normal(jax.random.key(4), model.cfg.latent_shape(B))
    post0 = init_posterior(model.cfg, B, jax.random.key(6))

    @jax.jit
    def run(params):
        m = nnx.merge(graphdef, params)
        post, trace, _ = m.infer_posterior(batch, post0, eps, 3)
        ref = reference_inner_adam(m, batch, post0, lambda t: eps, 3, weight_decay=0.5, span=3)
        plain = reference_inner_adam(m, batch, post0, lambda t: eps, 3, span=3)
        return post, trace, ref, plain

    post, trace, (ref_post, ref_trace), (plain_post, _) = run(params)
    assert float(jnp.abs(ref_post.logvar - plain_post.logvar).max()) > 1e-2  # the decay moved log sigma^2
    np.testing.assert_allclose(post.mu, ref_post.mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(post.logvar, ref_post.logvar, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(trace, ref_trace, rtol=1e-6)


def test_elbo_reports_the_paper_protocol():
    """paper_ppl_sum = sum over sequences of exp((NLL_i + KL_i) / T_i) at the eps the posterior was fitted
    to (the authors' evaluation), beside the bound; padded rows count neither as sequences nor as tokens."""
    model = make()
    graphdef, params = nnx.split(model)
    batch = text_batch()
    batch["weights"] = batch["weights"].at[1].set(0.0)  # row 1 is padding
    rng = jax.random.key(11)

    @jax.jit
    def run(p):
        m = nnx.merge(graphdef, p)
        out = m.elbo(batch, 2, rng, num_samples=1)
        post, eps, _, _ = m._posterior_for(batch, 2, jax.random.split(rng)[0])
        nll_B, _ = m.row_nll(sample_latents(post, eps), batch)
        return out, nll_B, kl_to_prior(post)

    out, nll_B, kl_B = run(params)
    t0 = float(batch["weights"][0].sum())
    np.testing.assert_allclose(float(out["paper_ppl_sum"]), math.exp((nll_B[0] + kl_B[0]) / t0), rtol=1e-5)
    assert float(out["num_sequences"]) == 1.0


def test_published_configs_use_the_paper_settings():
    """ltm_s / ltm_m / ltm_l: the authors' inner loop (AdamW, decay 0.01, their schedule, mu_0 = 0) and
    latent positions, 512 x 1024 = 524,288 tokens per step; LTM-M 96 latents (16 per layer) and LTM-L 96
    (8 per layer) with 64 inner steps, LTM-S 24 (8 per layer) with 16."""
    from pathlib import Path

    from looped_jax.config import load_config

    root = Path(__file__).resolve().parents[2] / "configs"
    expected = {"ltm_s": (3, 8, 16), "ltm_m": (6, 16, 64), "ltm_l": (12, 8, 64)}
    for name, (layers, latents, steps) in expected.items():
        cfg = load_config(root / f"{name}.py")
        m = cfg.model
        assert (m.num_layers, m.num_latents, m.inner_steps) == (layers, latents, steps), name
        assert (m.inner_optimizer, m.inner_weight_decay, m.inner_schedule) == ("adamw", 0.01, "paper"), name
        assert (m.latent_positions, m.init_mu_std, m.inner_lr) == ("paper", 0.0, 0.3), name
        assert cfg.train.global_batch_size * cfg.data.seq_len == 524_288, name
    cpu = load_config(root / "ltm_cpu.py").model
    assert (cpu.inner_optimizer, cpu.inner_schedule, cpu.latent_positions) == ("adam", "cosine", "spread")


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
    np.testing.assert_allclose(out["kl_sum"], kl_to_prior(post0).sum(), rtol=1e-5)
    assert float(out["nll_sum"]) != float(out["nll_sum_fitted_eps"])
    assert float(out["num_tokens"]) == float(batch["weights"].sum())


def test_resampled_eps_inner_loop_still_ascends():
    """With ``resample_eps`` (fresh eps per step) the fresh-eps ELBO still improves with inner steps,
    and the flag reaches the inner loop (the fitted posterior differs from the fixed-eps one)."""
    graphdef, params = nnx.split(make(resample_eps=True, num_layers=1))
    graphdef_fixed, _ = nnx.split(make(num_layers=1))
    batch = text_batch()
    rng = jax.random.key(2)

    @jax.jit
    def run(p):
        one, many = (nnx.merge(graphdef, p).elbo(batch, k, rng, num_samples=4) for k in (1, 16))
        post, _, _, _ = nnx.merge(graphdef, p)._posterior_for(batch, 2, rng)
        post_fixed, _, _, _ = nnx.merge(graphdef_fixed, p)._posterior_for(batch, 2, rng)
        return one, many, post.mu - post_fixed.mu

    one, many, mu_change = run(params)
    assert float(many["nll_sum"] + many["kl_sum"]) < float(one["nll_sum"] + one["kl_sum"])
    assert float(jnp.abs(mu_change).max()) > 1e-3


def test_evaluate_needs_a_static_inner_step_count():
    """``evaluate(num_loops=...)`` sets the inner step count, a scan length: a traced value is an error naming it."""
    model = make()
    batch = text_batch()
    with pytest.raises(ValueError, match="num_loops of a latent_thought model"):
        jax.jit(lambda n: model.evaluate(batch, num_loops=n))(jnp.int32(2))
    with pytest.raises(ValueError, match="num_loops"):
        model.evaluate(batch, num_loops=-1)


def test_inner_loop_computes_the_latent_free_prefix_once():
    """The embedding and the first layer's self-attention do not depend on z: the inner loop takes them from
    outside (decode with prefix_BTD is the same function, bit for bit)."""
    from looped_jax.jaxpr_flops import loop_invariant_flops

    model, batch = make(), text_batch()
    z = jax.random.normal(jax.random.key(5), TINY.latent_shape(B))
    pos, seg = batch["positions"], batch["segment_ids"]
    full = model.decode(z, batch["inputs"], pos, seg)
    cut = model.decode(z, batch["inputs"], pos, seg, prefix_BTD=model.decode_prefix(batch["inputs"], pos, seg))
    np.testing.assert_array_equal(cut, full)
    with pytest.raises(ValueError, match="prefix_BTD must have shape"):
        model.decode(z, batch["inputs"], pos, seg, prefix_BTD=jnp.zeros((B, T, 3)))

    post0 = init_posterior(TINY, B, jax.random.key(2))
    eps = jax.random.normal(jax.random.key(3), TINY.latent_shape(B))
    # what stays is the first cross-attention's query projection of the prefix: a plain dot, which XLA hoists
    # itself (the self-attention may be a Pallas kernel, which it does not)
    q_proj = 2 * B * T * TINY.d_model * TINY.num_heads * TINY.head_dim
    jaxpr = jax.make_jaxpr(lambda: model.infer_posterior(batch, post0, eps, TINY.inner_steps)[0])()
    assert loop_invariant_flops(jaxpr) == q_proj
    # with the decoder's gradients wanted the prefix depends on the differentiated weights and stays inside
    jaxpr = jax.make_jaxpr(lambda: model.infer_posterior(batch, post0, eps, 4, decoder_grads=True)[0])()
    assert loop_invariant_flops(jaxpr) > q_proj
