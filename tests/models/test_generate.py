"""KV-cache generation: parity with the uncached forward and with a plainly written reference
of per-token exits, cache sharing and warm start; cache holes."""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.models import LoopedConfig, RecurrentDepthConfig, build_model
from looped_jax.models.generate import (
    CACHE_LOOKUPS,
    ExitRule,
    generate,
    init_recurrent_depth_cache,
    recurrent_depth_forward_cached,
)
from looped_jax.nn import KVCache, apply_stack
from tests.models.tiny_rd import PROMPT, RD

LOOPED = LoopedConfig(
    vocab_size=37, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64, num_layers=2, num_loops=2
)


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


@pytest.mark.parametrize(
    "kw",
    [
        dict(norm_style="pre", tie_embeddings=False, coda_input_norm=False, scale_embeddings=False, qk_bias=False),
        dict(tie_embeddings=False),
        dict(coda_input_norm=False),
    ],
    ids=["retrofit_layout", "untied", "no_coda_input_norm"],
)
def test_cached_forward_matches_uncached_logits_for_layout_options(kw):
    """The cached path reads out like the model (coda input norm, untied head) for every layout option."""
    model = build_model(dataclasses.replace(RD, **kw), rngs=nnx.Rngs(0))
    # Norm scales away from 1, so skipping or doubling a norm shows in the logits.
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(5), 64))
    state = jax.tree.map_with_path(
        lambda path, x: (
            x * jax.random.uniform(next(keys), x.shape, minval=0.3, maxval=3.0)
            if "scale" in jax.tree_util.keystr(path)
            else x
        ),
        state,
    )
    model = nnx.merge(graphdef, state)
    t, loops = PROMPT.shape[1], 3
    cache = init_recurrent_depth_cache(model, 2, t, loops)
    logits, _, _, _ = recurrent_depth_forward_cached(
        model, PROMPT, cache, jnp.zeros((2, t, 32)), index=jnp.int32(0), num_loops=loops
    )
    np.testing.assert_allclose(logits, model(PROMPT, num_loops=loops), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(share_weights=False, input_injection=True, block_repeat=2)])
def test_looped_greedy_matches_uncached(kw):
    model = build_model(dataclasses.replace(LOOPED, **kw), rngs=nnx.Rngs(0))
    out = generate(model, PROMPT, max_new_tokens=5)
    np.testing.assert_array_equal(out.steps_BT, LOOPED.num_loops)
    assert_greedy_matches_uncached(model, out, 5)


def test_adaptive_generation_options():
    model = build_model(RD, rngs=nnx.Rngs(0))
    out = generate(model, PROMPT, max_new_tokens=4, num_loops=5, exit_rule=ExitRule("latent-diff", 1e9))
    np.testing.assert_array_equal(out.steps_BT[:, 0], 5)  # the prompt runs every loop
    np.testing.assert_array_equal(out.steps_BT[:, 1:], 1)
    out = generate(
        model,
        PROMPT,
        max_new_tokens=4,
        num_loops=5,
        exit_rule=ExitRule("kl", 1e-2),
        cache_sharing_slots=2,
        warm_start=True,
        temperature=1.0,
        rng=jax.random.key(0),
    )
    assert out.tokens_BT.shape == (2, 4) and int(out.steps_BT.max()) <= 5 and int(out.steps_BT.min()) >= 1
    # A threshold nothing meets: identical to fixed-depth decoding, for every lookup.
    fixed = generate(model, PROMPT, max_new_tokens=4, num_loops=5)
    for lookup in CACHE_LOOKUPS:
        never = generate(
            model, PROMPT, max_new_tokens=4, num_loops=5, exit_rule=ExitRule("latent-diff", 0.0), cache_lookup=lookup
        )
        np.testing.assert_array_equal(never.tokens_BT, fixed.tokens_BT)
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
            m,
            tok,
            cache,
            s[:, -1:],
            index=jnp.int32(t),
            num_loops=loops,
            exit_rule=ExitRule("latent-diff", tol),
            cache_lookup="latest-m4",
            freeze_exited=True,
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


