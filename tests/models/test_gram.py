"""GRAM (Baek et al. 2026): KL balancing, gradient routing, parallel trajectories, selection rules, frozen z_0,
and parity of the loop-engine version with the hand-written loops it replaced."""

import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.data.sudoku import encode, generate_sudoku
from looped_jax.losses import gaussian_kl, softmax_cross_entropy
from looped_jax.models import MODEL_CLASSES, build_model
from looped_jax.models.gram import (
    GramConfig,
    GramModel,
    balanced_kl,
    gather_trajectory,
    select_by_reward,
    select_majority,
)
from looped_jax.models.protocol import LossOutput, check_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

TINY = dict(
    vocab_size=6,
    seq_len=16,
    d_model=16,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    l_cycles=1,
    num_transitions=2,
    supervision_steps=2,
    eval_transitions=2,
)


@pytest.fixture(scope="module")
def batch():
    puzzles, solutions, _ = generate_sudoku(4, 4, seed=0)
    b, t = puzzles.shape
    return {
        "inputs": jnp.asarray(encode(puzzles)),
        "targets": jnp.asarray(encode(solutions)),
        "weights": jnp.ones((b, t), jnp.float32),
        "segment_ids": jnp.ones((b, t), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
    }


def _build(cfg: GramConfig, seed: int = 0) -> GramModel:
    """Builds the model with jitted initialisation (eager NNX init is slow on a busy CPU)."""
    graphdef = nnx.split(nnx.eval_shape(lambda: GramModel(cfg, rngs=nnx.Rngs(seed))))[0]
    state = jax.jit(lambda: nnx.split(GramModel(cfg, rngs=nnx.Rngs(seed)))[1])()
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model():
    return _build(GramConfig(**TINY))


# ----------------------------------------------------------------------------- KL balancing


def _hand_kl_and_grads(mq, lq, mp, lp):
    """KL(N(mq, sq^2) || N(mp, sp^2)) and its derivatives in (mq, log sq, mp, log sp), by hand."""
    sq, sp, d = math.exp(lq), math.exp(lp), mq - mp
    kl = math.log(sp / sq) + (sq**2 + d**2) / (2 * sp**2) - 0.5
    return kl, (d / sp**2, -1 + sq**2 / sp**2, -d / sp**2, 1 - (sq**2 + d**2) / sp**2)


@pytest.mark.parametrize("alpha", [0.8, 0.0, 1.0])
def test_balanced_kl_value_and_gradient_routing(alpha):
    mq, lq, mp, lp = 0.7, math.log(0.5), -0.3, math.log(1.5)
    kl, (d_mq, d_lq, d_mp, d_lp) = _hand_kl_and_grads(mq, lq, mp, lp)
    np.testing.assert_allclose(float(gaussian_kl(mq, lq, mp, lp)), kl, rtol=1e-6)
    np.testing.assert_allclose(float(balanced_kl(mq, lq, mp, lp, alpha)), kl, rtol=1e-6)  # value = plain KL
    grads = jax.grad(lambda *a: balanced_kl(*a, alpha), argnums=(0, 1, 2, 3))(mq, lq, mp, lp)
    # alpha * KL(sg q || p) moves only p; (1 - alpha) * KL(q || sg p) moves only q.
    expected = ((1 - alpha) * d_mq, (1 - alpha) * d_lq, alpha * d_mp, alpha * d_lp)
    np.testing.assert_allclose(np.array(grads, np.float64), expected, rtol=1e-5, atol=1e-7)


def test_kl_balancing_routes_to_prior_and_posterior_heads(model, batch):
    """Through the model: the alpha term reaches only the prior heads, the (1 - alpha) term only q's parameters."""
    graphdef, params = nnx.split(model, nnx.Param)
    b = batch["inputs"].shape[0]

    def kl(params, alpha):
        m = nnx.merge(graphdef, params)
        x = m.embed_inputs(batch["inputs"])
        _, (u, (mq, lq), (mp, lp)) = m.transition(
            m.initial_state(b), x, batch["positions"], batch["segment_ids"], jax.random.key(0), batch["targets"]
        )
        del u
        return balanced_kl(mq, lq, mp, lp, alpha).sum()

    grad = jax.jit(jax.grad(kl))  # alpha is traced: one compile for both terms
    prior_side = nnx.to_pure_dict(grad(params, 1.0))  # the alpha term alone
    post_side = nnx.to_pure_dict(grad(params, 0.0))  # the (1 - alpha) term alone
    norm = lambda tree: float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(tree)))
    for name in ("prior_mu", "prior_log_sigma"):
        assert norm(prior_side[name]) > 0 and norm(post_side[name]) == 0.0, name
    for name in ("post_mu", "post_log_sigma", "target_embed"):
        assert norm(post_side[name]) > 0 and norm(prior_side[name]) == 0.0, name


