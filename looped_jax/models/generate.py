"""Autoregressive generation with KV caches for the recurrent-depth and looped models.

Recurrent depth (Geiping et al. 2025, Sec. 6): the core's cache is keyed by (loop step, core
layer) and position -- a [num_slots, num_core_layers, B, S, ...] buffer -- because each loop
step's attention must see the earlier tokens' keys *at that step*. With per-token early exit
a token that stops after j steps never computes steps > j; its entries there are filled
with copies of its deepest entry (step j), so later tokens that loop longer still find a
key for it ("latest" lookup in the reference code). ``cache_sharing_slots = n > 0`` stores
loop step i in slot i % n, so the cache holds n steps instead of r (the reference's
"compress-s" strategy); a token that exits early then keeps, per slot, its deepest entry.
``warm_start`` starts each new token's latent from the previous token's final latent
("continuous compute"). The prompt is always run for the full loop count.

The looped model caches every (loop, layer, repeat) application: [L, k * repeat, B, S, ...].
The whole generation is one jitted function: prefill, then a ``lax.scan`` over new tokens.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.models.looped import LoopedModel
from looped_jax.models.recurrent_depth import RecurrentDepthModel
from looped_jax.nn import KVCache, apply_stack, resolve_dtype


class ExitRule(NamedTuple):
    """Per-token exit for recurrent-depth decoding: a token stops once every given criterion
    holds (relative latent change < tol, KL of successive next-token distributions < kl_tol),
    after at least ``min_loops`` steps. The reference's defaults are 0.03 and 5e-4."""

    tol: float | None = 0.03
    kl_tol: float | None = None
    min_loops: int = 1


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


def _readout_cached(model: RecurrentDepthModel, s_BTD, positions_BT, segment_ids_BT, coda_caches, index):
    x_BTD, coda_caches = apply_stack(
        model.coda, model.final_norm(s_BTD), positions_BT, segment_ids_BT, caches=list(coda_caches), cache_index=index
    )
    return model.head(x_BTD), tuple(coda_caches)


def _core_step_cached(model, s_BTD, e_BTD, positions_BT, segment_ids_BT, core_cache, i, index, num_slots, active_B):
    """Loop step ``i`` through slot ``i % num_slots``. Rows with ``active_B`` False keep, at
    this position, their deepest entry: a copy of the previous step's slot while the slots are
    being filled for the first time (i < num_slots), else the slot's old content."""
    slot = i % num_slots
    old = _take(core_cache, slot)
    s_new_BTD, new = model.core(s_BTD, e_BTD, positions_BT, segment_ids_BT, caches=old, cache_index=index)
    if active_B is not None:
        prev = _take(core_cache, (i - 1) % num_slots)
        length = s_BTD.shape[1]

        def patch(new_a, old_a, prev_a):  # [C, B, S, ...]
            at = lambda a: jax.lax.dynamic_slice_in_dim(a, index, length, axis=2)
            fill = jnp.where(i < num_slots, at(prev_a), at(old_a))
            keep = active_B.reshape((1, -1) + (1,) * (new_a.ndim - 2))
            return jax.lax.dynamic_update_slice_in_dim(new_a, jnp.where(keep, at(new_a), fill), index, axis=2)

        new = jax.tree.map(patch, new, old, prev)
    return s_new_BTD, _put(core_cache, slot, new)


def recurrent_depth_forward_cached(
    model: RecurrentDepthModel,
    tokens_BT: jax.Array,
    cache: RecurrentDepthCache,
    s0_BTD: jax.Array,
    *,
    index: jax.Array,
    num_loops: int,
    exit_rule: ExitRule | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, RecurrentDepthCache]:
    """Runs ``tokens_BT`` (at positions index..index+T-1) through the model, reading and
    writing ``cache``. Returns (logits_BTV, final latent s_BTD, steps_B, cache).

    Without ``exit_rule`` every token runs ``num_loops`` steps. With it (decode, T == 1) each
    row stops on its own and its missing cache entries are filled as described above.
    """
    batch, length = tokens_BT.shape
    num_slots = cache.core.k_BSKH.shape[0]
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
    step_args = (e_BTD, positions_BT, segment_ids_BT)

    if exit_rule is None:

        def fixed_body(i, carry):
            s_BTD, core = carry
            return _core_step_cached(model, s_BTD, *step_args, core, i, index, num_slots, None)

        s_BTD, core = jax.lax.fori_loop(0, num_loops, fixed_body, (s0_BTD, cache.core))
        steps_B = jnp.full((batch,), num_loops, jnp.int32)
    else:
        if length != 1:
            raise ValueError(f"per-token exit decodes one token at a time, got {length} tokens")
        s_BTD, core, steps_B = _adaptive_core(model, s0_BTD, step_args, cache, index, num_loops, num_slots, exit_rule)

    logits_BTV, coda = _readout_cached(model, s_BTD, positions_BT, segment_ids_BT, cache.coda, index)
    return logits_BTV, s_BTD, steps_B, RecurrentDepthCache(tuple(prelude), core, coda)


