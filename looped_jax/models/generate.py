"""Autoregressive generation with KV caches for the recurrent-depth and looped models.

Recurrent depth (Geiping et al. 2025, Sec. 6): the core's cache is keyed by (loop step, core
layer) and position -- a [num_slots, num_core_layers, B, S, ...] buffer -- because each loop
step's attention must see the earlier tokens' keys *at that step*. With per-token early exit
a token that stops after j steps never computes steps > j; its entries there are filled
according to ``cache_lookup`` (the reference's ``HuginnDynamicCache`` lookup strategies):
"full" (default, as the reference): later tokens attend at step k only to tokens that reached
step k (the missing entries are empty, masked); "skip" is the same (identical in the
reference's dynamic cache; its static cache's "full" attends to zero-filled entries instead,
which is not reproduced); "latest-m4": the missing entries are copies of the token's deepest
entry for the same core layer.

Slot sharing, the reference's "compress-s{n}" / "compress-r{n}": the reference numbers every
layer application (prelude 0, 1, then core j = loop step * C + layer, C core layers) and maps
core application j to slot j % n (compress-s: the cache cycles through n slots) or j // n
(compress-r: n consecutive applications share one slot), n counted in layer applications, so a
slot may hold different layers' keys (n not a multiple of C, or compress-r). We do the same:
flat slot g is row g // C, column g % C of the [rows, C, ...] buffer, layers write in order
(the last writer of a slot stays, as the reference's dict update) and every layer reads the
slots as they were before its loop step (the reference writes the current positions, then reads).
``cache_sharing_slots = m > 0`` is compress-s{m * C} under another name (loop step i in row
i % m) and also combines with "latest-m4" (the reference's "latest-m4-compress-s{m * C}").
A prefill fills the compressed cache exactly as "full" would, keeping each slot's last writer;
compress-s{n >= r * C} and compress-r1 share nothing and equal "full". Departure: an early-exited
token's never-written compressed slots stay empty (masked, as "full"); the reference raises.
A token that exits early keeps, per slot, its latest entry.

Exits use one named criterion (`looped_jax.models.huginn_exit`). Batched decoding, as the
reference's ``generate_with_adaptive_compute``: every row keeps stepping (and writing the
cache) until all rows exited, an exited row's token and warm-start latent are taken at its
exit step; ``freeze_exited=True`` instead stops exited rows (cache entries per the lookup).
With one row both are the same. Departures: the prompt always runs the full loop count (the
reference may exit in prefill unless ``do_not_exit_in_prefill``); the coda cache at a decoded
position holds the readout of the exit latent (freeze) or of the last step (all rows step).
``warm_start`` starts each new token's latent from the previous token's final latent
("continuous compute"). The prompt is always run for the full loop count.

The core loop goes through the loop engine: `unroll` for a fixed loop count and
`iterate_to_convergence` for per-token exits, with the core cache as the engine's aux carry.

The looped model caches every (loop, layer, repeat) application: [L, k * repeat, B, S, ...].
The whole generation is one jitted function: prefill, then a ``lax.scan`` over new tokens.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.models.huginn_exit import ExitRule, adaptive_loop, resolve_exit_rule
from looped_jax.models.looped import LoopedModel
from looped_jax.models.recurrent_depth import RecurrentDepthModel
from looped_jax.nn import KVCache, apply_stack, resolve_dtype
from looped_jax.recurrence import unroll

__all__ = [
    "CACHE_LOOKUPS",
    "ExitRule",
    "GenerateOutput",
    "core_cache_slots",
    "generate",
    "parse_cache_lookup",
    "recurrent_depth_forward_cached",
]
CACHE_LOOKUPS = ("full", "skip", "latest-m4")


class GenerateOutput(NamedTuple):
    tokens_BT: jax.Array  # int32 [B, max_new_tokens], the new tokens only
    steps_BT: jax.Array  # int32 [B, max_new_tokens], core iterations spent producing each new token


class RecurrentDepthCache(NamedTuple):
    prelude: tuple[KVCache, ...]
    core: KVCache  # arrays with leading [num_slots, num_core_layers]
    coda: tuple[KVCache, ...]


def _take(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _put(tree, i, new):
    return jax.tree.map(lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, i, 0), tree, new)


def _empty(cfg, batch: int, length: int, lead: tuple[int, ...] = ()) -> KVCache:
    one = KVCache.empty(batch, length, cfg.num_kv_heads, cfg.head_dim, resolve_dtype(cfg.dtype))
    return jax.tree.map(lambda a: jnp.zeros(lead + a.shape, a.dtype), one)


def init_recurrent_depth_cache(
    model: RecurrentDepthModel, batch: int, length: int, num_slots: int
) -> RecurrentDepthCache:
    cfg = model.cfg
    return RecurrentDepthCache(
        prelude=tuple(_empty(cfg, batch, length) for _ in range(cfg.num_prelude_layers)),
        core=_empty(cfg, batch, length, (num_slots, cfg.num_core_layers)),
        coda=tuple(_empty(cfg, batch, length) for _ in range(cfg.num_coda_layers)),
    )


def parse_cache_lookup(cache_lookup: str) -> tuple[str, int]:
    """(kind, n) of a lookup name: ("full" | "skip" | "latest-m4", 0) or ("compress-s" |
    "compress-r", n) for the reference's "compress-s{n}" / "compress-r{n}", n >= 1."""
    if cache_lookup in CACHE_LOOKUPS:
        return cache_lookup, 0
    m = re.fullmatch(r"(compress-[sr])([0-9]+)", cache_lookup)
    if m is None or int(m.group(2)) < 1:
        raise ValueError(
            f"cache_lookup must be one of {CACHE_LOOKUPS} or compress-s<n> / compress-r<n> (n >= 1), "
            f"got {cache_lookup!r}"
        )
    return m.group(1), int(m.group(2))


