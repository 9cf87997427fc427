"""The reference's slot-sharing cache lookups compress-s{n} / compress-r{n}: hand-made slot maps,
the cache a prefill leaves, decode reads through shared slots, and equality with "full" and
with ``cache_sharing_slots`` where the reference semantics say they agree."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.models import build_model
from looped_jax.models.generate import (
    ExitRule,
    core_cache_slots,
    generate,
    init_recurrent_depth_cache,
    parse_cache_lookup,
    recurrent_depth_forward_cached,
)
from looped_jax.models.generate import flat_slot as flat_slot_of
from tests.models.tiny_rd import PROMPT
from tests.models.tiny_rd import RD as CFG

LOOPS = 4  # 8 core layer applications j = 0..7

# Hand-made: the flat slot of each core application j = loop * 2 + layer, and the rows needed.
SLOT_MAPS = {
    "compress-s3": ([0, 1, 2, 0, 1, 2, 0, 1], 2),  # j % 3; 3 flat slots -> 2 rows of 2 layers
    "compress-s4": ([0, 1, 2, 3, 0, 1, 2, 3], 2),  # j % 4: loop i in row i % 2, its own layer column
    "compress-r3": ([0, 0, 0, 1, 1, 1, 2, 2], 2),  # j // 3: layers of different loops share slots
    "compress-r2": ([0, 0, 1, 1, 2, 2, 3, 3], 2),  # j // 2: both layers of loop i in flat slot i
    "compress-s8": ([0, 1, 2, 3, 4, 5, 6, 7], 4),  # no sharing: as "full"
    "compress-r1": ([0, 1, 2, 3, 4, 5, 6, 7], 4),
    "full": ([0, 1, 2, 3, 4, 5, 6, 7], 4),
}


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, rngs=nnx.Rngs(0))


def test_slot_maps_are_the_references():
    for lookup, (slots, rows) in SLOT_MAPS.items():
        got = [int(flat_slot_of(lookup, jnp.int32(j), rows, 2)) for j in range(LOOPS * 2)]
        assert got == slots, lookup
        assert core_cache_slots(lookup, LOOPS, 2) == rows, lookup
    assert parse_cache_lookup("compress-s12") == ("compress-s", 12)
    for bad in ("compress-s0", "compress-x4", "compress-s", "latest"):
        with pytest.raises(ValueError, match="cache_lookup"):
            parse_cache_lookup(bad)


def _prefill(model, lookup, rows):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        cache = init_recurrent_depth_cache(m, 2, PROMPT.shape[1] + 1, rows)
        zeros = jnp.zeros(PROMPT.shape + (CFG.d_model,))
        logits, _, _, cache = recurrent_depth_forward_cached(
            m, PROMPT, cache, zeros, index=jnp.int32(0), num_loops=LOOPS, cache_lookup=lookup
        )
        return logits, cache

    return run(state)


def _entry(core, g):  # flat slot g of a [rows, 2, ...] core cache
    return jax.tree.map(lambda a: a[g // 2, g % 2], core)


@pytest.mark.parametrize("lookup", ["compress-s3", "compress-r3", "compress-r2", "compress-s4"])
def test_prefill_keeps_each_slots_last_writer(model, lookup):
    """A prefill reads no earlier tokens, so its logits equal "full"'s and each flat slot holds the
    entry of the last application j mapped to it (the reference's dict overwrite)."""
    full_logits, full = _prefill(model, "full", LOOPS)
    slots, rows = SLOT_MAPS[lookup]
    logits, cache = _prefill(model, lookup, rows)
    np.testing.assert_allclose(logits, full_logits, rtol=1e-6, atol=1e-6)
    assert cache.core.k_BSKH.shape[:2] == (rows, 2)
    for g in sorted(set(slots)):
        last = max(j for j, s in enumerate(slots) if s == g)
        for got, want in zip(
            jax.tree.leaves(_entry(cache.core, g)), jax.tree.leaves(_entry(full.core, last)), strict=True
        ):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("lookup", ["compress-r3", "compress-s3"])
def test_decode_reads_shared_slots(model, lookup):
    """Decoding through a shared slot equals "full" decoding over a cache in which every
    application j's entry is replaced by its slot's last writer: what the reference reads."""
    slots, rows = SLOT_MAPS[lookup]
    _, full = _prefill(model, "full", LOOPS)
    _, cache = _prefill(model, lookup, rows)
    last = {g: max(j for j, s in enumerate(slots) if s == g) for g in set(slots)}
    seen = jax.tree.map(lambda a: jnp.stack([a[last[slots[j]] // 2, last[slots[j]] % 2] for j in range(8)]), full.core)
    seen = jax.tree.map(lambda a: a.reshape((LOOPS, 2) + a.shape[1:]), seen)
    token = jnp.array([[4], [9]], jnp.int32)
    graphdef, state = nnx.split(model)

    def decode(state, cache, lookup_is_full):
        m = nnx.merge(graphdef, state)
        return recurrent_depth_forward_cached(
            m,
            token,
            cache,
            jnp.zeros((2, 1, CFG.d_model)),
            index=jnp.int32(PROMPT.shape[1]),
            num_loops=LOOPS,
            cache_lookup="full" if lookup_is_full else lookup,
        )[0]

    decode = jax.jit(decode, static_argnums=2)
    got = decode(state, cache, False)
    want = decode(state, full._replace(core=seen), True)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, decode(state, full, True), atol=1e-4)  # the sharing does change the reads


RULE = ExitRule("latent-diff", 1.0)  # tokens exit after 1 or 2 of the 4 loops on this model


@functools.cache
def _gen(freeze, lookup="full", slots=0):
    model = build_model(CFG, rngs=nnx.Rngs(0))
    out = generate(
        model,
        PROMPT,
        max_new_tokens=6,
        num_loops=LOOPS,
        exit_rule=RULE,
        cache_lookup=lookup,
        cache_sharing_slots=slots,
        freeze_exited=freeze,
    )
    return np.asarray(out.tokens_BT), np.asarray(out.steps_BT)


@pytest.mark.parametrize("n, m, freeze", [(4, 2, False), (6, 3, True)])
def test_compress_s_of_whole_loops_is_cache_sharing(n, m, freeze):
    """compress-s{m * C} is ``cache_sharing_slots = m`` under the reference's name."""
    a, b = _gen(freeze, f"compress-s{n}"), _gen(freeze, slots=m)
    assert len(np.unique(a[1][:, 1:])) > 1  # tokens do exit at different steps
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(
    "lookup, freeze", [("compress-s8", False), ("compress-r1", False), ("compress-s50", True), ("compress-r1", True)]
)
def test_compress_without_sharing_equals_full(lookup, freeze):
    """With a slot per application (compress-s{n >= r * C}, compress-r1) nothing is shared and
    generation, early exits included, equals "full"."""
    full, out = _gen(freeze), _gen(freeze, lookup)
    assert len(np.unique(full[1][:, 1:])) > 1  # tokens do exit at different steps
    np.testing.assert_array_equal(out[0], full[0])
    np.testing.assert_array_equal(out[1], full[1])


def test_compress_errors(model):
    with pytest.raises(ValueError, match="both set"):
        generate(model, PROMPT, max_new_tokens=2, cache_lookup="compress-s4", cache_sharing_slots=2)
    cache = init_recurrent_depth_cache(model, 2, 6, 1)
    with pytest.raises(ValueError, match="needs 2 core cache rows"):
        recurrent_depth_forward_cached(
            model, PROMPT, cache, jnp.zeros((2, 5, 32)), index=jnp.int32(0), num_loops=4, cache_lookup="compress-r3"
        )