# ----------------------------------------------------------------------------- gradient routing


def test_gradient_only_through_last_transition(model, batch):
    """supervision_step == last-transition loss at the (constant) state left by the earlier transitions."""
    graphdef, params = nnx.split(model, nnx.Param)
    cfg = model.cfg
    key = jax.random.key(3)
    keys = jax.random.split(key, cfg.num_transitions + 1)
    state0 = model.initial_state(batch["inputs"].shape[0])

    def advance(m, x):
        s = state0
        for t in range(cfg.num_transitions - 1):
            s, _ = m.transition(s, x, batch["positions"], batch["segment_ids"], keys[t])  # prior-driven carry
        return s

    def model_loss(params, state):
        m = nnx.merge(graphdef, params)
        return m.supervision_step(state, m.embed_inputs(batch["inputs"]), batch, key)[1]

    def reference(params, through_all):
        m = nnx.merge(graphdef, params)
        x = m.embed_inputs(batch["inputs"])
        s = advance(m, x) if through_all else jax.lax.stop_gradient(advance(m, x))
        return m.last_transition_loss(s, x, batch, keys[-2], keys[-1])[1]

    @jax.jit
    def all_grads(params, state0):
        loss_model, (g_model, g_state) = jax.value_and_grad(model_loss, argnums=(0, 1))(params, state0)
        loss_last, g_last = jax.value_and_grad(reference)(params, False)
        return loss_model, g_model, g_state, loss_last, g_last, jax.grad(reference)(params, True)

    loss_model, g_model, g_state, loss_last, g_last, g_all = all_grads(params, state0)
    np.testing.assert_allclose(float(loss_model), float(loss_last), rtol=1e-5)
    # float32 round-off of scan vs Python loop: compare at 1e-5 of each gradient's scale.
    for a, b in zip(jax.tree.leaves(g_model), jax.tree.leaves(g_last), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()) + 1e-12)
    # The incoming carry is detached, and backprop through all transitions would have given other gradients.
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_state))
    pairs = zip(jax.tree.leaves(g_all), jax.tree.leaves(g_last), strict=True)
    diff = max(float(jnp.abs(a - b).max()) for a, b in pairs)
    assert diff > 1e-4


def test_supervision_step_detaches_incoming_state_with_one_transition(batch):
    """num_transitions = 1: the engine's gradient-free prefix is empty, the incoming state must still be cut."""
    model = _build(GramConfig(**{**TINY, "num_transitions": 1}), seed=1)
    state0 = model.initial_state(batch["inputs"].shape[0])
    x = model.embed_inputs(batch["inputs"])
    g_h, g_l = jax.jit(jax.grad(lambda s: model.supervision_step(s, x, batch, jax.random.key(0))[1]))(state0)
    assert float(jnp.abs(g_h).max()) == 0.0 and float(jnp.abs(g_l).max()) == 0.0


# ----------------------------------------------------------------------------- loop engine parity


