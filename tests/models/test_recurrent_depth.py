"""Recurrent-depth model: shapes, params, traced depth, truncated backprop, sampling, exits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from looped_jax.models import MODEL_CONFIGS, RecurrentDepthConfig, build_model, count_params
from looped_jax.models.huginn_exit import ExitRule

TINY = RecurrentDepthConfig(
    vocab_size=37,
    d_model=32,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    mlp_dim=64,
    num_prelude_layers=1,
    num_core_layers=2,
    num_coda_layers=1,
    mean_loops=4,
    grad_steps=2,
)


def make(**kw):
    return build_model(dataclasses.replace(TINY, **kw), rngs=nnx.Rngs(0))


def call(model, x, **kw):
    """Jitted ``model(x, **kw)`` (eager scans are slow on CPU)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, kw: nnx.merge(graphdef, s)(x, **kw))(state, kw)


def batch(b=2, t=8, seed=1):
    x = jax.random.randint(jax.random.key(seed), (b, t + 1), 3, TINY.vocab_size)
    seg = jnp.ones((b, t), jnp.int32).at[0, 5:].set(2)  # two documents packed in row 0
    pos = jnp.broadcast_to(jnp.arange(t), (b, t)).at[0, 5:].add(-5)
    return dict(inputs=x[:, :-1], targets=x[:, 1:], weights=jnp.ones((b, t)), segment_ids=seg, positions=pos)


def test_shapes_and_param_count():
    model = make()
    c = TINY
    d, n, k, h, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
    block = d * n * h + 2 * d * k * h + n * h * d + n * h + k * h + 3 * d * f + 4 * d
    layers = c.num_prelude_layers + c.num_core_layers + c.num_coda_layers
    assert count_params(model) == c.vocab_size * d + layers * block + 2 * d * d + d
    logits = call(model, batch()["inputs"], num_loops=3)
    assert logits.shape == (2, 8, c.vocab_size) and logits.dtype == jnp.float32


def test_traced_num_loops_compiles_once_and_matches_static():
    model = make()
    b = batch()
    traces = []

    @jax.jit
    def run(state, n):
        traces.append(1)
        m = nnx.merge(graphdef, state)
        return m(b["inputs"], positions_BT=b["positions"], segment_ids_BT=b["segment_ids"], num_loops=n)

    graphdef, state = nnx.split(model)
    for n in (1, 3, 6):
        got = run(state, jnp.int32(n))
        if n != 3:
            want = model(b["inputs"], positions_BT=b["positions"], segment_ids_BT=b["segment_ids"], num_loops=n)
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert len(traces) == 1


def test_truncated_backprop_matches_reference():
    model = make(init_scale=0.0)
    b = batch()
    r, k = 4, TINY.grad_steps
    graphdef, state = nnx.split(model)

    def loss_engine(state):
        m = nnx.merge(graphdef, state)
        logits = m(b["inputs"], positions_BT=b["positions"], segment_ids_BT=b["segment_ids"], num_loops=jnp.int32(r))
        return jnp.mean(logits**2)

    def loss_reference(state):
        m = nnx.merge(graphdef, state)
        e, pos = m._prepare(b["inputs"], b["positions"], b["segment_ids"])
        step, params = m.core_step_fn()
        s = jnp.zeros_like(e)
        sg = jax.lax.stop_gradient
        for _ in range(r - k):
            s = step(sg(params), sg(s), sg((e, pos, b["segment_ids"])))
        for _ in range(k):
            s = step(params, s, (e, pos, b["segment_ids"]))
        return jnp.mean(m._logits(s, pos, b["segment_ids"]) ** 2)

    g1 = jax.jit(jax.grad(loss_engine))(state)
    g2 = jax.jit(jax.grad(loss_reference))(state)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-6, rtol=2e-4), g1, g2)
    # The first r - k iterations really are cut: full backprop gives a different gradient.
    full_graphdef, full_state = nnx.split(make(init_scale=0.0, grad_steps=r))

    def loss_full(state):
        m = nnx.merge(full_graphdef, state)
        return jnp.mean(m(b["inputs"], num_loops=r, positions_BT=b["positions"], segment_ids_BT=b["segment_ids"]) ** 2)

    a, c = jax.jit(jax.grad(loss_full))(full_state)["core"]["adapter_ED"][...], g1["core"]["adapter_ED"][...]
    assert float(jnp.abs(a - c).max()) > 1e-2 * float(jnp.abs(a).max())


