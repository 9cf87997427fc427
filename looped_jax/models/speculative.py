"""Self-speculative decoding for the recurrent-depth model (Geiping et al. 2025, Sec. 6; the
reference's ``generate_speculative`` in seal-rg/recurrent-pretraining ``raven_modeling_minimal.py``).

The same weights draft and verify: each round drafts ``draft_length`` tokens greedily, one at a
time, with ``draft_loops`` core iterations, then runs the last accepted token and the first
``draft_length - 1`` drafted tokens through the model in *one* cached forward with ``num_loops``
iterations. The verifier's greedy prediction at draft position j is compared with drafted token
j; the longest agreeing prefix (a tokens) is accepted, and the verifier's own token at the first
disagreement is appended (a + 1 tokens per round), or all ``draft_length`` drafted tokens when
every one agrees (the verifier did not run the last one, so there is no bonus token) -- as the
reference with ``verification_threshold = 1``. Greedy speculative output therefore equals plain
greedy decoding with ``num_loops`` token for token (up to float rounding of the chunked forward).

The reference deletes the rejected cache entries (``clear_last_k_entries``); here the verifier
runs on the cache as it was before the draft (the draft's entries are thrown away) and rejected
positions are overwritten by the next round before any query can see them (the attention mask
is causal in positions). Departures: the batch accepts the shortest agreeing prefix of its rows
(each row then takes its own verifier token there, so every row still equals its greedy decode),
where the reference accepts per row and pads the shorter rows; s_0 = 0 for every forward
(the reference samples s_0 unless init_scale = 0); only greedy verification (the reference's
``verification_threshold < 1`` relaxation is not implemented); no stop tokens. With a sharing
``cache_lookup`` (compress-s/compress-r) a chunked forward reads a slot's fresh entries of the
chunk where token-by-token decoding reads earlier last writers -- as in the reference -- so the
equality with plain decoding holds for "full"/"skip"/"latest-m4" only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.models.generate import (
    core_cache_slots,
    init_recurrent_depth_cache,
    parse_cache_lookup,
    recurrent_depth_forward_cached,
)
from looped_jax.models.recurrent_depth import RecurrentDepthModel

__all__ = ["SpeculativeOutput", "speculative_generate"]


class SpeculativeOutput(NamedTuple):
    tokens_BT: jax.Array  # int32 [B, max_new_tokens], the new tokens only
    num_rounds: jax.Array  # int32 [], draft-and-verify rounds run
    accepted_R: jax.Array  # int32 [max_new_tokens], drafted tokens accepted in each round (-1: no round)
    emitted_R: jax.Array  # int32 [max_new_tokens], tokens appended in each round (-1: no round)
    acceptance_rate: jax.Array  # float32 [], accepted over drafted tokens (num_rounds * draft_length)


def _argmax(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "draft_length", "draft_loops", "num_loops", "cache_lookup")
)
def _speculative(graphdef, state, prompt_BT, *, max_new_tokens, draft_length, draft_loops, num_loops, cache_lookup):
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    batch, prompt_len = prompt_BT.shape
    k = draft_length
    # Room for the last round's overshoot: it may verify up to k - 1 positions past the end.
    cache = init_recurrent_depth_cache(
        model, batch, prompt_len + max_new_tokens + k, core_cache_slots(cache_lookup, num_loops, cfg.num_core_layers)
    )

    def forward(tokens_BT, cache, index, loops):
        s0_BTD = jnp.zeros(tokens_BT.shape + (cfg.d_model,))
        logits_BTV, _, _, cache = recurrent_depth_forward_cached(
            model, tokens_BT, cache, s0_BTD, index=index, num_loops=loops, cache_lookup=cache_lookup
        )
        return logits_BTV, cache

    logits_BTV, cache = forward(prompt_BT, cache, jnp.int32(0), num_loops)
    first_B = _argmax(logits_BTV[:, -1])
    tokens_BN = jnp.zeros((batch, max_new_tokens + k), jnp.int32).at[:, 0].set(first_B)
    no_rounds = jnp.full((max_new_tokens,), -1, jnp.int32)

    def round_(carry):
        cache, tokens_BN, n, last_B, r, accepted_R, emitted_R = carry
        index = prompt_len + n - 1  # position of last_B, the newest token, not yet in the cache

        def draft(c, j):
            draft_cache, token_B = c
            logits_BTV, draft_cache = forward(token_B[:, None], draft_cache, index + j, draft_loops)
            token_B = _argmax(logits_BTV[:, -1])
            return (draft_cache, token_B), token_B

        # A scan over drafted tokens (a sequence recurrence, not loop iterations of one latent).
        _, drafts_KB = jax.lax.scan(draft, (cache, last_B), jnp.arange(k, dtype=jnp.int32))
        drafts_BK = drafts_KB.T
        verify_BK = jnp.concatenate([last_B[:, None], drafts_BK[:, :-1]], axis=1)
        logits_BKV, cache = forward(verify_BK, cache, index, num_loops)
        preds_BK = _argmax(logits_BKV)
        agree_B = jnp.sum(jnp.cumprod(preds_BK == drafts_BK, axis=1), axis=1)
        accepted = jnp.min(agree_B).astype(jnp.int32)
        emitted = jnp.minimum(accepted + 1, k)
        # preds equal the drafts on the accepted prefix, and are the verifier's token right after it.
        tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, preds_BK, n, axis=1)
        last_B = jax.lax.dynamic_index_in_dim(preds_BK, emitted - 1, axis=1, keepdims=False)
        accepted_R = accepted_R.at[r].set(accepted)
        emitted_R = emitted_R.at[r].set(emitted)
        return cache, tokens_BN, n + emitted, last_B, r + 1, accepted_R, emitted_R

    carry = (cache, tokens_BN, jnp.int32(1), first_B, jnp.int32(0), no_rounds, no_rounds)
    carry = jax.lax.while_loop(lambda c: c[2] < max_new_tokens, round_, carry)
    _, tokens_BN, _, _, num_rounds, accepted_R, emitted_R = carry
    rate = jnp.sum(jnp.maximum(accepted_R, 0)) / (jnp.maximum(num_rounds, 1) * k)
    return SpeculativeOutput(tokens_BN[:, :max_new_tokens], num_rounds, accepted_R, emitted_R, rate.astype(jnp.float32))


def speculative_generate(
    model: RecurrentDepthModel,
    prompt_BT: jax.Array,
    *,
    max_new_tokens: int,
    draft_loops: int,
    draft_length: int = 8,
    num_loops: int | None = None,
    cache_lookup: str = "full",
) -> SpeculativeOutput:
    """Greedy self-speculative decoding of ``max_new_tokens`` tokens after ``prompt_BT`` (int32
    [B, T], no padding): draft ``draft_length`` tokens with ``draft_loops`` core iterations,
    verify them with ``num_loops`` (default eval_loops) in one forward (module docstring).
    The reference's defaults are draft_length (``lookahead_for_draft``) 8 and 32 loops for both."""
    if not isinstance(model, RecurrentDepthModel):
        raise ValueError(f"speculative_generate supports RecurrentDepthModel, got {type(model).__name__}")
    if prompt_BT.ndim != 2 or prompt_BT.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {prompt_BT.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if draft_length < 1:
        raise ValueError(f"draft_length must be >= 1, got {draft_length}")
    num_loops = model.cfg.default_eval_loops if num_loops is None else int(num_loops)
    if not 1 <= draft_loops <= num_loops:
        raise ValueError(f"draft_loops must be in [1, num_loops={num_loops}], got {draft_loops}")
    parse_cache_lookup(cache_lookup)
    graphdef, state = nnx.split(model)
    return _speculative(
        graphdef,
        state,
        jnp.asarray(prompt_BT, jnp.int32),
        max_new_tokens=int(max_new_tokens),
        draft_length=int(draft_length),
        draft_loops=int(draft_loops),
        num_loops=num_loops,
        cache_lookup=cache_lookup,
    )
