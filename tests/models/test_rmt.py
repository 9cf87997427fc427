"""Recurrent Memory Transformer (models/rmt.py): shapes, the segment mask, causality across segments, memory as
the only path between segments, truncated BPTT, streaming equals one call, config validation, and the
trainer's interface through the registry."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.config import load_config
from looped_jax.models import build_model
from looped_jax.models.protocol import check_model
from looped_jax.models.rmt import RMTConfig, RMTModel, RMTState, segment_mask

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
S = 8  # segment_len of the tiny model


def tiny(**kw) -> RMTConfig:
    base = dict(
        vocab_size=32,
        d_model=32,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        mlp_dim=64,
        num_layers=2,
        segment_len=S,
        num_memory_tokens=3,
    )
    base.update(kw)
    return RMTConfig(**base)


def _model(**kw) -> RMTModel:
    return RMTModel(tiny(**kw), rngs=nnx.Rngs(0))


def _tokens(T: int, seed: int = 1, B: int = 2) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, T), 0, 32)


def _forward(model):
    graphdef, params = nnx.split(model)
    return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)), params


def test_shapes():
    """Logits [B, T, V] float32 for any T (padded internally to whole segments); the stream state is
    [B, M, D] whatever the length."""
    model = _model()
    fwd, params = _forward(model)
    for T in (5, 8, 29):
        logits = fwd(params, _tokens(T))
        assert logits.shape == (2, T, 32) and logits.dtype == jnp.float32
        assert bool(jnp.isfinite(logits).all())
    state = model.init_state(2)
    assert state.memory_BMD.shape == (2, 3, 32) and int(state.segment) == 0
    _, state = model.stream(_tokens(3 * S), state)
    assert state.memory_BMD.shape == (2, 3, 32) and int(state.segment) == 3
    assert _model(num_memory_tokens=0).init_state(2).memory_BMD.shape == (2, 0, 32)


def test_segment_mask():
    """[read M; tokens S; write M]: tokens causal among themselves and see every read token, never a write
    token; the write tokens see the whole segment and each other."""
    M = 2
    m = segment_mask(4, M)
    assert m.shape == (8, 8)
    read, tok, write = slice(0, M), slice(M, M + 4), slice(M + 4, 8)
    assert m[:, read].all()
    assert (m[tok, tok] == np.tril(np.ones((4, 4), bool))).all()
    assert not m[tok, write].any() and not m[read, write].any()
    assert not m[read, tok].any()
    assert m[write, :].all()


def test_causality_across_segments():
    """Changing token p never changes a logit before p, in its own segment or any earlier one, and does change
    logits after p, in later segments too (through the memory)."""
    model = _model()
    fwd, params = _forward(model)
    T = 4 * S
    x = _tokens(T)
    base = np.asarray(fwd(params, x))
    for p in (0, S - 1, S + 3, 2 * S, T - 1):
        x2 = x.at[:, p].set((x[:, p] + 7) % 32)
        out = np.asarray(fwd(params, x2))
        np.testing.assert_allclose(out[:, :p], base[:, :p], atol=1e-6, rtol=0)
        assert np.abs(out[:, p] - base[:, p]).max() > 1e-4
        if p < T - S:
            assert np.abs(out[:, -1] - base[:, -1]).max() > 1e-4, f"token {p} did not reach the last segment"


def test_memory_carries_information():
    """Segment 2's logits depend on segment 1 only through the memory: with memory tokens they change when
    segment 1 changes, and equal a fresh run of segment 2 from the memory segment 1 wrote; with
    num_memory_tokens=0 they never change."""
    x = _tokens(2 * S)
    x2 = x.at[:, : S - 1].set((x[:, : S - 1] + 5) % 32)  # segment 1 differs everywhere but its last token
    for M, carries in ((3, True), (0, False)):
        model = _model(num_memory_tokens=M)
        fwd, params = _forward(model)
        a, b = np.asarray(fwd(params, x))[:, S:], np.asarray(fwd(params, x2))[:, S:]
        if carries:
            assert np.abs(a - b).max() > 1e-3
        else:
            np.testing.assert_array_equal(a, b)
    model = _model()
    _, state = model.stream(x[:, :S], model.init_state(2))
    seg2, _ = model.stream(x[:, S:], state)
    np.testing.assert_allclose(np.asarray(seg2), np.asarray(model(x))[:, S:], atol=1e-5, rtol=0)


def _grad_wrt_embeddings(model: RMTModel, loss_segment: int, num_segments: int = 3):
    """d(loss on segment ``loss_segment`` only) / d(input embeddings) [B, T, D], and d/d(H_0)."""
    x_BTD = jax.random.normal(jax.random.key(3), (2, num_segments * S, 32)) * 0.1
    w_BTV = jax.random.normal(jax.random.key(4), (2, num_segments * S, 32))
    weights_T = (jnp.arange(num_segments * S) // S == loss_segment).astype(jnp.float32)
    graphdef, params = nnx.split(model)

    def loss(params, x_BTD):
        m = nnx.merge(graphdef, params)
        h_BTD, _ = m.hidden(x_BTD, m.init_state(2))
        return jnp.sum(m.head(h_BTD) * w_BTV * weights_T[None, :, None])

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x_BTD)
    return np.asarray(g_x), np.asarray(g_params["memory_init_MD"][...])


@pytest.mark.parametrize(
    "loss_segment,bptt,reaches",
    [(1, 1, False), (1, 2, True), (1, 0, True), (2, 2, False), (2, 3, True), (2, 0, True)],
)
def test_truncated_bptt(loss_segment, bptt, reaches):
    """With bptt_segments=k the memory's gradient is cut every k segments: a loss on segment 1 (0-based) has an
    exactly zero gradient wrt segment 0's embeddings at k=1 and a nonzero one at k=2 (on segment 2: zero at
    k=2, nonzero at k=3; k=0 is full BPTT). Segment loss_segment's own inputs always get a gradient."""
    g_x, _ = _grad_wrt_embeddings(_model(bptt_segments=bptt), loss_segment)
    assert np.abs(g_x[:, loss_segment * S : (loss_segment + 1) * S]).max() > 0
    g0 = np.abs(g_x[:, :S]).max()
    if reaches:
        assert g0 > 1e-6
    else:
        assert g0 == 0.0
        assert np.abs(g_x[:, : loss_segment * S]).max() == 0.0
    np.testing.assert_array_equal(g_x[:, (loss_segment + 1) * S :], 0.0)  # and causal


