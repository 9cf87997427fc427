"""Looped transformer: weight sharing, unshared baseline, block repeat, training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from looped_jax.models import LoopedConfig, build_model, count_params

TINY = LoopedConfig(
    vocab_size=37, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64, num_layers=2, num_loops=3
)


def make(**kw):
    return build_model(dataclasses.replace(TINY, **kw), rngs=nnx.Rngs(0))


def call(model, x, **kw):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s: nnx.merge(graphdef, s)(x, **kw))(state)


def body_params(model):
    return sum(a.size for a in jax.tree.leaves(nnx.state(model.body, nnx.Param)))


def test_param_counts():
    shared, unshared, repeat = make(), make(share_weights=False), make(block_repeat=3)
    assert body_params(unshared) == TINY.num_loops * body_params(shared)
    assert count_params(repeat) == count_params(shared)
    other = count_params(shared) - body_params(shared)
    assert count_params(unshared) == other + TINY.num_loops * body_params(shared)
    baseline = make(share_weights=False, num_loops=1, num_layers=TINY.num_layers * TINY.num_loops)
    assert count_params(baseline) == count_params(unshared)
    axes = jax.tree.leaves(nnx.state(unshared.body, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert all(v.get_metadata()["logical_axes"][0] == "layers" and v.shape[0] == TINY.num_loops for v in axes)


def test_forward_shapes_and_num_loops():
    x = jax.random.randint(jax.random.key(0), (2, 8), 0, TINY.vocab_size)
    model = make(input_injection=True, block_repeat=2)
    logits = call(model, x)
    assert logits.shape == (2, 8, TINY.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(call(model, x, num_loops=jnp.int32(3)), logits, atol=1e-5, rtol=1e-5)
    assert not np.allclose(call(model, x, num_loops=1), logits)
    with pytest.raises(ValueError, match="num_loops"):
        make(share_weights=False)(x, num_loops=2)


def test_unshared_equals_explicit_layers():
    """share_weights=False with L loop bodies == applying the L bodies one after another."""
    model = make(share_weights=False, input_injection=True)
    x = jax.random.randint(jax.random.key(0), (2, 8), 0, TINY.vocab_size)
    graphdef, params = nnx.split(model.body)
    e = model.embed_tokens(x)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    h = jnp.zeros_like(e)
    for i in range(TINY.num_loops):
        h, _ = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], params))(h, e, pos)
    np.testing.assert_allclose(call(model, x), model.head(h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(share_weights=False, num_loops=1, num_layers=2)])
def test_overfit(kw):
    model = make(**kw)
    x = jax.random.randint(jax.random.key(1), (2, 9), 3, TINY.vocab_size)
    b = dict(
        inputs=x[:, :-1],
        targets=x[:, 1:],
        weights=jnp.ones((2, 8)),
        segment_ids=jnp.ones((2, 8), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(8), (2, 8)),
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state):
        f = lambda p: nnx.merge(graphdef, p, rest).loss(b, rng=jax.random.key(0))[:2]
        (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    losses = []
    for _ in range(50):
        params, opt_state, metrics = train_step(params, opt_state)
        losses.append(float(metrics["loss"]))
    assert {"loss", "accuracy", "num_loops"} <= set(metrics)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("field, value", [("num_loops", 0), ("block_repeat", 0), ("dtype", "int8"), ("num_layers", 0)])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        dataclasses.replace(TINY, **{field: value})


def test_sliding_window_limits_the_receptive_field():
    # One layer, one loop, window 4: the logits at position t see tokens t-3..t only.
    model = make(num_layers=1, num_loops=1, share_weights=False, window=4)
    x = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (1, 12)), jnp.int32)
    x2 = x.at[0, 2].set((x[0, 2] + 1) % TINY.vocab_size)
    a, b = np.asarray(call(model, x)), np.asarray(call(model, x2))
    changed = np.abs(a - b).max(-1)[0] > 1e-6
    assert changed.tolist() == [False, False, True, True, True, True] + [False] * 6
    full = make(num_layers=1, num_loops=1, share_weights=False)
    changed = np.abs(np.asarray(call(full, x)) - np.asarray(call(full, x2))).max(-1)[0] > 1e-6
    assert changed[2:].all() and not changed[:2].any()


def test_window_must_be_non_negative():
    with pytest.raises(ValueError, match="model.window"):
        dataclasses.replace(TINY, window=-1)