def _reference_logits(model, batch, key, depth):
    """The pre-engine ``__call__`` as a Python loop: ``depth`` prior transitions keyed split(key, depth)."""
    x = model.embed_inputs(batch["inputs"])
    state = model.initial_state(batch["inputs"].shape[0])
    for k in jax.random.split(key, depth) if depth else ():
        state, _ = model.transition(state, x, batch["positions"], batch["segment_ids"], k)
    return model.logits(state[0])


def _reference_loss(model, batch, rng):
    """The pre-engine loss as plain Python loops with explicit stop_gradient and its key splitting."""
    cfg, sg = model.cfg, jax.lax.stop_gradient
    x = model.embed_inputs(batch["inputs"])
    noise_targets = batch["targets"] if cfg.carry_posterior else None
    state = model.initial_state(batch["inputs"].shape[0])
    losses, per_step = [], []
    for key in jax.random.split(rng, cfg.supervision_steps):
        keys = jax.random.split(key, cfg.num_transitions + 1)
        state = sg(state)
        for t in range(cfg.num_transitions - 1):
            state, _ = model.transition(state, x, batch["positions"], batch["segment_ids"], keys[t], noise_targets)
            state = sg(state)
        state, loss_m, metrics_m = model.last_transition_loss(state, x, batch, keys[-2], keys[-1])
        losses.append(loss_m)
        per_step.append(metrics_m)
    loss = jnp.stack(losses).mean()
    return loss, dict(per_step[-1], first_step_exact=per_step[0]["exact"], loss=loss)


def test_split_keys_are_fold_in_keys():
    """The identity behind one noise stream: for threefry keys split(k, n)[t] == fold_in(k, t) for every n.

    GRAM's engine loops key transition t with fold_in(k, t); before they keyed it split(k, n)[t], so this
    is why their outputs (and the README's GRAM table) are unchanged. Fails if JAX's default PRNG changes.
    """
    key = jax.random.key(123)
    for n in (1, 3, 8):
        split = jax.random.key_data(jax.random.split(key, n))
        folded = jnp.stack([jax.random.key_data(jax.random.fold_in(key, t)) for t in range(n)])
        np.testing.assert_array_equal(split, folded)


@pytest.mark.slow
def test_loss_and_grads_match_python_loop_reference(model, batch):
    """End to end: engine loss, metrics and parameter gradients == the Python-loop reference.

    The two programs round differently in float32 (XLA fuses the unrolled graph and the scanned one
    differently, and the scan's transpose sums each step's gradient in another order): the loss differs
    by about one ulp and the gradients by up to ~5e-6 of a leaf's largest entry (attention q/k, behind the
    softmax). Gradients are compared at 1e-5 of that scale; the fast end-to-end loss checks (1e-6 against
    the pre-engine loops) are `test_loss_matches_pre_engine_fixture`.
    """
    graphdef, params = nnx.split(model, nnx.Param)
    rng = jax.random.key(5)
    out = jax.eval_shape(lambda: model.loss(batch, rng=rng))
    assert isinstance(out, LossOutput) and out.carry is None and model.initial_carry(4) is None

    def value_and_grad(fn):
        return jax.value_and_grad(lambda p: tuple(fn(nnx.merge(graphdef, p))[:2]), has_aux=True)(params)

    (loss, metrics), grads = jax.jit(lambda: value_and_grad(lambda m: m.loss(batch, rng=rng)))()
    (ref_loss, ref_metrics), ref_grads = jax.jit(lambda: value_and_grad(lambda m: _reference_loss(m, batch, rng)))()
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), rtol=1e-6, atol=1e-6, err_msg=k)
    g, ref_g = nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(ref_g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()), err_msg=str(path))
    for name in ("embed", "target_embed", "f_l", "f_h", "prior_mu", "post_mu", "halt_head", "reward_out"):
        assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g[name])) > 0, name  # every head trains