def test_init_scale_zero_is_deterministic():
    x = batch()["inputs"]
    k1, k2 = jax.random.key(1), jax.random.key(2)
    for scale in (0.0, 1.0):
        graphdef, state = nnx.split(make(init_scale=scale))
        run = jax.jit(lambda s, rng: nnx.merge(graphdef, s)(x, num_loops=2, rng=rng))
        same = np.array_equal(run(state, k1), run(state, k2))
        assert same == (scale == 0.0)
        np.testing.assert_array_equal(run(state, k1), run(state, k1))


def test_sampled_loop_counts():
    model = make(mean_loops=8)
    keys = jax.random.split(jax.random.key(0), 4000)
    r = jax.vmap(model.sample_num_loops)(keys)
    assert r.dtype == jnp.int32 and int(r.min()) >= 1
    # E[r] = E[Poisson(e^tau)] + 1 = r_bar + 1 (Eq. 2).
    assert abs(float(r.mean()) - 9.0) < 0.35
    np.testing.assert_array_equal(jax.vmap(model.sample_num_loops)(keys), r)
    capped = make(mean_loops=8, max_train_loops=6)
    assert int(jax.vmap(capped.sample_num_loops)(keys).max()) == 6


def test_loss_metrics_and_overfit():
    model = make(mean_loops=2)
    b = batch()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, step):
        def f(p):
            return nnx.merge(graphdef, p, rest).loss(b, rng=jax.random.fold_in(jax.random.key(0), step))[:2]

        (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    losses = []
    for step in range(50):
        params, opt_state, metrics = train_step(params, opt_state, step)
        losses.append(float(metrics["loss"]))
    assert set(metrics) >= {"loss", "accuracy", "num_loops"}
    assert float(metrics["num_loops"]) >= 1
    assert losses[-1] < 0.5 * losses[0], losses
    loss, m, _ = nnx.merge(graphdef, params, rest).loss(b, rng=jax.random.key(0), train=False)
    assert float(m["num_loops"]) == 2


def test_adaptive_forward():
    model = make(init_scale=0.0)
    x = batch()["inputs"]
    graphdef, state = nnx.split(model)
    adaptive = lambda x, **kw: jax.jit(lambda s: nnx.merge(graphdef, s).adaptive_forward(x, **kw))(state)
    fixed = call(model, x, num_loops=6)
    for rule in (None, ExitRule("latent-diff", 0.0), ExitRule("kl", 0.0)):  # never exits early
        out = adaptive(x, max_loops=6, exit_rule=rule)
        np.testing.assert_array_equal(out.steps_BT, 6)
        np.testing.assert_allclose(out.logits_BTV, fixed, atol=1e-5, rtol=1e-5)
    out = adaptive(x, max_loops=6, exit_rule=ExitRule("latent-diff", 1e9))
    assert out.steps_BT.shape == x.shape
    np.testing.assert_array_equal(out.steps_BT, 1)
    np.testing.assert_allclose(out.logits_BTV, call(model, x, num_loops=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "field, value",
    [
        ("grad_steps", 0),
        ("mean_loops", 0),
        ("dtype", "float64"),
        ("num_kv_heads", 3),
        ("remat_policy", "bogus"),
        ("init_scale", -1.0),
        ("head_dim", 15),
    ],
)
def test_bad_config(field, value):
    with pytest.raises(ValueError, match="model.(num_heads|" + field + ")"):
        dataclasses.replace(TINY, **{field: value})


def test_registry():
    assert set(MODEL_CONFIGS) >= {"recurrent_depth", "looped"}

    @dataclasses.dataclass(frozen=True)
    class Bogus:
        name: str = "bogus"

    with pytest.raises(ValueError, match="model.name='bogus'.*looped"):
        build_model(Bogus(), rngs=nnx.Rngs(0))