def test_truncated_bptt_keeps_forward_and_initial_memory_gradient():
    """Truncation changes gradients only: same logits; H_0 is still trained by segment 0's loss at k=1."""
    x = _tokens(3 * S)
    np.testing.assert_array_equal(np.asarray(_model(bptt_segments=1)(x)), np.asarray(_model(bptt_segments=0)(x)))
    _, g_init = _grad_wrt_embeddings(_model(bptt_segments=1), loss_segment=0)
    assert np.abs(g_init).max() > 0
    _, g_init = _grad_wrt_embeddings(_model(bptt_segments=1), loss_segment=1)
    assert np.abs(g_init).max() == 0.0


def test_stream_equals_full():
    """Chunks of 1, 2 and 1 segments fed through ``stream`` give the logits and final memory of one call over
    the concatenation; the state's size never changes. A chunk that is not whole segments is refused."""
    model = _model(bptt_segments=2)
    T = 4 * S
    x = _tokens(T)
    full_logits, full_state = jax.jit(lambda x: model.forward(x, model.init_state(2)))(x)
    step = jax.jit(model.stream)
    state = model.init_state(2)
    outs = []
    for a, b in ((0, S), (S, 3 * S), (3 * S, T)):
        logits, state = step(x[:, a:b], state)
        assert state.memory_BMD.shape == (2, 3, 32)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full_logits), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(state.memory_BMD), np.asarray(full_state.memory_BMD), atol=1e-5, rtol=0)
    assert int(state.segment) == int(full_state.segment) == 4
    with pytest.raises(ValueError, match="segment_len=8"):
        model.stream(x[:, : S + 1], model.init_state(2))
    with pytest.raises(ValueError, match="state memory"):
        model.forward(x, RMTState(jnp.zeros((2, 5, 32)), jnp.zeros((), jnp.int32)))


@pytest.mark.parametrize(
    "field,overrides",
    [
        ("segment_len", {"segment_len": 0}),
        ("num_memory_tokens", {"num_memory_tokens": -1}),
        ("bptt_segments", {"bptt_segments": -2}),
        ("num_heads", {"num_heads": 3, "num_kv_heads": 2}),
        ("num_kv_heads", {"num_kv_heads": 0}),
        ("head_dim", {"head_dim": 15}),
        ("d_model", {"d_model": 0}),
        ("dtype", {"dtype": "float64"}),
        ("norm_eps", {"norm_eps": 0.0}),
        ("name", {"name": "fam"}),
    ],
)
def test_config_validation_names_field(field, overrides):
    with pytest.raises(ValueError, match=rf"model\.{field}\b"):
        tiny(**overrides)


def test_cli_override_validated():
    """A command-line override re-runs the validation and names the field."""
    with pytest.raises(ValueError, match=r"model\.bptt_segments"):
        load_config(str(CONFIGS / "rmt_passkey_cpu.py"), {"model.bptt_segments": "-1"})


def test_registry_and_trainer_interface():
    """The passkey config builds an RMT through the registry; loss / evaluate follow the protocol under jit."""
    cfg = load_config(str(CONFIGS / "rmt_passkey_cpu.py"), {})
    model = build_model(cfg.model, rngs=nnx.Rngs(0))
    assert isinstance(model, RMTModel)
    check_model(model)
    assert model.initial_carry(4) is None
    T = cfg.data.seq_len
    x = jax.random.randint(jax.random.key(0), (4, T), 0, cfg.model.vocab_size)
    batch = {"inputs": x, "targets": x, "weights": jnp.ones((4, T)), "positions": jnp.zeros((4, T), jnp.int32)}
    graphdef, params = nnx.split(model)

    def loss(p):
        out = nnx.merge(graphdef, p).loss(batch, rng=jax.random.key(0))
        return out.loss, out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert out.carry is None and np.isfinite(float(value)) and "accuracy" in out.metrics
    assert np.abs(np.asarray(grads["memory_init_MD"][...])).max() > 0
    sums = jax.jit(lambda p: nnx.merge(graphdef, p).evaluate(batch))(params)
    assert set(sums) >= {"loss_sum", "correct", "num_tokens"} and float(sums["num_tokens"]) == 4 * T