def _adaptive_core(model, s0_BTD, step_args, cache, index, max_loops, num_slots, rule: ExitRule):
    """While-loop over core steps with per-row exits (Geiping et al. 2025, Sec. 6)."""
    batch = s0_BTD.shape[0]
    vocab = model.cfg.vocab_size
    positions_BT, segment_ids_BT = step_args[1], step_args[2]
    init = {
        "i": jnp.zeros((), jnp.int32),
        "s": s0_BTD,
        "core": cache.core,
        "steps": jnp.zeros((batch,), jnp.int32),
        "active": jnp.ones((batch,), bool),
        # The reference starts the KL criterion from the uniform distribution.
        "logp": jnp.full((batch, vocab), -jnp.log(float(vocab)), jnp.float32),
    }

    def cond(c):
        return (c["i"] < max_loops) & jnp.any(c["active"])

    def body(c):
        i, active = c["i"], c["active"]
        s_new, core = _core_step_cached(model, c["s"], *step_args, c["core"], i, index, num_slots, active)
        diff = (s_new - c["s"]).astype(jnp.float32)[:, 0]
        rel = jnp.linalg.norm(diff, axis=-1) / jnp.maximum(
            jnp.linalg.norm(s_new[:, 0].astype(jnp.float32), axis=-1), 1e-30
        )
        conv = jnp.full((batch,), i + 1 >= rule.min_loops)
        if rule.tol is not None:
            conv &= rel < rule.tol
        out = dict(c)
        if rule.kl_tol is not None:
            logits_BTV, _ = _readout_cached(model, s_new, positions_BT, segment_ids_BT, cache.coda, index)
            logp = jax.nn.log_softmax(logits_BTV[:, 0].astype(jnp.float32), axis=-1)
            conv &= jnp.sum(jnp.exp(logp) * (logp - c["logp"]), axis=-1) < rule.kl_tol
            out["logp"] = jnp.where(active[:, None], logp, c["logp"])
        out["s"] = jnp.where(active[:, None, None], s_new, c["s"])
        out["core"] = core
        out["steps"] = c["steps"] + active.astype(jnp.int32)
        out["active"] = active & ~conv
        out["i"] = i + 1
        return out

    final = jax.lax.while_loop(cond, body, init)

    # Slots never reached by any row (the loop ended early) get copies of the deepest entry.
    def fill(i, core):
        prev = _take(core, i - 1)
        at = lambda a: jax.lax.dynamic_slice_in_dim(a, index, 1, axis=2)
        upd = jax.tree.map(
            lambda cur, p: jax.lax.dynamic_update_slice_in_dim(cur, at(p), index, axis=2), _take(core, i), prev
        )
        return _put(core, i, upd)

    core = jax.lax.fori_loop(final["i"], num_slots, fill, final["core"])
    return final["s"], core, final["steps"]


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
        cache = init_recurrent_depth_cache(model, batch, length, cache_sharing_slots or num_loops)

        def s0(key, t):
            return model.initial_state(jnp.zeros((batch, t, d_model)), key if has_rng else None)

        def forward(tokens_BT, cache, s0_BTD, index, rule):
            return recurrent_depth_forward_cached(
                model, tokens_BT, cache, s0_BTD, index=index, num_loops=num_loops, exit_rule=rule
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
    warm_start: bool = False,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
) -> GenerateOutput:
    """Generates ``max_new_tokens`` tokens after ``prompt_BT`` (int32 [B, T], no padding).

    ``num_loops``: core iterations per token (recurrent depth; default eval_loops; with an
    ``exit_rule`` the cap). ``temperature == 0`` is greedy; sampling needs ``rng``, which
    also draws each token's s_0 (without it s_0 = 0, matching ``model(..., rng=None)``).
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
        if exit_rule is not None:
            exit_rule = ExitRule(exit_rule.tol or None, exit_rule.kl_tol or None, exit_rule.min_loops)
            if exit_rule.tol is None and exit_rule.kl_tol is None:
                exit_rule = None
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
        warm_start=warm_start,
        temperature=float(temperature),
        has_rng=rng is not None,
    )