# ------------------------------------------------------------------------------------------------
# A plainly written reference of recurrent-depth decoding with per-token exits, built from the
# model's blocks: Python loops over tokens, loop steps and rows. Loop step i reads and writes
# cache slot i % n; a row that stopped after j steps has, in every slot, the entry of the deepest
# step it ran that maps to the slot, or (a slot it never reached, lookup latest-m4) its step j - 1
# entry (lookup full: nothing, masked). The exit is measured per row in float64: one criterion,
# relative latent change or KL(p_{k-1} || p_k), p_0 uniform. ``freeze=False``: every row steps
# and writes the cache until all exited; a row's output latent is the one at its exit.

RD1 = RecurrentDepthConfig(
    vocab_size=32,
    d_model=32,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    mlp_dim=64,
    num_prelude_layers=1,
    num_core_layers=1,
    num_coda_layers=1,
    mean_loops=8,
    grad_steps=2,
)
PROMPT1 = jax.random.randint(jax.random.key(1), (3, 4), 0, 32)
LOOPS1 = 10


@functools.cache
def rd1_model():
    return build_model(RD1, rngs=nnx.Rngs(0))


@functools.cache
def reference_pieces():
    """Jitted prelude / one core step / coda+head of ``rd1_model`` with explicit caches."""
    graphdef, state = nnx.split(rd1_model())

    @jax.jit
    def prelude(state, tokens_BT, positions_BT, caches, index):
        m = nnx.merge(graphdef, state)
        seg_BT = jnp.ones_like(tokens_BT)
        e_BTD, caches = apply_stack(
            m.prelude, m.embed_tokens(tokens_BT), positions_BT, seg_BT, caches=caches, cache_index=index
        )
        return e_BTD, caches

    @jax.jit
    def core(state, s_BTD, e_BTD, positions_BT, slot_cache, index):
        m = nnx.merge(graphdef, state)
        seg_BT = jnp.ones(positions_BT.shape, jnp.int32)
        return m.core(s_BTD, e_BTD, positions_BT, seg_BT, caches=slot_cache, cache_index=index)

    @jax.jit
    def coda(state, s_BTD, positions_BT, caches, index):
        m = nnx.merge(graphdef, state)
        seg_BT = jnp.ones(positions_BT.shape, jnp.int32)
        x_BTD, caches = apply_stack(m.coda, m.final_norm(s_BTD), positions_BT, seg_BT, caches=caches, cache_index=index)
        return m.head(x_BTD), caches

    return state, prelude, core, coda


def log_softmax64(logits_V):
    x = np.asarray(logits_V, np.float64)
    x = x - x.max()
    return x - np.log(np.sum(np.exp(x)))


def kl64(logits_p, logits_q):
    """KL(softmax(p) || softmax(q)) in float64, the textbook sum."""
    logp, logq = log_softmax64(logits_p), log_softmax64(logits_q)
    return float(np.sum(np.exp(logp) * (logp - logq)))


class Reference(NamedTuple):
    tokens: np.ndarray  # [B, N]
    steps: np.ndarray  # [B, N]
    kls: list  # per decode: [B] lists of KL(p_k || p_{k-1}) for the steps each row ran
    core: list  # per slot: KVCache with [C, B, S, ...] arrays, after the last decode
    logits: list  # per forward (prefill, then each decode): float32 [B, V] at the last position
    final_s: list  # per forward: [B, 1, D] final latent at the last position


