"""HRM: published parameter count, the engine's one-step gradient against a plain-loop reference,
ACT halting / resets / deep supervision, __call__ / evaluate / evaluate_steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.losses import softmax_cross_entropy
from looped_jax.models import act, count_params
from looped_jax.models.hrm import HRMConfig, HRMModel, swiglu_hidden
from looped_jax.models.protocol import LossOutput, check_model
from looped_jax.nn import apply_stack

SEQ, VOCAB, B = 16, 6, 4
sg = jax.lax.stop_gradient


def tiny_cfg(**kw) -> HRMConfig:
    base = dict(
        vocab_size=VOCAB,
        seq_len=SEQ,
        d_model=32,
        num_heads=2,
        head_dim=16,
        mlp_dim=64,
        num_h_layers=1,
        num_l_layers=1,
        puzzle_emb_dim=32,
        num_puzzle_ids=3,
        halt_max_steps=16,
    )
    base.update(kw)
    return HRMConfig(**base)


def make_batch(seed: int, b: int = B) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "inputs": rng.integers(1, VOCAB, (b, SEQ)).astype(np.int32),
        "targets": rng.integers(2, VOCAB, (b, SEQ)).astype(np.int32),
        "weights": np.ones((b, SEQ), np.float32),
        "segment_ids": np.ones((b, SEQ), np.int32),
        "positions": np.tile(np.arange(SEQ, dtype=np.int32), (b, 1)),
        "puzzle_ids": rng.integers(0, 3, (b,)).astype(np.int32),
    }


def test_published_parameter_count():
    """HRM Sudoku: 27,275,266 without the puzzle embedding (Wang et al. 2025), no allocation."""
    assert swiglu_hidden(512, 4) == 1536
    model = nnx.eval_shape(lambda: HRMModel(HRMConfig(), rngs=nnx.Rngs(0)))
    n = count_params(model)
    assert n - model.puzzle_emb.size == 27_275_266
    assert model.puzzle_emb.shape == (1, 512) and model.puzzle_emb_len == 1


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.h_cycles"):
        tiny_cfg(h_cycles=0)
    with pytest.raises(ValueError, match="model.pos_encoding"):
        tiny_cfg(pos_encoding="alibi")
    model = HRMModel(tiny_cfg(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.num_loops"):
        model(jnp.ones((1, SEQ), jnp.int32), num_loops=0)


# -- plain-loop reference (Python for loops, explicit stop_gradient on parameters) ---------------


def frozen_copy(model: nnx.Module) -> nnx.Module:
    """The model with every parameter under stop_gradient."""
    graphdef, params = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(sg, params))


def reference_segment(model: HRMModel, z, data, *, live_steps: int = 1, num_steps: int | None = None):
    """HRM segment as Python loops over the N * T low-level steps k: z_L <- f_L(z_L + z_H + x), and
    z_H <- f_H(z_H + z_L) after every T-th. The last ``live_steps`` steps use the live parameters,
    embedding and (detached-at-entry) carry; the earlier ones use frozen parameters and sg(x).
    live_steps=1 is HRM's one-step gradient; ``num_steps`` (default N * T) is for the controls."""
    cfg = model.cfg
    frozen = frozen_copy(model)
    x = model.embed_inputs(data)
    pos = model.positions(x.shape[0])
    z_H, z_L = (sg(s.astype(jnp.float32)) for s in z)
    n = cfg.h_cycles * cfg.l_cycles if num_steps is None else num_steps
    for k in range(n):
        live = k >= n - live_steps
        m, x_k = (model, x) if live else (frozen, sg(x))
        if k == n - live_steps:
            z_H, z_L = sg(z_H), sg(z_L)
        z_L = apply_stack(m.l_blocks, z_L + z_H + x_k, pos)[0]
        if (k + 1) % cfg.l_cycles == 0:
            z_H = apply_stack(m.h_blocks, z_H + z_L, pos)[0]
    logits, q_halt, q_cont = model.heads(z_H)
    return (sg(z_H), sg(z_L)), logits, q_halt, q_cont


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _assert_close(a, b, tol: float = 1e-6):
    """Every leaf agrees to ``tol`` (absolute, or relative for entries above 1)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# Compiled, XLA fuses a scan body and the same ops unrolled differently, so they round differently:
# jit(reference_segment) itself differs from the eager reference_segment by up to 2.5e-5 after the 8
# block calls of an h_cycles=2, l_cycles=3 segment. The exact parity tests therefore run both sides
# eagerly under jax.disable_jit(), where the engine's scans / conds are Python loops over the same
# primitives (they agree bit for bit); compiled forwards are checked at this float32-rounding
# tolerance (a step more or less moves the outputs by > 1e-1).
COMPILED_TOL = 1e-4


def _prepared_model(cfg: HRMConfig, seed: int) -> HRMModel:
    model = HRMModel(cfg, rngs=nnx.Rngs(seed))
    # Zero-initialised puzzle embedding and Q head: make them non-zero so every gradient path carries signal.
    model.puzzle_emb[...] = jax.random.normal(jax.random.key(4), model.puzzle_emb.shape)
    model.q_head_D2[...] = 0.3 * jax.random.normal(jax.random.key(6), model.q_head_D2.shape)
    return model


@pytest.mark.parametrize(
    "cycles", [dict(h_cycles=2, l_cycles=3), dict(h_cycles=1, l_cycles=1, pos_encoding="learned", num_l_layers=2)]
)
def test_segment_matches_plain_loop_reference(cycles):
    """Forward and one-step gradient of the engine segment == the Python-loop reference (1e-6);
    one differentiated step more is a visibly different gradient, one low step less (more) a
    different forward."""
    model = _prepared_model(tiny_cfg(**cycles), 1)
    batch = make_batch(0)
    data = {k: jnp.asarray(batch[k]) for k in ("inputs", "puzzle_ids")}
    z = tuple(jax.random.normal(k, (B, model.total_len, 32)) for k in jax.random.split(jax.random.key(3)))
    w = jax.random.normal(jax.random.key(5), (B, SEQ, VOCAB))
    graphdef, params = nnx.split(model)

    def value_and_grads(segment_fn):
        def f(p, z_):
            new_z, logits, q_halt, q_cont = segment_fn(nnx.merge(graphdef, p), z_)
            return jnp.sum(logits * w) + jnp.sum(q_halt) + 2.0 * jnp.sum(q_cont), (new_z, logits, q_halt, q_cont)

        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, z)
        return out, grads

    n = model.cfg.h_cycles * model.cfg.l_cycles
    with jax.disable_jit():
        out, (g, g_z) = value_and_grads(lambda m, z_: m.segment(z_, data))
        ref, (g_ref, g_z_ref) = value_and_grads(lambda m, z_: reference_segment(m, z_, data))
        # Controls (the comparison can fail): one more differentiated low step; one low step fewer
        # (for N * T = 1: one more).
        g2 = value_and_grads(lambda m, z_: reference_segment(m, z_, data, live_steps=2))[1][0] if n > 1 else None
        other = reference_segment(model, z, data, num_steps=n - 1 if n > 1 else 2)
    _assert_close(out, ref)
    _assert_close(g, g_ref)
    grads = nnx.to_pure_dict(g)
    assert float(jnp.abs(grads["l_blocks"][0]["attn"]["q_DNH"]).sum()) > 0
    assert float(jnp.abs(grads["h_blocks"][0]["mlp"]["down_FD"]).sum()) > 0
    assert float(jnp.abs(grads["embed_VD"]).sum()) > 0
    # The carry is detached between segments: no gradient to the incoming z.
    assert all(float(jnp.abs(t).max()) == 0.0 for t in jax.tree.leaves((g_z, g_z_ref)))
    if g2 is not None:
        assert _max_diff(g, g2) > 1e-2
    assert _max_diff(out[1], other[1]) > 1e-1
    # The compiled engine computes the same forward (to float32 rounding).
    _assert_close(nnx.jit(lambda m: m.segment(z, data))(model), ref, tol=COMPILED_TOL)


def test_call_and_evaluate_steps_match_plain_loops():
    """__call__ (static and traced num_loops) == num_loops reference segments, forward and gradient
    (only the last segment is differentiated); evaluate_steps step k == k segments."""
    model = _prepared_model(tiny_cfg(h_cycles=1, l_cycles=2, halt_max_steps=2), 2)
    batch = make_batch(1)
    data = {k: jnp.asarray(batch[k]) for k in ("inputs", "puzzle_ids")}
    w = jax.random.normal(jax.random.key(5), (B, SEQ, VOCAB))
    graphdef, params = nnx.split(model)

    def reference_logits(m, n):
        z = m.initial_states(B)
        for _ in range(n):
            z, logits, _, _ = reference_segment(m, z, data)
        return logits

    def logits_and_grads(fn):
        """(logits, d sum(logits * w) / d params)."""

        def f(p):
            logits = fn(nnx.merge(graphdef, p))
            return jnp.sum(logits * w), logits

        (_, logits), grads = jax.value_and_grad(f, has_aux=True)(params)
        return logits, grads

    call = lambda m, n: m(data["inputs"], num_loops=n, puzzle_ids_B=data["puzzle_ids"])
    refs = {}
    with jax.disable_jit():
        for n in (1, 2):
            ref = logits_and_grads(lambda m: reference_logits(m, n))
            _assert_close(logits_and_grads(lambda m: call(m, n)), ref)
            _assert_close(logits_and_grads(lambda m: call(m, jnp.int32(n))), ref)
            refs[n] = ref[0]
        # The default depth is halt_max_steps; a traced depth below 1 counts as 1.
        _assert_close(call(model, None), refs[2])
        _assert_close(call(model, jnp.int32(0)), refs[1])
        assert _max_diff(refs[1], refs[2]) > 1e-2  # the depth matters
        ev = model.evaluate_steps(batch)
        for k in range(2):
            correct_BT = np.asarray(jnp.argmax(reference_logits(model, k + 1), -1)) == batch["targets"]
            np.testing.assert_allclose(ev["token_acc_S_B"][k], correct_BT.mean(-1), rtol=1e-6)
            np.testing.assert_array_equal(ev["exact_S_B"][k], correct_BT.all(-1))
    assert ev["exact_S_B"].shape == (2, B) and ev["halt_step_B"].shape == (B,)
    np.testing.assert_array_equal(ev["valid_B"], [True] * B)
    # Compiled with a traced depth: one program for every num_loops.
    traced = jax.jit(lambda p, n: call(nnx.merge(graphdef, p), n))
    for n in (1, 2):
        _assert_close(traced(params, jnp.int32(n)), refs[n], tol=COMPILED_TOL)
    assert traced._cache_size() == 1


def test_evaluate_returns_summed_token_and_exact_metrics():
    """evaluate: summed softmax CE / correct tokens / tokens of __call__'s logits, exact_sum over
    rows whose weighted tokens are all right, num_rows over rows with any weight."""
    model = _prepared_model(tiny_cfg(halt_max_steps=2), 3)
    batch = {k: jnp.asarray(v) for k, v in make_batch(2).items()}
    logits = nnx.jit(lambda m: m(batch["inputs"], num_loops=2, puzzle_ids_B=batch["puzzle_ids"]))(model)
    pred = jnp.argmax(logits, -1)
    # Row 0 exactly right; row 1 right except one weighted token; row 2 right on its weighted half
    # (wrong where unweighted); row 3 without weights (not a row of the score).
    targets = pred.at[1, 3].set((pred[1, 3] + 1) % VOCAB)
    targets = targets.at[2, : SEQ // 2].set((pred[2, : SEQ // 2] + 1) % VOCAB)
    weights = jnp.ones((B, SEQ)).at[2, : SEQ // 2].set(0.0).at[3].set(0.0)
    batch = dict(batch, targets=targets, weights=weights)
    ev = nnx.jit(lambda m, b, n: m.evaluate(b, num_loops=n))(model, batch, jnp.int32(2))
    assert set(ev) >= {"loss_sum", "correct", "num_tokens", "exact_sum", "num_rows"}
    assert float(ev["exact_sum"]) == 2.0 and float(ev["num_rows"]) == 3.0
    assert float(ev["num_tokens"]) == 2 * SEQ + SEQ // 2
    assert float(ev["correct"]) == float(ev["num_tokens"]) - 1
    loss_sum = float((softmax_cross_entropy(logits, targets) * weights).sum())
    np.testing.assert_allclose(float(ev["loss_sum"]), loss_sum, rtol=1e-5)
    exact_B, valid_B = act.exact_match(logits, targets, weights)
    np.testing.assert_array_equal(exact_B, [True, False, True, False])
    np.testing.assert_array_equal(valid_B, [True, True, True, False])


# -- ACT: deep supervision carry, halting, Q-learning targets ------------------------------------


@nnx.jit(static_argnames=("train",))
def _loss(model, batch, carry, rng, train=True):
    return model.loss(batch, rng=rng, train=train, carry=carry)


@nnx.jit
def _segment(model, z, data):
    return model.segment(z, data)


def _set_q_bias(model, halt: float, cont: float):
    model.q_bias_2[...] = jnp.array([halt, cont], jnp.float32)


def _rows_equal(a, b):
    return np.allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_act_resets_and_halting_on_hand_made_carry():
    model = HRMModel(tiny_cfg(halt_exploration_prob=0.0), rngs=nnx.Rngs(2))
    old, new = make_batch(1), make_batch(2)
    z_old = tuple(jax.random.normal(k, (B, model.total_len, 32)) for k in jax.random.split(jax.random.key(7)))
    carry = dict(
        model.initial_carry(B),
        z=z_old,
        steps=jnp.array([5, 3, 15, 9], jnp.int32),
        halted=jnp.array([True, False, False, True]),
        data={k: jnp.asarray(old[k]) for k in ("inputs", "targets", "weights", "puzzle_ids")},
    )
    key = jax.random.key(0)
    _set_q_bias(model, -5.0, -5.0)  # q_halt == q_continue: no learned halt
    out = _loss(model, new, carry, key)
    assert isinstance(out, LossOutput)
    metrics, c1 = out.metrics, out.carry
    np.testing.assert_array_equal(c1["steps"], [1, 4, 16, 1])
    np.testing.assert_array_equal(c1["halted"], [False, False, True, False])  # only the max-steps row
    fresh, kept = np.array([0, 3]), np.array([1, 2])
    for k in ("inputs", "targets", "puzzle_ids"):
        np.testing.assert_array_equal(c1["data"][k][fresh], new[k][fresh])
        np.testing.assert_array_equal(c1["data"][k][kept], old[k][kept])
    # Latents: halted rows restart from the fixed initial state, the others continue theirs.
    expected_fresh = _segment(model, model.initial_states(B), c1["data"])[0]
    expected_kept = _segment(model, z_old, c1["data"])[0]
    for zi in range(2):
        assert _rows_equal(c1["z"][zi][fresh], expected_fresh[zi][fresh])
        assert _rows_equal(c1["z"][zi][kept], expected_kept[zi][kept])
        assert not _rows_equal(c1["z"][zi][kept], expected_fresh[zi][kept])
    assert float(metrics["count"]) == 1.0 and float(metrics["steps"]) == 16.0

    # q_halt > q_continue: every row halts in training, none before max_steps at evaluation.
    _set_q_bias(model, 1.0, 0.0)
    c2 = _loss(model, new, c1, key).carry
    np.testing.assert_array_equal(c2["halted"], [True] * B)
    np.testing.assert_array_equal(c2["steps"], [2, 5, 1, 2])  # row 2 halted at 16, so it restarted
    c3 = _loss(model, new, c1, key, train=False).carry
    np.testing.assert_array_equal(c3["halted"], [False] * B)

    # Exploration with probability 1: min_steps >= 2, so rows at step 1 cannot halt yet.
    model_x = HRMModel(tiny_cfg(halt_exploration_prob=1.0), rngs=nnx.Rngs(2))
    _set_q_bias(model_x, 1.0, 0.0)
    c4 = _loss(model_x, new, model_x.initial_carry(B), jax.random.key(1)).carry
    np.testing.assert_array_equal(c4["steps"], [1] * B)
    np.testing.assert_array_equal(c4["halted"], [False] * B)


def test_q_learning_targets_and_loss():
    """Continue target = sigmoid(max(next q_halt, next q_cont)), sigmoid(next q_halt) at the last step;
    loss = token loss + 0.5 (BCE_halt + BCE_cont)."""
    model = HRMModel(tiny_cfg(halt_exploration_prob=0.0, halt_max_steps=3), rngs=nnx.Rngs(3))
    model.q_head_D2[...] = 0.1 * jax.random.normal(jax.random.key(0), model.q_head_D2.shape)
    batch = make_batch(5)
    carry = dict(model.initial_carry(B), halted=jnp.array([True, True, False, False]))
    carry["steps"] = jnp.array([0, 0, 2, 1], jnp.int32)

    @nnx.jit
    def step(model, carry, batch):
        new_carry, out = act.act_step(
            model.segment,
            carry,
            batch,
            model.z_init(),
            rng=jax.random.key(0),
            train=True,
            max_steps=3,
            exploration_prob=0.0,
            use_continue=True,
        )
        return new_carry, out, act.act_loss(new_carry, out, loss_type="stablemax")

    new_carry, out, (loss, m) = step(model, carry, batch)
    _, _, nh, nc = _segment(model, new_carry["z"], new_carry["data"])
    is_last = np.asarray(new_carry["steps"]) >= 3
    np.testing.assert_array_equal(is_last, [False, False, True, False])
    expected = jax.nn.sigmoid(jnp.where(is_last, nh, jnp.maximum(nh, nc)))
    np.testing.assert_allclose(out["target_q_continue"], expected, rtol=1e-5)
    bce = lambda x, y: np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
    _, _, exact = act.sequence_correct(out["logits"], new_carry["data"])
    q_h = bce(np.asarray(out["q_halt"]), np.asarray(exact, np.float32))
    q_c = bce(np.asarray(out["q_continue"]), np.asarray(expected))
    np.testing.assert_allclose(float(loss), float(m["lm_loss"]) + 0.5 * (q_h + q_c), rtol=1e-5)


def test_train_step_jits_once():
    model = HRMModel(tiny_cfg(halt_max_steps=3), rngs=nnx.Rngs(4))
    check_model(model)  # initial_carry, loss, evaluate
    graphdef, params = nnx.split(model)

    @jax.jit
    def step(params, carry, batch, rng):
        return nnx.merge(graphdef, params).loss(batch, rng=rng, train=True, carry=carry)

    carry = model.initial_carry(B)
    for i in range(3):
        batch = {k: jnp.asarray(v) for k, v in make_batch(10 + i).items()}
        loss, metrics, carry = step(params, carry, batch, jax.random.key(i))
        assert np.isfinite(float(loss)) and np.isfinite(float(metrics["lm_loss"]))
    assert step._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(carry["steps"]) >= 1, [True] * B)
