"""Sleep-style consolidation of the Titans memory (models/titans.py, models/neural_memory.py): with
``consolidation_passes=0`` nothing changes; N > 0 extra offline passes over each segment after it is read change
only later segments; a pass equals one more run of the memory-update op over the segment from the post-segment
state (and a hand-written linear update); ``replay`` replays the previous segments from a ring buffer; streaming
equals one call; gradients flow through the passes; config errors name the field."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.models.neural_memory import NeuralMemory, memory_update_dual
from looped_jax.models.titans import TitansConfig, TitansModel
from pallas_kernels.memory_update import memory_update


def tiny(variant: str = "mac", **kw) -> TitansConfig:
    base = dict(
        variant=variant, vocab_size=32, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
        mlp_dim=64, window=8, segment_len=8, num_persistent=2, memory_heads=2, memory_head_dim=16,
        memory_chunk_size=4, memory_max_lr=0.1, alpha_bias=-4.0,
    )  # fmt: skip
    base.update(kw)
    return TitansConfig(**base)


def _params(model):
    return nnx.split(model)[1]


def _logits(cfg, x, seed=2, params=None):
    """Logits of ``TitansModel(cfg)`` (optionally with other parameters) on x."""
    model = TitansModel(cfg, rngs=nnx.Rngs(seed))
    graphdef, own = nnx.split(model)
    return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(own if params is None else params, x)


def _tokens(T=32, B=2, seed=3, vocab=32):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, vocab)


@pytest.mark.parametrize("variant", ["mac", "mag"])
def test_off_is_the_model_without_consolidation(variant):
    """passes=0 (whatever the decay): the same parameters as with passes > 0 (no new parameters) and bit-for-bit
    the default model's logits and streaming state (no replay buffer)."""
    x = _tokens(T=16)
    if True:
        base = tiny(variant)
        off = dataclasses.replace(base, consolidation_lr_decay=0.5)
        on = dataclasses.replace(base, consolidation_passes=2, replay=1)
        pb, po = _params(TitansModel(base, rngs=nnx.Rngs(2))), _params(TitansModel(on, rngs=nnx.Rngs(2)))
        jax.tree.map(np.testing.assert_array_equal, pb, po)  # same tree, same values
        np.testing.assert_array_equal(np.asarray(_logits(base, x, params=pb)), np.asarray(_logits(off, x, params=pb)))
        assert TitansModel(off, rngs=nnx.Rngs(2)).init_state(2).layers[0].memory.replay is None