def reference_decode(
    num_new,
    *,
    slots=0,
    warm_start=False,
    crit="latent-diff",
    thr=0.03,
    min_steps=0,
    start=None,
    lookup="latest-m4",
    freeze=True,
):
    """Greedy decoding of ``PROMPT1`` by ``rd1_model`` with s_0 = 0, written out plainly.

    ``start`` (optional, [B, 1, D]): the first decode's initial latent instead of the rule above.
    """
    state, prelude, core, coda = reference_pieces()
    cfg = RD1
    batch, t0 = PROMPT1.shape
    length = t0 + num_new
    n = slots or LOOPS1
    empty = lambda lead: jax.tree.map(
        lambda a: jnp.zeros(lead + a.shape, a.dtype), KVCache.empty(batch, length, cfg.num_kv_heads, cfg.head_dim)
    )
    pre_caches = [empty(()) for _ in range(cfg.num_prelude_layers)]
    coda_caches = [empty(()) for _ in range(cfg.num_coda_layers)]
    slot_caches = [empty((cfg.num_core_layers,)) for _ in range(n)]

    # Prefill: every row runs all loop steps.
    positions = jnp.broadcast_to(jnp.arange(t0, dtype=jnp.int32), (batch, t0))
    e, pre_caches = prelude(state, PROMPT1, positions, pre_caches, jnp.int32(0))
    s = jnp.zeros((batch, t0, cfg.d_model))
    for i in range(LOOPS1):
        s, slot_caches[i % n] = core(state, s, e, positions, slot_caches[i % n], jnp.int32(0))
    logits, coda_caches = coda(state, s, positions, coda_caches, jnp.int32(0))
    tokens = [np.argmax(np.asarray(logits[:, -1]), -1)]
    steps = [np.full(batch, LOOPS1)]
    all_logits, final_s, kls = [np.asarray(logits[:, -1])], [np.asarray(s[:, -1:])], []
    s_last = s[:, -1:]

    for k in range(num_new - 1):
        pos = t0 + k
        positions = jnp.full((batch, 1), pos, jnp.int32)
        e, pre_caches = prelude(state, jnp.asarray(tokens[-1][:, None], jnp.int32), positions, pre_caches, pos)
        if k == 0 and start is not None:
            s = jnp.asarray(start)
        else:
            s = s_last if warm_start else jnp.zeros((batch, 1, cfg.d_model))
        s = np.array(s)
        prev_logits = np.zeros((batch, cfg.vocab_size))  # uniform
        active = [True] * batch
        ran = [0] * batch
        out = s.copy()
        prev_s = s.copy()  # the criterion's previous latent: updated only on checked steps
        row_kls = [[] for _ in range(batch)]
        num_it = 0
        for i in range(LOOPS1):
            if not any(active):
                break
            num_it += 1
            q = i % n
            s_new, new_slot = core(state, jnp.asarray(s), e, positions, slot_caches[q], pos)
            s_new = np.asarray(s_new)
            step_logits = np.asarray(coda(state, jnp.asarray(s_new), positions, coda_caches, pos)[0][:, 0])
            written = jax.tree.map(np.array, slot_caches[q])
            for b in range(batch):
                if freeze and not active[b]:
                    continue
                for field, new_a in zip(written, new_slot, strict=True):  # this row's entry at pos
                    field[:, b, pos] = np.asarray(new_a)[:, b, pos]
                s[b] = s_new[b]
                if not active[b]:
                    continue
                ran[b] += 1
                if i < min_steps:
                    continue
                new64 = s_new[b].astype(np.float64)
                rel = np.linalg.norm(new64 - prev_s[b]) / np.linalg.norm(new64)
                prev_s[b] = s_new[b]
                kl = kl64(prev_logits[b], step_logits[b])  # KL(old || new)
                row_kls[b].append(kl)
                prev_logits[b] = step_logits[b]
                active[b] = not ((rel if crit == "latent-diff" else kl) < thr)
                if not active[b]:
                    out[b] = s_new[b]
            slot_caches[q] = KVCache(*written)
        for b in range(batch):
            if active[b]:
                out[b] = s[b]
            if not freeze:
                ran[b] = ran[b] if not active[b] else num_it
        if lookup == "latest-m4":  # slots a row never reached hold its deepest (last) entry
            slot_np = [jax.tree.map(np.array, c) for c in slot_caches]
            for b in range(batch):
                reached = ran[b] if freeze else num_it
                for q in range(reached, n):
                    for field, deepest in zip(slot_np[q], slot_np[reached - 1], strict=True):
                        field[:, b, pos] = deepest[:, b, pos]
            slot_caches = [KVCache(*c) for c in slot_np]
        logits, coda_caches = coda(state, jnp.asarray(s if not freeze else out), positions, coda_caches, pos)
        logits = coda(state, jnp.asarray(out), positions, coda_caches, pos)[0]
        s = out
        tokens.append(np.argmax(np.asarray(logits[:, -1]), -1))
        steps.append(np.array(ran))
        kls.append(row_kls)
        all_logits.append(np.asarray(logits[:, -1]))
        final_s.append(s)
        s_last = jnp.asarray(s)
    return Reference(np.stack(tokens, 1), np.stack(steps, 1), kls, slot_caches, all_logits, final_s)