def core_cache_slots(cache_lookup: str, num_loops: int, num_core_layers: int) -> int:
    """Rows of the core cache ([rows, num_core_layers, ...]) that ``cache_lookup`` needs for
    ``num_loops`` steps: the flat slots (module docstring) packed num_core_layers to a row."""
    kind, n = parse_cache_lookup(cache_lookup)
    applications = num_loops * num_core_layers
    flat = min(n, applications) if kind == "compress-s" else -(-applications // n) if kind == "compress-r" else 0
    return -(-flat // num_core_layers) if flat else num_loops


def flat_slot(cache_lookup: str, application, num_rows: int, num_core_layers: int):
    """Flat cache slot of core layer application j = loop step * num_core_layers + layer: j % n
    (compress-s{n}), j // n (compress-r{n}), else j modulo the cache's rows * layers (no sharing
    when it has a row per loop step, ``cache_sharing_slots`` rows otherwise). Flat slot g lives
    at row g // num_core_layers, layer column g % num_core_layers."""
    kind, n = parse_cache_lookup(cache_lookup)
    if kind == "compress-s":
        return application % n
    if kind == "compress-r":
        return application // n
    return application % (num_rows * num_core_layers)


def _core_step_fn(model: RecurrentDepthModel, num_slots: int, cache_lookup: str = "full"):
    """(step, params): the loop engine's step over the carry (s_BTD, core cache).

    ``step(params, (s_BTD, core), (e_BTD, positions_BT, segment_ids_BT, cache_index), index=i,
    active=None)`` runs loop step ``i``; core layer l reads and writes flat slot
    ``flat_slot(cache_lookup, i * C + l)`` (C core layers), the writes in layer order, so where
    layers share a slot the last one's entry stays (the reference's dict update). Every layer
    reads the slots as they were before the step (as the reference, whose layer overwrites the
    current positions before it reads). With ``active`` (bool [B], the rows still iterating),
    inactive rows keep, at this position, the slot's old content (empty, or their own earlier
    entry with sharing), or with "latest-m4" their deepest entry: a copy of the previous step's
    slot while the slots are being filled for the first time (i < num_slots). Their latent is
    masked by the caller.
    """
    graphdef, params = nnx.split(model.core)
    num_layers = model.cfg.num_core_layers
    latest = cache_lookup == "latest-m4"

    def step(params, carry, inputs, *, index, active=None):
        s_BTD, core_cache = carry
        e_BTD, positions_BT, segment_ids_BT, cache_index = inputs
        slots = [flat_slot(cache_lookup, index * num_layers + l, num_slots, num_layers) for l in range(num_layers)]
        where = [(g // num_layers, g % num_layers) for g in slots]
        olds = [_take(_take(core_cache, r), c) for r, c in where]
        old = jax.tree.map(lambda *a: jnp.stack(a), *olds)
        core = nnx.merge(graphdef, params)
        s_new_BTD, new = core(s_BTD, e_BTD, positions_BT, segment_ids_BT, caches=old, cache_index=cache_index)
        if active is not None:
            prev = _take(core_cache, (index - 1) % num_slots)
            length = s_BTD.shape[1]
            at = lambda a: jax.lax.dynamic_slice_in_dim(a, cache_index, length, axis=2)

            def patch(new_a, old_a, prev_a):  # [C, B, S, ...]
                fill = jnp.where(index < num_slots, at(prev_a), at(old_a)) if latest else at(old_a)
                keep = active.reshape((1, -1) + (1,) * (new_a.ndim - 2))
                return jax.lax.dynamic_update_slice_in_dim(new_a, jnp.where(keep, at(new_a), fill), cache_index, axis=2)

            new = jax.tree.map(patch, new, old, prev)
        for layer, (r, c) in enumerate(where):
            core_cache = _put(core_cache, r, _put(_take(core_cache, r), c, _take(new, layer)))
        return s_new_BTD, core_cache

    return step, params


def _readout_fn(model: RecurrentDepthModel, positions_BT, segment_ids_BT, coda_caches, cache_index):
    """(readout, params): ``readout(params, s_BTD) -> (logits_BTV, coda caches)``, the coda and
    head reading and writing ``coda_caches`` at ``cache_index`` -- the same pieces, in the same
    order, as `RecurrentDepthModel.readout_fn` (coda input norm and tied head where configured)."""
    cfg = model.cfg
    head = model.embed if cfg.tie_embeddings else model.unembed
    graphdefs, params = zip(*(nnx.split(m) for m in (model.coda, model.final_norm, head)), strict=True)

    def readout(params, s_BTD):
        coda, norm, head = (nnx.merge(g, p) for g, p in zip(graphdefs, params, strict=True))
        x_BTD, caches = apply_stack(
            coda,
            norm(s_BTD) if cfg.coda_input_norm else s_BTD,
            positions_BT,
            segment_ids_BT,
            caches=list(coda_caches),
            cache_index=cache_index,
        )
        x_BTD = norm(x_BTD)
        return (head.attend(x_BTD) if cfg.tie_embeddings else head(x_BTD)), tuple(caches)

    return readout, params


def _fill_unreached_slots(core: KVCache, num_iterations: jax.Array, cache_index: jax.Array) -> KVCache:
    """Slots no row reached (the loop ended after ``num_iterations`` < num_slots steps) get, at
    this position, a copy of slot ``num_iterations - 1``: every row's deepest entry there."""

    def fill(a):  # [N, C, B, S, ...]
        num_slots = a.shape[0]
        col = jax.lax.dynamic_slice_in_dim(a, cache_index, 1, axis=3)
        deepest = jax.lax.dynamic_index_in_dim(col, jnp.minimum(num_iterations, num_slots) - 1, 0, keepdims=True)
        unreached = (jnp.arange(num_slots) >= num_iterations).reshape((num_slots,) + (1,) * (a.ndim - 1))
        return jax.lax.dynamic_update_slice_in_dim(a, jnp.where(unreached, deepest, col), cache_index, axis=3)

    return jax.tree.map(fill, core)


def recurrent_depth_forward_cached(
    model: RecurrentDepthModel,
    tokens_BT: jax.Array,
    cache: RecurrentDepthCache,
    s0_BTD: jax.Array,
    *,
    index: jax.Array,
    num_loops: int,
    exit_rule: ExitRule | None = None,
    cache_lookup: str = "full",
    freeze_exited: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, RecurrentDepthCache]:
    """Runs ``tokens_BT`` (at positions index..index+T-1) through the model, reading and
    writing ``cache``. Returns (logits_BTV, latent s_BTD (at exit), steps_B, cache).

    Without ``exit_rule`` every token runs ``num_loops`` steps (`unroll`). With it (decode,
    T == 1) rows exit by the rule (`huginn_exit.adaptive_loop`, one element per row) and their
    missing cache entries follow ``cache_lookup`` (module docstring).
    """
    parse_cache_lookup(cache_lookup)
    batch, length = tokens_BT.shape
    num_slots = cache.core.k_BSKH.shape[0]
    need = core_cache_slots(cache_lookup, num_loops, model.cfg.num_core_layers)
    if cache_lookup.startswith("compress") and num_slots < need:
        raise ValueError(f"{cache_lookup} over {num_loops} loops needs {need} core cache rows, got {num_slots}")
    positions_BT = index + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    segment_ids_BT = jnp.ones((batch, length), jnp.int32)
    e_BTD, prelude = apply_stack(
        model.prelude,
        model.embed_tokens(tokens_BT),
        positions_BT,
        segment_ids_BT,
        caches=list(cache.prelude),
        cache_index=index,
    )
    latest = cache_lookup == "latest-m4"
    step, core_params = _core_step_fn(model, num_slots, cache_lookup)
    readout, readout_params = _readout_fn(model, positions_BT, segment_ids_BT, cache.coda, index)
    inputs = (e_BTD, positions_BT, segment_ids_BT, index)
    rule = resolve_exit_rule(exit_rule)

    if rule is None:
        (s_BTD, core), _ = unroll(step, core_params, (s0_BTD, cache.core), inputs, num_steps=num_loops, with_index=True)
        steps_B = jnp.full((batch,), num_loops, jnp.int32)
        s_out_BTD = s_BTD
    else:
        if length != 1:
            raise ValueError(f"per-token exit decodes one token at a time, got {length} tokens")
        result = adaptive_loop(
            lambda s, aux, k, active: step(core_params, (s, aux), inputs, index=k, active=active),
            lambda s: readout(readout_params, s)[0],
            s0_BTD,
            rule._replace(per_sequence=True),
            max_steps=num_loops,
            vocab_size=model.cfg.vocab_size,
            freeze=freeze_exited,
            aux=cache.core,
        )
        s_out_BTD, steps_B = result.out_s, result.steps
        s_BTD = result.out_s if freeze_exited else result.final_s
        core = _fill_unreached_slots(result.aux, result.num_iterations, index) if latest else result.aux

    logits_BTV, coda = readout(readout_params, s_BTD)
    if s_out_BTD is not s_BTD:
        logits_BTV = readout(readout_params, s_out_BTD)[0]
    return logits_BTV, s_out_BTD, steps_B, RecurrentDepthCache(tuple(prelude), core, coda)


def looped_forward_cached(model: LoopedModel, tokens_BT: jax.Array, cache: KVCache, *, index: jax.Array):
    """Cached forward of the looped model; ``cache`` arrays lead with [L, k * block_repeat]."""
    batch, length = tokens_BT.shape
    positions_BT = index + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    segment_ids_BT = jnp.ones((batch, length), jnp.int32)
    e_BTD = model.embed_tokens(tokens_BT)
    graphdef, params = nnx.split(model.body)

    def loop(x_BTD, xs):
        p, c = xs
        x_BTD, c = nnx.merge(graphdef, p)(x_BTD, e_BTD, positions_BT, segment_ids_BT, caches=c, cache_index=index)
        return x_BTD, c

    # A plain scan, not the engine's `unroll`: loop l reads its own cache slice and returns the
    # updated one, so the cache is a per-step input *and* a per-step output (scan's xs -> ys).
    # `unroll` has per-step inputs but no per-step outputs (record_fn sees only the carry), so
    # it would need the whole cache in the carry with a slice-and-update by index each step --
    # more code for the same loop -- and generation needs none of its gradient options.
    if model.cfg.share_weights:
        x_BTD, cache = jax.lax.scan(lambda x, c: loop(x, (params, c)), model.initial_state(e_BTD), cache)
    else:
        x_BTD, cache = jax.lax.scan(loop, model.initial_state(e_BTD), (params, cache))
    return model.head(x_BTD), cache


def _select(logits_BV, key, temperature: float):
    if temperature > 0:
        return jax.random.categorical(key, logits_BV / temperature, axis=-1).astype(jnp.int32)
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_new_tokens",
        "num_loops",
        "exit_rule",
        "cache_sharing_slots",
        "cache_lookup",
        "freeze_exited",
        "warm_start",
        "temperature",
        "has_rng",
    ),
)
def _generate(
    graphdef,
    state,
    prompt_BT,
    rng,
    *,
    max_new_tokens,
    num_loops,
    exit_rule,
    cache_sharing_slots,
    cache_lookup,
    freeze_exited,
    warm_start,
    temperature,
    has_rng,
):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt_BT.shape
    length = prompt_len + max_new_tokens
    recurrent = isinstance(model, RecurrentDepthModel)
    d_model = model.cfg.d_model

    if recurrent:
        rows = cache_sharing_slots or core_cache_slots(cache_lookup, num_loops, model.cfg.num_core_layers)
        cache = init_recurrent_depth_cache(model, batch, length, rows)

        def s0(key, t):
            return model.initial_state(jnp.zeros((batch, t, d_model)), key if has_rng else None)

        def forward(tokens_BT, cache, s0_BTD, index, rule):
            return recurrent_depth_forward_cached(
                model,
                tokens_BT,
                cache,
                s0_BTD,
                index=index,
                num_loops=num_loops,
                exit_rule=rule,
                cache_lookup=cache_lookup,
                freeze_exited=freeze_exited,
            )
    else:
        cfg = model.cfg
        cache = _empty(cfg, batch, length, (cfg.num_loops, cfg.num_layers * cfg.block_repeat))
        s0 = lambda key, t: jnp.zeros((batch, t, d_model))

        def forward(tokens_BT, cache, s0_BTD, index, rule):
            logits_BTV, cache = looped_forward_cached(model, tokens_BT, cache, index=index)
            return logits_BTV, s0_BTD, jnp.full((batch,), num_loops, jnp.int32), cache

    rng, key = jax.random.split(rng)
    logits_BTV, s_BTD, steps_B, cache = forward(prompt_BT, cache, s0(key, prompt_len), jnp.int32(0), None)

    def body(carry, i):
        cache, logits_BV, s_B1D, steps_B, rng = carry
        rng, k_tok, k_state = jax.random.split(rng, 3)
        token_B = _select(logits_BV, k_tok, temperature)
        start = s_B1D if warm_start else s0(k_state, 1)
        logits_BTV, s_B1D, new_steps_B, cache = forward(token_B[:, None], cache, start, prompt_len + i, exit_rule)
        return (cache, logits_BTV[:, -1], s_B1D, new_steps_B, rng), (token_B, steps_B)

    carry = (cache, logits_BTV[:, -1], s_BTD[:, -1:], steps_B, rng)
    # A scan over new tokens, not the loop engine's: a sequence recurrence (each token's input is
    # the previous token's output), not iterations of a shared step over one latent.
    carry, (tokens_NB, steps_NB) = jax.lax.scan(body, carry, jnp.arange(max_new_tokens - 1, dtype=jnp.int32))
    _, logits_BV, _, steps_B, rng = carry
    last_B = _select(logits_BV, jax.random.split(rng, 3)[1], temperature)
    tokens_BN = jnp.concatenate([tokens_NB.T, last_B[:, None]], axis=1)
    steps_BN = jnp.concatenate([steps_NB.T, steps_B[:, None]], axis=1)
    return GenerateOutput(tokens_BN, steps_BN)


def generate(
    model: RecurrentDepthModel | LoopedModel,
    prompt_BT: jax.Array,
    *,
    max_new_tokens: int,
    num_loops: int | None = None,
    exit_rule: ExitRule | None = None,
    cache_sharing_slots: int = 0,
    cache_lookup: str = "full",
    freeze_exited: bool = False,
    warm_start: bool = False,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
) -> GenerateOutput:
    """Generates ``max_new_tokens`` tokens after ``prompt_BT`` (int32 [B, T], no padding).

    ``num_loops``: core iterations per token (recurrent depth; default eval_loops; with an
    ``exit_rule`` the cap). ``temperature == 0`` is greedy; sampling needs ``rng``, which
    also draws each token's s_0 (without it s_0 = 0, matching ``model(..., rng=None)``; the
    reference samples s_0 unless init_scale = 0). ``exit_rule``: one named criterion
    (`huginn_exit.ExitRule`); ``cache_lookup`` / ``freeze_exited``: see the module docstring.
    """
    if prompt_BT.ndim != 2 or prompt_BT.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {prompt_BT.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or (temperature > 0 and rng is None):
        raise ValueError(f"temperature must be >= 0, and > 0 needs an rng; got {temperature} with rng={rng}")
    if cache_sharing_slots < 0:
        raise ValueError(f"cache_sharing_slots must be >= 0, got {cache_sharing_slots}")
    if isinstance(model, RecurrentDepthModel):
        num_loops = model.cfg.default_eval_loops if num_loops is None else int(num_loops)
        if num_loops < 1:
            raise ValueError(f"num_loops must be >= 1, got {num_loops}")
        exit_rule = resolve_exit_rule(exit_rule)
        if parse_cache_lookup(cache_lookup)[0].startswith("compress") and cache_sharing_slots:
            raise ValueError(f"cache_sharing_slots and {cache_lookup} both set the slot sharing; give one")
    elif isinstance(model, LoopedModel):
        if num_loops not in (None, model.cfg.num_loops):
            raise ValueError(f"the looped model generates with its num_loops={model.cfg.num_loops}, got {num_loops}")
        if exit_rule is not None or cache_sharing_slots or warm_start:
            raise ValueError("exit_rule, cache_sharing_slots and warm_start apply to the recurrent-depth model only")
        num_loops = model.cfg.num_loops
    else:
        raise ValueError(f"generate supports RecurrentDepthModel and LoopedModel, got {type(model).__name__}")
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        jnp.asarray(prompt_BT, jnp.int32),
        jax.random.key(0) if rng is None else rng,
        max_new_tokens=max_new_tokens,
        num_loops=num_loops,
        exit_rule=exit_rule,
        cache_sharing_slots=cache_sharing_slots,
        cache_lookup=cache_lookup,
        freeze_exited=bool(freeze_exited),
        warm_start=warm_start,
        temperature=float(temperature),
        has_rng=rng is not None,
    )