@pytest.mark.parametrize("variant", ["mac", "mag", "lmm"])
def test_passes_change_only_later_segments(variant):
    """N > 0: the first segment's logits (8 tokens: segment_len / window) equal those without consolidation; the
    later segments' differ, and differ between 1 and 3 passes."""
    x = _tokens(T=24)
    cfg = tiny(variant)
    params = _params(TitansModel(cfg, rngs=nnx.Rngs(2)))
    l0 = _logits(cfg, x, params=params)
    l1 = _logits(dataclasses.replace(cfg, consolidation_passes=1), x, params=params)
    l3 = _logits(dataclasses.replace(cfg, consolidation_passes=3), x, params=params)
    np.testing.assert_allclose(np.asarray(l1[:, :8]), np.asarray(l0[:, :8]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(l3[:, :8]), np.asarray(l0[:, :8]), rtol=0, atol=1e-6)
    d1 = float(jnp.max(jnp.abs(l1[:, 8:] - l0[:, 8:])))
    d3 = float(jnp.max(jnp.abs(l3[:, 8:] - l1[:, 8:])))
    assert d1 > 1e-5 and d3 > 1e-5


def _memory(memory="linear", forget_gate="scalar", **kw):
    return NeuralMemory(
        32, num_heads=2, head_dim=16, memory=memory, chunk_size=4, max_lr=0.2, use_momentum=False,
        forget_gate=forget_gate, alpha_bias=-3.0, init_std=1.0, out_init_std=0.1, rngs=nnx.Rngs(0), **kw,
    )  # fmt: skip


def _hand_linear(w_BHKK, k, v, alpha, theta, valid, C):
    """The linear memory with momentum off, written out: per chunk, g_t = 2 k_t (k_t W_0 - v_t)^T at the chunk-start
    W_0; W_t = (1 - alpha_t) W_{t-1} - theta_t g_t for valid tokens."""
    w = np.array(w_BHKK, np.float64)
    k, v, alpha, theta, valid = (np.asarray(a, np.float64) for a in (k, v, alpha, theta, valid))
    for b in range(w.shape[0]):
        for h in range(w.shape[1]):
            for c0 in range(0, k.shape[2], C):
                w0 = w[b, h].copy()
                for t in range(c0, min(c0 + C, k.shape[2])):
                    if valid[b, h, t]:
                        g = 2.0 * np.outer(k[b, h, t], k[b, h, t] @ w0 - v[b, h, t])
                        w[b, h] = (1.0 - alpha[b, h, t]) * w[b, h] - theta[b, h, t] * g
    return w


def test_one_pass_is_one_more_update_of_the_segment():
    """Linear memory, momentum off: the consolidated state equals the post-segment state updated once more by the
    memory-update op over the segment's own keys/values/gates (theta x decay), equal to a hand-written update; two
    passes with decay d apply theta d then theta d^2; invalid tokens stay no-ops."""
    x = jax.random.normal(jax.random.key(1), (2, 8, 32))
    valid = jnp.ones((2, 8), bool).at[0, 5].set(False)
    plain, one, two = (_memory(consolidation_passes=n, consolidation_lr_decay=0.5) for n in (0, 1, 2))
    carry = plain.initial_carry(2)
    y0, c0 = plain(x, carry, valid, consolidate=True)
    y1, c1 = one(x, carry, valid, consolidate=True)
    _, c2 = two(x, carry, valid, consolidate=True)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))  # the segment's reads are unchanged
    q, k, v, _ = plain.features(x, carry.conv_BL3HK)
    alpha, eta, theta = plain.gates(x, valid)
    assert float(jnp.max(jnp.where(valid[:, None], eta, 0.0))) == 0.0  # momentum off (invalid tokens: eta = 1)
    vb = jnp.broadcast_to(valid[:, None], eta.shape)
    op = lambda th, st: memory_update(k, k, v, alpha, eta, th, st, chunk_size=4, valid_BHT=vb)[1]
    want1 = op(0.5 * theta, c0.state)
    want2 = op(0.25 * theta, want1)
    np.testing.assert_allclose(np.asarray(c1.state.weights[0]), np.asarray(want1.weights[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(c2.state.weights[0]), np.asarray(want2.weights[0]), rtol=1e-5, atol=1e-6)
    hand = _hand_linear(c0.state.weights[0], k, v, alpha, 0.5 * theta, vb, 4)
    np.testing.assert_allclose(np.asarray(c1.state.weights[0]), hand, rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(c1.state.weights[0] - c0.state.weights[0]))) > 1e-4
    # consolidate=False (e.g. the persistent tokens' write) never consolidates
    _, cf = one(x, carry, valid)
    np.testing.assert_array_equal(np.asarray(cf.state.weights[0]), np.asarray(c0.state.weights[0]))


def test_pass_on_the_pure_jax_path():
    """The deep memory with channel-wise forgetting (memory_update_dual): one pass = one more dual update."""
    x = jax.random.normal(jax.random.key(2), (2, 8, 32))
    plain = _memory("mlp_ln", "channel")
    one = _memory("mlp_ln", "channel", consolidation_passes=1, consolidation_lr_decay=0.7)
    carry = plain.initial_carry(2)
    _, c0 = plain(x, carry)
    _, c1 = one(x, carry, consolidate=True)
    _, k, v, _ = plain.features(x, carry.conv_BL3HK)
    alpha, eta, theta = plain.gates(x)
    want = memory_update_dual(k, k, v, alpha, eta, 0.7 * theta, c0.state, chunk_size=4, memory="mlp_ln")[1]
    for got, exp in zip(c1.state.weights + c1.state.momentum, want.weights + want.momentum, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=1e-5, atol=1e-6)


def test_replay_ring_buffer():
    """replay=R keeps the last R segments' keys/values/gates (oldest first, empty slots invalid); each pass first
    replays them, then the current segment."""
    xa, xb = (jax.random.normal(jax.random.key(i), (2, 8, 32)) for i in (4, 5))
    plain = _memory()
    rep = _memory(consolidation_passes=1, replay=2, segment_len=8)
    carry = rep.initial_carry(2)
    assert carry.replay.k_RBHSK.shape == (2, 2, 2, 8, 16) and not bool(jnp.any(carry.replay.valid_RBHS))
    _, ca = rep(xa, carry, consolidate=True)
    _, ka, va, conv_a = plain.features(xa, carry.conv_BL3HK)
    np.testing.assert_array_equal(np.asarray(ca.replay.k_RBHSK[1]), np.asarray(ka))
    np.testing.assert_array_equal(np.asarray(ca.replay.v_RBHSK[1]), np.asarray(va))
    assert bool(jnp.all(ca.replay.valid_RBHS[1])) and not bool(jnp.any(ca.replay.valid_RBHS[0]))
    _, cb = rep(xb, ca, consolidate=True)
    np.testing.assert_array_equal(np.asarray(cb.replay.k_RBHSK[0]), np.asarray(ka))  # a moved to the oldest slot
    # by hand: b's ordinary update, then one pass = replay a, then b
    _, kb, vb, _ = plain.features(xb, conv_a)
    ga, gb = plain.gates(xa), plain.gates(xb)
    _, cb0 = plain(xb, ca._replace(replay=None))
    op = lambda k, v, g, st: memory_update(k, k, v, g[0], g[1], g[2], st, chunk_size=4)[1]
    want = op(kb, vb, gb, op(ka, va, ga, cb0.state))
    np.testing.assert_allclose(np.asarray(cb.state.weights[0]), np.asarray(want.weights[0]), rtol=1e-5, atol=1e-6)
    no_replay = _memory(consolidation_passes=1)
    _, cb_nr = no_replay(xb, ca._replace(replay=None), consolidate=True)
    assert float(jnp.max(jnp.abs(cb_nr.state.weights[0] - cb.state.weights[0]))) > 1e-5


def test_replay_changes_the_model_from_the_third_segment():
    """In the model replay=1 equals replay=0 on the first two segments (the buffer is empty when the first is
    consolidated) and differs after; the final buffer holds the last segment's memory inputs."""
    x = _tokens(T=32)
    cfg = tiny("mac", consolidation_passes=1)
    params = _params(TitansModel(cfg, rngs=nnx.Rngs(2)))
    l0 = _logits(cfg, x, params=params)
    l1 = _logits(dataclasses.replace(cfg, replay=1), x, params=params)
    np.testing.assert_allclose(np.asarray(l1[:, :16]), np.asarray(l0[:, :16]), rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(l1[:, 16:] - l0[:, 16:]))) > 1e-5
    model = TitansModel(dataclasses.replace(cfg, replay=1), rngs=nnx.Rngs(2))
    _, state = model.stream(x, model.init_state(2))
    buf = state.layers[0].memory.replay
    assert buf.k_RBHSK.shape == (1, 2, 2, 8, 16) and bool(jnp.all(buf.valid_RBHS))