@functools.cache
def reference(num_new, **kw):
    return reference_decode(num_new, **kw)


RULES = {
    "tol": dict(crit="latent-diff", thr=0.1),
    "kl": dict(crit="kl", thr=1e-2),
    "min_steps": dict(crit="latent-diff", thr=0.3, min_steps=4),
}


def as_rule(kw):
    return ExitRule(kw["crit"], kw["thr"], kw.get("min_steps", 0))


@pytest.mark.parametrize(
    "rule, slots, warm_start, lookup, freeze",
    [
        ("tol", 0, False, "latest-m4", True),
        ("kl", 2, True, "latest-m4", True),
        ("min_steps", 3, True, "latest-m4", True),
        ("tol", 0, False, "full", True),
        ("kl", 3, False, "full", True),
        ("tol", 0, True, "full", False),
        ("kl", 2, False, "latest-m4", False),
    ],
)
def test_generation_matches_plain_reference(rule, slots, warm_start, lookup, freeze):
    """Tokens and per-token steps equal the plainly written reference, for each exit rule, cache
    lookup, batched-exit mode, cache sharing and warm start."""
    kw = RULES[rule]
    ref = reference(6, slots=slots, warm_start=warm_start, lookup=lookup, freeze=freeze, **kw)
    out = generate(
        rd1_model(),
        PROMPT1,
        max_new_tokens=6,
        num_loops=LOOPS1,
        exit_rule=as_rule(kw),
        cache_sharing_slots=slots,
        cache_lookup=lookup,
        freeze_exited=freeze,
        warm_start=warm_start,
    )
    np.testing.assert_array_equal(out.steps_BT, ref.steps)
    np.testing.assert_array_equal(out.tokens_BT, ref.tokens)
    assert len(np.unique(ref.steps[:, 1:])) > 1  # rows and tokens exit at different steps


def manual_decode(num_new, *, slots, rule, warm_start, start=None, lookup="latest-m4", freeze=True):
    """The module's cached forward called one token at a time (greedy, s_0 = 0)."""
    model = rd1_model()
    graphdef, state = nnx.split(model)
    batch, t0 = PROMPT1.shape

    @functools.partial(jax.jit, static_argnames="exit_rule")
    def fwd(state, tokens_BT, cache, s0_BTD, index, exit_rule):
        m = nnx.merge(graphdef, state)
        return recurrent_depth_forward_cached(
            m,
            tokens_BT,
            cache,
            s0_BTD,
            index=index,
            num_loops=LOOPS1,
            exit_rule=exit_rule,
            cache_lookup=lookup,
            freeze_exited=freeze,
        )

    cache = init_recurrent_depth_cache(model, batch, t0 + num_new, slots or LOOPS1)
    logits, s, steps, cache = fwd(state, PROMPT1, cache, jnp.zeros((batch, t0, RD1.d_model)), jnp.int32(0), None)
    outs = [(logits[:, -1], s[:, -1:], steps)]
    for k in range(num_new - 1):
        token = jnp.argmax(outs[-1][0], -1).astype(jnp.int32)[:, None]
        if k == 0 and start is not None:
            s0 = start
        else:
            s0 = outs[-1][1] if warm_start else jnp.zeros((batch, 1, RD1.d_model))
        logits, s, steps, cache = fwd(state, token, cache, s0, jnp.int32(t0 + k), rule)
        outs.append((logits[:, -1], s, steps))
    return outs, cache


