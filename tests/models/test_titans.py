"""Titans (models/titans.py, models/neural_memory.py): shapes, causality, long-range memory, streaming equals
one-shot, gate ranges, a 16k-token forward without NaN, config validation and full-size parameter counts."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.config import load_config
from looped_jax.models import build_model
from looped_jax.models.neural_memory import NeuralMemory
from looped_jax.models.titans import VARIANTS, TitansConfig, TitansModel

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def tiny(variant: str = "mac", **kw) -> TitansConfig:
    base = dict(
        variant=variant,
        vocab_size=32,
        d_model=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        mlp_dim=64,
        window=8,
        segment_len=8,
        num_persistent=2,
        memory_heads=2,
        memory_head_dim=16,
        memory_chunk_size=4,
        memory_max_lr=0.1,
        alpha_bias=-4.0,
    )
    base.update(kw)
    return TitansConfig(**base)


def _forward_fn(model):
    graphdef, params = nnx.split(model)
    return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)), params


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_causality_and_reach(variant):
    """Logits are [B, T, V]; a changed token never changes earlier logits; a token far beyond the attention
    window still changes the last logits through the memory (and does not for the sliding-window baseline)."""
    cfg = tiny(variant)
    model = TitansModel(cfg, rngs=nnx.Rngs(0))
    fwd, params = _forward_fn(model)
    T = 45  # not a multiple of segment_len or memory_chunk_size
    x = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
    logits = fwd(params, x)
    assert logits.shape == (2, T, cfg.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    t = 20
    x2 = x.at[:, t].set((x[:, t] + 1) % cfg.vocab_size)
    logits2 = fwd(params, x2)
    np.testing.assert_array_equal(np.asarray(logits[:, :t]), np.asarray(logits2[:, :t]))
    assert float(jnp.max(jnp.abs(logits[:, t] - logits2[:, t]))) > 1e-4
    x3 = x.at[:, 0].set((x[:, 0] + 1) % cfg.vocab_size)
    far = float(jnp.max(jnp.abs(fwd(params, x3)[:, -1] - logits[:, -1])))  # 44 tokens > window 8
    if variant == "swa":
        assert far == 0.0
    else:
        assert far > 1e-5


PAPER_OPTIONS = [
    ("mac", dict(memory_kind="mlp_ln", memory_forget_gate="channel")),
    ("mag", dict(memory_kind="mlp_ln", memory_forget_gate="channel")),
    ("mal", dict(memory_forget_gate="channel")),
    ("lmm", dict(memory_kind="mlp_ln")),
    ("mag", dict(memory_output_gate=False, mag_branch_norm=False, memory_reads_persistent=False)),
]


@pytest.mark.parametrize("variant,options", [(v, {}) for v in VARIANTS] + PAPER_OPTIONS)
def test_stream_equals_one_shot(variant, options):
    """Chunks fed one after another (multiples of stream_multiple, then a short tail) give the one-shot logits;
    a tail shorter than a memory chunk still writes into the memory. Defaults (output gate, MAG branch norms,
    persistent tokens read by the memory) and the deep memory / channel-wise forgetting on the pure-JAX path."""
    cfg = tiny(variant, **options)
    model = TitansModel(cfg, rngs=nnx.Rngs(2))
    T, B = 35, 2
    x = jax.random.randint(jax.random.key(3), (B, T), 0, cfg.vocab_size)
    fwd, params = _forward_fn(model)
    full = fwd(params, x)
    graphdef, _ = nnx.split(model)
    step = jax.jit(lambda p, x, s: nnx.merge(graphdef, p).stream(x, s))
    state = model.init_state(B)
    assert 8 % cfg.stream_multiple == 0
    cuts = [0, 8, 16, 24, 32, T]  # four chunks of 8, then 3 tokens (3 < memory_chunk_size)
    outs = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        before = state
        logits, state = step(params, x[:, a:b], state)
        outs.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-5, atol=1e-5)
    assert int(state.offset) == T
    if cfg.has_memory:
        w0, w1 = before.layers[0].memory.state.weights[0], state.layers[0].memory.state.weights[0]
        assert float(jnp.max(jnp.abs(w1 - w0))) > 0.0


def test_gates_in_range_and_switches():
    # the shapes of tiny()'s memory, so the eager initialisers compiled by other tests are reused
    kw = dict(num_heads=2, head_dim=16, chunk_size=4, max_lr=0.02, init_std=1.0, out_init_std=0.1)
    mem = NeuralMemory(32, **kw, rngs=nnx.Rngs(0))
    x = 10.0 * jax.random.normal(jax.random.key(0), (2, 12, 32))  # saturating logits
    valid = jnp.arange(12)[None, :].repeat(2, 0) < 9
    alpha, eta, theta = nnx.jit(lambda m, x, v: m.gates(x, v))(mem, x, valid)
    assert alpha.shape == eta.shape == theta.shape == (2, 2, 12)
    for g, hi in ((alpha, 1.0), (eta, 1.0), (theta, 0.02)):
        assert float(g.min()) >= 0.0 and float(g.max()) <= hi
    assert float(theta[..., :9].max()) > 0.0
    np.testing.assert_array_equal(np.asarray(alpha[..., 9:]), 0.0)  # the gates of padding (the op masks M and S)
    np.testing.assert_array_equal(np.asarray(eta[..., 9:]), 1.0)
    np.testing.assert_array_equal(np.asarray(theta[..., 9:]), 0.0)
    off = NeuralMemory(32, **kw, use_momentum=False, use_forgetting=False, rngs=nnx.Rngs(0))
    alpha, eta, _ = nnx.jit(lambda m, x: m.gates(x))(off, x)
    assert float(jnp.abs(alpha).max()) == 0.0 and float(jnp.abs(eta).max()) == 0.0
    q, k, v, conv = nnx.jit(lambda m, x: m.features(x, m.initial_carry(2).conv_BL3HK))(mem, x)
    np.testing.assert_allclose(np.asarray(jnp.linalg.norm(q, axis=-1)), 1.0, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(jnp.linalg.norm(k, axis=-1)), 1.0, rtol=1e-4)
    assert q.shape == (2, 2, 12, 16) and conv.shape == (2, 3, 3, 2, 16)


@pytest.mark.parametrize("variant,memory_kind", [("mac", "mlp"), ("mag", "linear")])
def test_16k_tokens_no_nan(variant, memory_kind):
    cfg = tiny(
        variant,
        num_layers=1,
        window=64,
        segment_len=64,
        memory_chunk_size=32,
        memory_max_lr=0.03,
        memory_kind=memory_kind,
        max_surprise_norm=1.0,
    )
    model = TitansModel(cfg, rngs=nnx.Rngs(0))
    fwd, params = _forward_fn(model)
    x = jax.random.randint(jax.random.key(0), (1, 16384), 0, cfg.vocab_size)
    logits = fwd(params, x)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_registry_loss_and_grad():
    cfg = tiny("lmm", memory_kind="mlp")
    model = build_model(cfg, rngs=nnx.Rngs(0))
    B, T = 2, 16
    batch = {
        "inputs": jnp.ones((B, T), jnp.int32),
        "targets": jnp.ones((B, T), jnp.int32),
        "weights": jnp.ones((B, T)),
        "positions": jnp.broadcast_to(jnp.arange(T), (B, T)),
        "segment_ids": jnp.ones((B, T), jnp.int32),
    }
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p).loss(batch, rng=jax.random.key(0))[0]))(params)
    norms = {jax.tree_util.keystr(k): float(jnp.linalg.norm(g)) for k, g in jax.tree_util.tree_leaves_with_path(grads)}
    assert all(np.isfinite(v) for v in norms.values())
    # the learned initial memory and the gates receive gradient through the test-time update
    assert any("init_weights" in k and v > 0 for k, v in norms.items())
    assert any("gate_D3H" in k and v > 0 for k, v in norms.items())


@pytest.mark.parametrize(
    "field,value",
    [("variant", "xyz"), ("memory_kind", "conv"), ("segment_len", 10), ("memory_max_lr", 0.0), ("window", 0)],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        tiny(**{field: value})


@pytest.mark.parametrize(
    "name,low,high",
    [
        # the paper's layouts (24 x 1024, 24 x 1536) with a memory block beside every transformer block count more
        # than their size labels; see the configs' docstrings
        ("titans_mac_340m", 495e6, 525e6),
        ("titans_mac_400m", 415e6, 445e6),
        ("titans_mac_760m", 1070e6, 1140e6),
    ],
)
def test_full_size_param_count_without_allocation(name, low, high):
    cfg = load_config(CONFIGS / f"{name}.py").model
    abstract = nnx.eval_shape(lambda: TitansModel(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    n = sum(int(np.prod(x.shape)) for x in leaves)
    assert low <= n <= high, n


@pytest.mark.slow  # run by .ci/run after the default suite
def test_remat_same_loss_and_gradients():
    """remat_policy recomputes each layer (its memory's chunk scan included) in the backward pass: one remat per
    layer in the gradient program, and bit-identical loss and gradients. Compiled without XLA's fusion passes:
    with them XLA fuses the recomputed forward differently, which moves float32 results by rounding (up to 1e-5
    of a leaf's largest entry with the LayerNorm memory); without them both programs do the same operations."""
    x = jax.random.randint(jax.random.key(3), (2, 12), 0, 32)  # a segment and a half: memory carried across
    unfused = {"xla_disable_hlo_passes": "fusion,cpu-instruction-fusion"}

    def grad_fn(cfg):
        graphdef, params = nnx.split(TitansModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)

        def loss(p):
            return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(x))[..., 0])

        fn = jax.jit(jax.value_and_grad(loss)).lower(params).compile(compiler_options=unfused)
        return fn(params), str(jax.make_jaxpr(jax.grad(loss))(params))

    (loss0, g0), jaxpr0 = grad_fn(tiny("mac", num_layers=2, memory_kind="mlp_ln"))
    (loss1, g1), jaxpr1 = grad_fn(tiny("mac", num_layers=2, memory_kind="mlp_ln", remat_policy="nothing_saveable"))
    assert jaxpr0.count("remat") == 0 and jaxpr1.count("remat") == 2
    np.testing.assert_array_equal(loss1, loss0)
    jax.tree.map(np.testing.assert_array_equal, g1, g0)
    with pytest.raises(ValueError, match="remat_policy"):
        tiny("mac", remat_policy="everything")