def test_call_depths_equal_hand_rolled_transitions(model, batch):
    """__call__ at depth 0 reads z_0, at depth d equals d hand-rolled prior transitions; traced == static;
    rollout's prediction is the argmax of __call__'s logits (one noise stream)."""
    b = batch["inputs"].shape[0]
    key = jax.random.key(11)
    kw = dict(positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"], rng=key)

    @jax.jit
    def run(n_traced):
        static = {d: model(batch["inputs"], num_loops=d, **kw) for d in (0, 3)}
        traced = model(batch["inputs"], num_loops=n_traced, **kw)
        pred, _, _ = model.rollout(batch["inputs"], batch["positions"], batch["segment_ids"], batch["weights"], key, 3)
        return static, traced, pred, _reference_logits(model, batch, key, 3), _reference_logits(model, batch, key, 1)

    static, traced_3, pred_3, ref_3, ref_1 = run(jnp.int32(3))
    _, traced_1, _, _, _ = run(jnp.int32(1))
    _, traced_0, _, _, _ = run(jnp.int32(0))
    tol = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(static[0], model.logits(model.initial_state(b)[0]), **tol)
    np.testing.assert_allclose(traced_0, static[0], **tol)
    np.testing.assert_allclose(traced_3, static[3], **tol)
    np.testing.assert_allclose(traced_1, ref_1, **tol)
    # After three transitions the Python loop and the engine's scan round differently in float32 (up to
    # ~1e-6 of the logits' scale): compared at 1e-5 of that scale.
    np.testing.assert_allclose(static[3], ref_3, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref_3).max()))
    np.testing.assert_array_equal(pred_3, jnp.argmax(static[3], -1))
    assert not np.allclose(static[3], static[0]) and not np.allclose(traced_1, traced_3)