@pytest.mark.parametrize("slots, lookup, freeze", [(2, "latest-m4", True), (3, "full", True), (0, "full", False)])
def test_cache_sharing_slots_match_reference(slots, lookup, freeze):
    """With n slots the core cache has n entries per position and loop step i lives in slot i % n:
    the cache, logits and latents after a prefill and early-exit decodes equal the reference's."""
    rule = ExitRule("kl", 1e-2)
    ref = reference(4, slots=slots, warm_start=True, crit="kl", thr=1e-2, lookup=lookup, freeze=freeze)
    outs, cache = manual_decode(4, slots=slots, rule=rule, warm_start=True, lookup=lookup, freeze=freeze)
    slots = slots or LOOPS1
    assert cache.core.k_BSKH.shape[:2] == (slots, RD1.num_core_layers)
    for (logits, s, steps), ref_logits, ref_s, ref_steps in zip(
        outs, ref.logits, ref.final_s, ref.steps.T, strict=True
    ):
        np.testing.assert_array_equal(steps, ref_steps)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(s, ref_s, atol=1e-6, rtol=1e-6)
    for q in range(slots):
        for got, want in zip(jax.tree.leaves(_take_slot(cache.core, q)), jax.tree.leaves(ref.core[q]), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def _take_slot(core, q):
    return jax.tree.map(lambda a: a[q], core)


def test_warm_start_feeds_previous_final_latent():
    """With warm_start every decode starts from the previous token's final latent: generation
    equals a manual decode loop that passes that latent on, and differs from starting at s_0 = 0."""
    rule = ExitRule("latent-diff", 0.1)
    out = generate(
        rd1_model(),
        PROMPT1,
        max_new_tokens=5,
        num_loops=LOOPS1,
        exit_rule=rule,
        warm_start=True,
        cache_lookup="latest-m4",
        freeze_exited=True,
    )
    warm, _ = manual_decode(5, slots=0, rule=rule, warm_start=True)
    cold, _ = manual_decode(5, slots=0, rule=rule, warm_start=False)
    steps = lambda outs: np.stack([np.asarray(o[2]) for o in outs], 1)
    tokens = lambda outs: np.stack([np.argmax(np.asarray(o[0]), -1) for o in outs], 1)
    np.testing.assert_array_equal(out.steps_BT, steps(warm))
    np.testing.assert_array_equal(out.tokens_BT, tokens(warm))
    assert not np.array_equal(steps(warm), steps(cold))


@pytest.mark.parametrize("exit_step", [1, 2])
def test_kl_exit_threshold(exit_step):
    """A row exits at step k once KL(p_{k-1} || p_k) < threshold (p_0 uniform) and continues while
    it is above: threshold just above / below the measured KL of row 0 at step k = min_steps + 1."""
    # A tolerance nothing meets: every checked step's KL is measured. The reference checks (and
    # updates p_prev) only from step min_steps + 1 on, so the first KL is against uniform.
    ref = reference(2, crit="kl", thr=1e-12, min_steps=exit_step - 1)
    kl = ref.kls[0][0][0]
    assert kl > 1e-6
    for factor, exits in ((1.05, True), (0.95, False)):
        rule = ExitRule("kl", kl * factor, min_steps=exit_step - 1)
        (_, (_, _, steps)), _ = manual_decode(2, slots=0, rule=rule, warm_start=False)
        assert (int(steps[0]) == exit_step) == exits, (factor, int(steps[0]))


def test_exit_rule_errors_name_the_field():
    model = rd1_model()
    with pytest.raises(ValueError, match="ExitRule.min_steps"):
        generate(model, PROMPT1, max_new_tokens=2, exit_rule=ExitRule(min_steps=-1))
    with pytest.raises(ValueError, match="ExitRule.threshold"):
        generate(model, PROMPT1, max_new_tokens=2, exit_rule=ExitRule("kl", -1.0))
    with pytest.raises(ValueError, match="ExitRule.criterion"):
        generate(model, PROMPT1, max_new_tokens=2, exit_rule=ExitRule("kl+latent"))
    with pytest.raises(ValueError, match="cache_lookup"):
        generate(model, PROMPT1, max_new_tokens=2, cache_lookup="latest")