STREAM_CASES = [
    ("mac", dict(consolidation_passes=2, consolidation_lr_decay=0.7, replay=1)),
    ("mag", dict(consolidation_passes=2, consolidation_lr_decay=0.7, replay=1)),
    ("mal", dict(consolidation_passes=1, replay=2)),
    ("lmm", dict(consolidation_passes=2, memory_forget_gate="channel", replay=1)),  # the pure-JAX path
]


@pytest.mark.parametrize("variant,options", STREAM_CASES)
def test_stream_equals_one_call(variant, options):
    """Chunks of stream_multiple (then a 3-token tail, its own short segment in both) give the one-call logits."""
    cfg = tiny(variant, **options)
    model = TitansModel(cfg, rngs=nnx.Rngs(2))
    T, B = 35, 2
    x = _tokens(T=T, B=B)
    graphdef, params = nnx.split(model)
    full = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x)
    step = jax.jit(lambda p, x, s: nnx.merge(graphdef, p).stream(x, s))
    assert cfg.stream_multiple == 8
    state, outs = model.init_state(B), []
    for a, b in zip([0, 8, 16, 24, 32], [8, 16, 24, 32, T], strict=True):
        logits, state = step(params, x[:, a:b], state)
        outs.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-5, atol=1e-5)
    off = _logits(dataclasses.replace(cfg, consolidation_passes=0, replay=0), x, params=params)
    assert float(jnp.max(jnp.abs(off[:, 8:] - full[:, 8:]))) > 1e-5


def test_gradients_flow_through_the_passes():
    """Training differentiates through the passes (and the replay): the gradient of a read after two consolidated
    segments along the gate biases matches central finite differences (a gradient stopped at the passes would
    miss their share)."""
    xa, xb = (jax.random.normal(jax.random.key(i), (2, 8, 32)) for i in (6, 7))

    def loss_and_grad(mem):
        graphdef, params = nnx.split(mem)

        def f(p):
            m = nnx.merge(graphdef, p)
            _, c = m(xa, m.initial_carry(2), consolidate=True)
            _, c = m(xb, c, consolidate=True)
            return jnp.sum(jnp.square(m(xa, c)[0]))  # a read after two consolidated segments

        def along(eps):  # f with every gate bias shifted by eps
            return f(jax.tree_util.tree_map_with_path(lambda k, a: a + eps if "gate_bias" in str(k) else a, params))

        g = jax.jit(jax.grad(f))(params)
        dot = sum(float(jnp.sum(a)) for k, a in jax.tree_util.tree_leaves_with_path(g) if "gate_bias" in str(k))
        fp, fm = jax.jit(lambda: (along(1e-2), along(-1e-2)))()
        return dot, (float(fp) - float(fm)) / 2e-2, jax.tree.leaves(g)

    d2, fd2, g2 = loss_and_grad(_memory(consolidation_passes=2, consolidation_lr_decay=0.8, replay=1, segment_len=8))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in g2)
    np.testing.assert_allclose(d2, fd2, rtol=2e-2)


@pytest.mark.parametrize(
    "field,value",
    [
        ("consolidation_passes", -1),
        ("consolidation_lr_decay", 0.0),
        ("consolidation_lr_decay", 1.5),
        ("replay", -1),
        ("replay", 2),  # without consolidation passes
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        tiny("mac", **{field: value})
    with pytest.raises(ValueError, match="model.consolidation_passes"):
        tiny("swa", consolidation_passes=1)
    assert tiny("mag", consolidation_passes=1, window=6).stream_multiple == 12  # lcm(chunk 4, window 6)
    assert tiny("mag", window=6).stream_multiple == 4