def test_call_noise_follows_rng(model, batch):
    """Prior noise (sigma 0.3 at init) comes from ``rng``: same key, same logits; another key, other logits."""
    call = jax.jit(
        lambda k: model(batch["inputs"], positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"], rng=k)
    )
    a, again, other = call(jax.random.key(0)), call(jax.random.key(0)), call(jax.random.key(1))
    np.testing.assert_array_equal(a, again)
    assert float(jnp.abs(a - other).max()) > 1e-2
    no_rng = jax.jit(lambda: model(batch["inputs"], positions_BT=batch["positions"]))()  # rng None = key(0)
    np.testing.assert_allclose(no_rng, a, rtol=1e-6, atol=1e-6)


def test_evaluate_sums_weighted_ce_of_call(model, batch):
    """evaluate = sums of weighted CE / correct / tokens of __call__'s logits at depth num_loops, rng key(0)."""
    check_model(model)
    weights = batch["weights"].at[:, :5].set(0.0)  # padding cells must not count
    b = dict(batch, weights=weights)
    sums = jax.jit(lambda n: model.evaluate(b, num_loops=n))(jnp.int32(2))
    logits = jax.jit(lambda: _reference_logits(model, batch, jax.random.key(0), 2))()
    ce_BT = softmax_cross_entropy(logits, batch["targets"])
    correct_BT = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    np.testing.assert_allclose(float(sums["loss_sum"]), float((ce_BT * weights).sum()), rtol=1e-6)
    np.testing.assert_allclose(float(sums["correct"]), float((correct_BT * weights).sum()), rtol=1e-6)
    assert float(sums["num_tokens"]) == float(weights.sum())


def _fixture():
    """(the module that wrote the fixture, the recorded arrays, the recorded batch)."""
    spec = importlib.util.spec_from_file_location("make_gram_reference", FIXTURES / "make_gram_reference.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    ref = np.load(FIXTURES / "gram_reference.npz")
    return maker, ref, {k.removeprefix("batch/"): ref[k] for k in ref.files if k.startswith("batch/")}


def _assert_matches_fixture(new: dict, ref, prefix: str = "") -> set:
    """Each new array == the recorded one to 1e-6; returns the recorded names not compared."""
    recorded = {k.removeprefix(prefix) for k in ref.files if k.startswith(prefix) and not k.startswith("batch/")}
    for k in new:
        recorded.discard(k)
        want = ref[prefix + k]
        np.testing.assert_allclose(new[k], want, rtol=1e-6, atol=1e-6 * max(float(np.abs(want).max()), 1.0), err_msg=k)
    return recorded


@pytest.mark.parametrize("carry_posterior", [False, True])
def test_loss_matches_pre_engine_fixture(carry_posterior):
    """End to end (loss, metrics, every parameter gradient), the engine version reproduces to 1e-6 what the
    hand-written scan version computed (tests/fixtures/gram_reference.npz, recorded before the move)."""
    maker, ref, batch = _fixture()
    new = maker.loss_arrays(GramConfig(**maker.CFG, carry_posterior=carry_posterior), batch)
    assert any(k.startswith("loss_grad/f_l/") for k in new) and "metric/first_step_exact" in new
    prefix = "carry_posterior/" if carry_posterior else ""
    left = _assert_matches_fixture(new, ref, prefix)
    assert not {k for k in left if k.startswith(("loss", "metric/"))}, left  # nothing recorded went unchecked


def test_inference_matches_pre_engine_fixture():
    """__call__ at a static and a traced depth (and its gradients), rollout and sample_trajectories: the
    engine version reproduces the pre-engine scan / fori_loop outputs to 1e-6."""
    maker, ref, batch = _fixture()
    new = maker.inference_arrays(GramConfig(**maker.CFG), batch)
    assert {"call_static", "call_traced", "rollout/pred", "sample/reward"} <= set(new)
    left = _assert_matches_fixture(new, ref)
    assert not {k for k in left if k.startswith(("call", "rollout/", "sample/"))}, left


@pytest.mark.slow
def test_loss_trains_tiny_batch(batch):
    """A few Adam steps on one batch lower the loss (CE + beta KL + halting + reward terms all finite)."""
    import optax

    model = _build(GramConfig(**{**TINY, "num_transitions": 1}), seed=1)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: tuple(nnx.merge(graphdef, p).loss(batch, rng=key, train=True)[:2]), has_aux=True
        )(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, metrics

    losses = []
    for i in range(30):
        params, opt, loss, metrics = step(params, opt, jax.random.key(i))
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and all(np.isfinite(float(v)) for v in metrics.values())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


# ----------------------------------------------------------------------------- width: parallel trajectories


def test_vmapped_trajectories_independent_and_deterministic(model, batch):
    key = jax.random.key(7)
    sample = jax.jit(lambda k: model.sample_trajectories(batch, k, num_samples=4, depth=3))
    out, again = sample(key), sample(key)
    jax.tree.map(np.testing.assert_array_equal, out, again)  # deterministic per key
    keys = jax.random.split(key, 4)
    rollout = jax.jit(
        lambda k: model.rollout(batch["inputs"], batch["positions"], batch["segment_ids"], batch["weights"], k, 3)
    )
    for i in (0, 3):  # trajectory i is the single rollout with its own key: vmap does not couple them
        pred, reward, halt = rollout(keys[i])
        np.testing.assert_array_equal(out["preds"][i], pred)
        np.testing.assert_allclose(out["reward"][i], reward, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["halt"][i], halt, rtol=1e-5, atol=1e-6)
    rewards = np.asarray(out["reward"])
    assert all(not np.allclose(rewards[i], rewards[j]) for i in range(4) for j in range(i))  # distinct noise
    other = sample(jax.random.key(8))
    assert not np.allclose(other["reward"], rewards)


# ----------------------------------------------------------------------------- selection rules


def test_majority_vote_and_reward_selection():
    g1, g2, g3 = [1, 2, 3, 4], [1, 2, 4, 3], [2, 1, 3, 4]
    # Row 0: g2 wins 3-1. Row 1: g1 vs g3 tie 2-2 -> first index. Row 2: last cell masked, so 0 and 2 agree.
    preds_NBT = jnp.array(
        [
            [g1, g1, g1],
            [g2, g3, g2],
            [g2, g1, [1, 2, 3, 1]],
            [g2, g3, g3],
        ]
    )
    weights_BT = jnp.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], jnp.float32)
    index_B, votes_B = select_majority(preds_NBT, weights_BT)
    np.testing.assert_array_equal(index_B, [1, 0, 0])
    np.testing.assert_array_equal(votes_B, [3, 2, 2])
    np.testing.assert_array_equal(gather_trajectory(preds_NBT, index_B), [g2, g1, g1])
    index_nomask, votes_nomask = select_majority(preds_NBT)  # unmasked: row 2 grids 0 and 2 differ
    np.testing.assert_array_equal(index_nomask, [1, 0, 0])
    np.testing.assert_array_equal(votes_nomask, [3, 2, 1])
    reward_NB = jnp.array([[0.1, 0.9, -1.0], [0.5, 0.2, -1.0], [0.4, 0.9, -2.0], [0.3, -0.5, -1.0]])
    np.testing.assert_array_equal(select_by_reward(reward_NB), [1, 0, 0])
    np.testing.assert_array_equal(gather_trajectory(preds_NBT, select_by_reward(reward_NB)), [g2, g1, g1])


