"""KV-cache generation: parity with the uncached forward, per-token exits and cache holes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.models import LoopedConfig, RecurrentDepthConfig, build_model
from looped_jax.models.generate import (
    ExitRule,
    generate,
    init_recurrent_depth_cache,
    recurrent_depth_forward_cached,
)

RD = RecurrentDepthConfig(
    vocab_size=37,
    d_model=32,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    mlp_dim=64,
    num_prelude_layers=1,
    num_core_layers=2,
    num_coda_layers=1,
    mean_loops=3,
    grad_steps=2,
    init_scale=0.0,
)
LOOPED = LoopedConfig(
    vocab_size=37, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64, num_layers=2, num_loops=2
)
PROMPT = jax.random.randint(jax.random.key(3), (2, 5), 0, 37)


def assert_greedy_matches_uncached(model, out, num_new, **kw):
    full = jnp.concatenate([PROMPT, out.tokens_BT], axis=1)
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s: nnx.merge(graphdef, s)(full, **kw))(state)
    t = PROMPT.shape[1]
    np.testing.assert_array_equal(jnp.argmax(logits[:, t - 1 : t - 1 + num_new], -1), out.tokens_BT)


def test_recurrent_depth_greedy_matches_uncached():
    model = build_model(RD, rngs=nnx.Rngs(0))
    out = generate(model, PROMPT, max_new_tokens=6, num_loops=4)
    assert out.tokens_BT.shape == (2, 6)
    np.testing.assert_array_equal(out.steps_BT, 4)
    assert_greedy_matches_uncached(model, out, 6, num_loops=4)


@pytest.mark.parametrize("kw", [dict(), dict(share_weights=False, input_injection=True, block_repeat=2)])
def test_looped_greedy_matches_uncached(kw):
    model = build_model(dataclasses.replace(LOOPED, **kw), rngs=nnx.Rngs(0))
    out = generate(model, PROMPT, max_new_tokens=5)
    np.testing.assert_array_equal(out.steps_BT, LOOPED.num_loops)
    assert_greedy_matches_uncached(model, out, 5)


def test_adaptive_generation_options():
    model = build_model(RD, rngs=nnx.Rngs(0))
    out = generate(model, PROMPT, max_new_tokens=4, num_loops=5, exit_rule=ExitRule(tol=1e9))
    np.testing.assert_array_equal(out.steps_BT[:, 0], 5)  # the prompt runs every loop
    np.testing.assert_array_equal(out.steps_BT[:, 1:], 1)
    out = generate(
        model,
        PROMPT,
        max_new_tokens=4,
        num_loops=5,
        exit_rule=ExitRule(tol=0.3, kl_tol=1e-2),
        cache_sharing_slots=2,
        warm_start=True,
        temperature=1.0,
        rng=jax.random.key(0),
    )
    assert out.tokens_BT.shape == (2, 4) and int(out.steps_BT.max()) <= 5 and int(out.steps_BT.min()) >= 1
    # tol 0 disables the exit: identical to fixed-depth decoding.
    fixed = generate(model, PROMPT, max_new_tokens=4, num_loops=5)
    np.testing.assert_array_equal(
        generate(model, PROMPT, max_new_tokens=4, num_loops=5, exit_rule=ExitRule(tol=0.0)).tokens_BT, fixed.tokens_BT
    )
    with pytest.raises(ValueError, match="rng"):
        generate(model, PROMPT, max_new_tokens=2, temperature=1.0)


@pytest.mark.parametrize("tol", [1e9, 0.2])
def test_cache_holes_are_filled_with_deepest_entry(tol):
    """After a token exits at step j, its core cache entries for steps > j copy step j's."""
    model = build_model(RD, rngs=nnx.Rngs(0))
    loops, t = 6, PROMPT.shape[1]

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        cache = init_recurrent_depth_cache(m, 2, t + 1, loops)
        _, s, _, cache = recurrent_depth_forward_cached(
            m, PROMPT, cache, jnp.zeros((2, t, 32)), index=jnp.int32(0), num_loops=loops
        )
        tok = jnp.array([[4], [9]], jnp.int32)
        return recurrent_depth_forward_cached(
            m, tok, cache, s[:, -1:], index=jnp.int32(t), num_loops=loops, exit_rule=ExitRule(tol=tol)
        )

    graphdef, state = nnx.split(model)
    _, _, steps, cache = run(state)
    k = cache.core.k_BSKH[:, :, :, t]  # [slots, layers, B, K, H] at the decoded position
    assert int(steps.min()) >= 1 and int(steps.max()) <= loops
    for b in range(2):
        j = int(steps[b])
        for i in range(loops):
            np.testing.assert_array_equal(k[i, :, b], k[min(i, j - 1), :, b])
        assert bool(jnp.all(cache.core.segment_ids_BS[:, :, b, t] == 1))
    if tol == 1e9:
        np.testing.assert_array_equal(steps, 1)
    else:  # rows exit at different steps: exercises both the per-row patch and the final fill
        assert int(steps.min()) < int(steps.max()) < loops