# ----------------------------------------------------------------------------- frozen z_0 and registry


def test_z0_is_a_frozen_constant_not_a_parameter(model):
    cfg = GramConfig(**TINY)
    a = model
    b = nnx.eval_shape(lambda: GramModel(cfg, rngs=nnx.Rngs(1)))  # z_0 needs no parameter values
    h_a, l_a = a.initial_state(2)
    h_b, l_b = b.initial_state(2)
    np.testing.assert_array_equal(h_a, h_b)  # fixed by z0_seed, not by the parameter seed
    np.testing.assert_array_equal(l_a, l_b)
    np.testing.assert_array_equal(h_a[0], h_a[1])  # one z_0 shared by every row
    assert not np.allclose(h_a, l_a)
    h_c, _ = nnx.eval_shape(lambda: GramModel(GramConfig(**{**TINY, "z0_seed": 5}), rngs=nnx.Rngs(0))).initial_state(2)
    assert not np.allclose(h_a, h_c)
    # All model state is nnx.Param (the trainer's rule) and none of it holds z_0: the optimiser cannot move it.
    _, params, rest = nnx.split(a, nnx.Param, ...)
    assert not jax.tree.leaves(rest)
    for leaf in jax.tree.leaves(params):
        assert leaf.shape != h_a.shape[1:] or not np.allclose(leaf, h_a[0])


def test_config_validation_and_registry(model):
    with pytest.raises(ValueError, match="model.kl_balance"):
        GramConfig(kl_balance=1.5)
    with pytest.raises(ValueError, match="model.num_transitions"):
        GramConfig(num_transitions=0)
    assert MODEL_CLASSES["gram"] is GramModel
    assert isinstance(nnx.eval_shape(lambda: build_model(GramConfig(**TINY), rngs=nnx.Rngs(0))), GramModel)
    with pytest.raises(ValueError, match="model.seq_len=16"):
        model.loss({"inputs": jnp.zeros((1, 9), jnp.int32)}, rng=jax.random.key(0))


# ----------------------------------------------------------------------------- the paper's objective

PAPER = dict(TINY, objective="paper", carry_posterior=True, prior_ce_weight=0.0, num_transitions=3, supervision_steps=3)


def _with_halt_bias(cfg: GramConfig, bias: float) -> GramModel:
    """A model whose halting logit is ``bias`` everywhere (zero halting weights)."""
    m = _build(cfg)
    m.halt_head.w[...] = jnp.zeros_like(m.halt_head.w[...])
    m.halt_head.b[...] = jnp.full_like(m.halt_head.b[...], bias)
    return m


def _reference_paper_step(model, batch, rng):
    """One supervision step of the paper's objective from z_0, by hand: posterior noise at every transition
    (the step's key fold_in(rng, 0), transition t from fold_in(that, t)), KL(q || p) of every transition
    (the value of KL balancing), CE / halting on the last posterior state, the critic on a prior resample."""
    cfg, sg = model.cfg, jax.lax.stop_gradient
    n = cfg.num_transitions
    key = jax.random.fold_in(rng, 0)
    targets, w = batch["targets"], batch["weights"]
    x = model.embed_inputs(batch["inputs"])
    state = model.initial_state(batch["inputs"].shape[0])
    kls = []
    for t in range(n):
        state, (u, (mq, lq), (mp, lp)) = model.transition(
            state, x, batch["positions"], None, jax.random.fold_in(key, t), targets
        )
        kls.append((gaussian_kl(mq, lq, mp, lp).sum(-1) * w).sum() / w.sum())
    h, l = state
    logits = model.logits(h)
    ce = (softmax_cross_entropy(logits, targets) * w).sum() / w.sum()
    exact = jnp.all(jnp.argmax(logits, -1) == targets, axis=-1).astype(jnp.float32)
    q = model.halt_logit(h)
    bce = lambda z, y: jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))
    h_prior = u + mp + jnp.exp(lp) * jax.random.normal(jax.random.fold_in(key, n), u.shape)
    acc_prior = (jnp.argmax(model.logits(h_prior), -1) == targets).astype(jnp.float32).mean(-1)
    reward = bce(model.reward(sg(h_prior), sg(l), w), acc_prior).mean()
    loss = ce + cfg.beta * sum(kls) + cfg.halt_weight * bce(q, exact).mean() + cfg.reward_weight * reward
    return loss, jnp.stack(kls), state


def test_paper_objective_loss_matches_hand_rolled_step(batch):
    """objective='paper': the loss of a fresh carry's first step == the hand-rolled posterior trajectory
    with the KL of all n transitions, and the carry holds the posterior state, step 1, the batch's rows."""
    model = _build(GramConfig(**PAPER, halt_exploration_prob=0.0))
    rng = jax.random.key(3)
    carry0 = model.initial_carry(batch["inputs"].shape[0])
    out, (ref_loss, ref_kls, ref_state) = jax.jit(
        lambda: (model.loss(batch, rng=rng, carry=carry0), _reference_paper_step(model, batch, rng))
    )()
    assert float(ref_kls[:-1].sum()) > 1e-3 * float(ref_kls.sum())  # the earlier transitions' KL counts
    np.testing.assert_allclose(float(out.loss), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(float(out.metrics["kl_all"]), float(ref_kls.sum()), rtol=1e-5)
    np.testing.assert_allclose(float(out.metrics["kl"]), float(ref_kls[-1]), rtol=1e-5)
    for a, b in zip(out.carry["z"], ref_state, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.carry["steps"], np.ones(batch["inputs"].shape[0]))
    np.testing.assert_array_equal(out.carry["data"]["inputs"], batch["inputs"])


def test_paper_objective_earlier_kl_trains_the_noise_heads(batch):
    """The KL of the gradient-free transitions reaches the prior / posterior heads (scored on
    stop_gradient(u_t)) but not the core: d kl_all - d kl (the last transition's) is nonzero on the noise
    heads and zero on f_L / f_H."""
    m = _build(GramConfig(**PAPER, halt_exploration_prob=0.0))
    graphdef, params = nnx.split(m, nnx.Param)
    rng = jax.random.key(4)

    def grad_of(name):
        fn = lambda p: nnx.merge(graphdef, p).loss(batch, rng=rng).metrics[name]
        return nnx.to_pure_dict(jax.grad(fn)(params))

    g_all, g_last = jax.jit(lambda: (grad_of("kl_all"), grad_of("kl")))()
    for head in ("prior_mu", "prior_log_sigma", "post_mu", "post_log_sigma"):
        assert float(jnp.abs(g_all[head]["w"] - g_last[head]["w"]).max()) > 1e-6, head
    for a, b in zip(jax.tree.leaves(g_all["f_h"]), jax.tree.leaves(g_last["f_h"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_paper_carry_halts_and_resets_rows(batch):
    """TRM deep supervision with a carry: a row runs until q_halt > 0 (train) or supervision_steps, then
    restarts from z_0 on the incoming batch's example; evaluation (train=False) halts only at the maximum."""
    b = batch["inputs"].shape[0]
    other = dict(batch, inputs=jnp.roll(batch["inputs"], 1, axis=0), targets=jnp.roll(batch["targets"], 1, axis=0))
    rng = jax.random.key(0)
    cfg = GramConfig(**PAPER, halt_exploration_prob=0.0)

    never = _with_halt_bias(cfg, -20.0)
    step = jax.jit(lambda c, bt: never.loss(bt, rng=rng, carry=c).carry)
    carry = step(never.initial_carry(b), batch)
    assert not bool(carry["halted"].any())
    carry = step(carry, other)  # nobody halted: rows keep their example and state
    np.testing.assert_array_equal(carry["data"]["inputs"], batch["inputs"])
    np.testing.assert_array_equal(carry["steps"], np.full(b, 2))
    carry = step(carry, other)
    assert bool(carry["halted"].all())  # supervision_steps = 3 reached
    carry = step(carry, other)  # halted rows load the new example and start again
    np.testing.assert_array_equal(carry["data"]["inputs"], other["inputs"])
    np.testing.assert_array_equal(carry["steps"], np.ones(b))

    always = _with_halt_bias(cfg, 20.0)
    carry = jax.jit(lambda c: always.loss(batch, rng=rng, carry=c).carry)(always.initial_carry(b))
    assert bool(carry["halted"].all())  # q_halt > 0 after the first step
    carry = jax.jit(lambda c: always.loss(batch, rng=rng, train=False, carry=c).carry)(always.initial_carry(b))
    assert not bool(carry["halted"].any())  # evaluation: no early halting


def test_halting_rollout_stops_at_first_positive_halt(batch):
    """Test-time halting: stop after the first supervision step whose q_halt > 0, else at max_segments;
    the answer is the prior trajectory of that depth (same noise stream as `rollout`)."""
    cfg = GramConfig(**PAPER)
    key = jax.random.key(7)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"], batch["weights"], key)
    n = cfg.num_transitions
    for bias, depth in ((20.0, n), (-20.0, 2 * n)):
        m = _with_halt_bias(cfg, bias)
        pred, reward, halt, depth_B = jax.jit(lambda: m.halting_rollout(*args, max_segments=2))()
        ref_pred, ref_reward, ref_halt = jax.jit(lambda: m.rollout(*args, depth))()
        np.testing.assert_array_equal(depth_B, np.full(batch["inputs"].shape[0], depth))
        np.testing.assert_array_equal(pred, ref_pred)
        np.testing.assert_allclose(reward, ref_reward, rtol=1e-6, atol=1e-6)
    out = jax.jit(lambda: m.sample_halting(batch, key, num_samples=2, max_segments=2))()
    assert out["preds"].shape == (2,) + batch["inputs"].shape and out["depth"].shape == (2, batch["inputs"].shape[0])


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(objective="bogus"), "model.objective"),
        (dict(objective="paper", prior_ce_weight=0.0), "model.carry_posterior"),
        (dict(objective="paper", carry_posterior=True), "model.prior_ce_weight"),
        (dict(halt_exploration_prob=1.5), "model.halt_exploration_prob"),
    ],
)
def test_paper_objective_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        GramConfig(**kw)


def test_published_config_uses_the_paper_objective():
    """configs/gram_sudoku.py trains the paper's objective; the CPU config keeps our variant (README numbers)."""
    from looped_jax.config import load_config

    root = Path(__file__).resolve().parents[2] / "configs"
    paper = load_config(root / "gram_sudoku.py").model
    assert (paper.objective, paper.carry_posterior, paper.prior_ce_weight) == ("paper", True, 0.0)
    assert load_config(root / "gram_sudoku_cpu.py").model.objective == "prior_carry"
    assert load_config(root / "gram_sudoku_cpu_paper.py").model.objective == "paper"
