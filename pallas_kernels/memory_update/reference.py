"""Pure-JAX ground truth for the Titans neural long-term memory (Behrouz et al. 2024, arXiv 2501.00663, sec. 3.1).

Per batch element and head the memory ``M`` is a small network whose weights are updated at test time by
gradient descent with momentum and weight decay on the associative loss (eq. 12)::

    l(M; k_t, v_t) = ||M(k_t) - v_t||^2                     (summed over the value dimension, no 1/2)
    S_t = eta_t * S_{t-1} - theta_t * grad l(M_{t-1}; k_t, v_t)          (eq. 14, surprise with momentum)
    M_t = (1 - alpha_t) * M_{t-1} + S_t                                   (eq. 13, forgetting gate)
    y_t = M_t(q_t)                                                        (eq. 15, retrieval from the UPDATED memory)

Memories (``memory=``):
  * ``"linear"``: one matrix ``W [d_k, d_v]``, ``M(x) = x @ W``.
  * ``"mlp"``: ``L >= 2`` matrices ``W_1 [d_k, d_h], ..., W_L [d_h, d_v]`` with SiLU between them and a residual
    connection when ``d_k == d_v``: ``M(x) = x + silu(...silu(x @ W_1)...) @ W_L`` (no residual when d_k != d_v).

Training in parallel (sec. 3.2) takes, inside each chunk of ``chunk_size`` tokens, every gradient at the memory of
the CHUNK START (mini-batch gradient descent, eq. 16); :func:`memory_update_reference` is that recurrence written
token by token with ``lax.scan``. :func:`memory_update_per_token_exact` is the fully sequential recurrence (gradient
at ``M_{t-1}``), which the chunked form must equal when ``chunk_size == 1``. Gradients here come from ``jax.grad`` of
the loss, independent of the hand-derived dual form in chunked.py.

Validity (``valid_BHT``, bool, optional): at a token with ``valid_t = False`` the state is carried unchanged,
``S_t = S_{t-1}`` and ``M_t = M_{t-1}`` (no forgetting, no momentum step, no gradient), whatever its gates say, and
the token adds nothing to its chunk's clipping norm; ``y_t = M_{t-1}(q_t)`` is still read. Gates alone cannot do
this: alpha = 0, eta = 1, theta = 0 give ``S_t = S_{t-1}`` but ``M_t = M_{t-1} + S_{t-1}`` by eq. 13.

Optional surprise clipping: with ``max_surprise_norm``, the chunk's summed gradient contribution
``U = sum_t theta_t * grad l(M_chunkstart; k_t, v_t)`` (global Frobenius norm over all memory layers) is rescaled to
at most ``max_surprise_norm`` by multiplying every theta_t of that chunk by ``min(1, max_surprise_norm / ||U||)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MEMORY_KINDS = ("linear", "mlp")


class MemoryState(NamedTuple):
    """Memory weights and momentum (surprise) per layer; every array has leading ``[B, H]`` axes, float32."""

    weights: tuple[jax.Array, ...]
    momentum: tuple[jax.Array, ...]


def memory_apply(weights: tuple[jax.Array, ...], x_K: jax.Array, memory: str) -> jax.Array:
    """``M(x)`` for one (batch, head): weights without leading axes, ``x_K`` of shape ``[..., d_k]``."""
    if memory == "linear":
        return x_K @ weights[0]
    h = x_K
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = jax.nn.silu(h)
    return h + x_K if x_K.shape[-1] == h.shape[-1] else h


def associative_loss(weights: tuple[jax.Array, ...], k_K: jax.Array, v_V: jax.Array, memory: str) -> jax.Array:
    """``||M(k) - v||^2`` for one token (eq. 12)."""
    return jnp.sum(jnp.square(memory_apply(weights, k_K, memory) - v_V))


def clip_scale_from_sq(sq: jax.Array, max_norm: float) -> jax.Array:
    """``min(1, max_norm / sqrt(sq))`` with finite gradients everywhere, also at ``sq == 0``.

    A zero surprise (theta = 0 on a whole chunk, a padded chunk, a memory decayed to zero) puts ``sqrt`` at 0, whose
    derivative is infinite; ``0 * inf`` would turn every gradient NaN although the scale is a constant 1 there. The
    double ``where`` keeps ``sqrt`` away from 0: the inactive branch sees ``sq = 1`` and its gradient is exactly 0.
    """
    active = sq > max_norm * max_norm
    safe_sq = jnp.where(active, sq, 1.0)
    return jnp.where(active, max_norm / jnp.sqrt(safe_sq), 1.0)


def _clip_scale(grads_list, theta_b, max_norm):
    """Scale for theta so that ||sum_t theta_t g_t|| <= max_norm (global norm over layers)."""
    if max_norm is None:
        return jnp.ones((), jnp.float32)
    sq = sum(jnp.sum(jnp.square(jnp.einsum("b,b...->...", theta_b, g))) for g in grads_list)
    return clip_scale_from_sq(sq, max_norm)


def _reference_one(q_TK, k_TK, v_TV, alpha_T, eta_T, theta_T, valid_T, weights, momentum, chunk_size, memory, max_norm):
    T = q_TK.shape[0]
    n_chunks = -(-T // chunk_size)
    pad = n_chunks * chunk_size - T  # padding appends valid = False

    def padded(x):
        x_pad = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x_pad.reshape(n_chunks, chunk_size, *x.shape[1:])

    xs = tuple(map(padded, (q_TK, k_TK, v_TV, alpha_T, eta_T, theta_T, valid_T)))

    def chunk(carry, x):
        w, s = carry
        q_b, k_b, v_b, a_b, e_b, th_b, ok_b = x
        # every gradient of this chunk is taken at the chunk-start memory w (eq. 16)
        grads = jax.vmap(jax.grad(associative_loss), in_axes=(None, 0, 0, None))(w, k_b, v_b, memory)
        th_b = th_b * _clip_scale(grads, jnp.where(ok_b, th_b, 0.0), max_norm)

        def token(c, y):
            wt, st = c
            q, a, e, th, ok, g = y
            st_new = tuple(e * sl - th * gl for sl, gl in zip(st, g, strict=True))
            wt_new = tuple((1.0 - a) * wl + sl for wl, sl in zip(wt, st_new, strict=True))
            wt_new = tuple(jnp.where(ok, n, o) for n, o in zip(wt_new, wt, strict=True))
            st_new = tuple(jnp.where(ok, n, o) for n, o in zip(st_new, st, strict=True))
            return (wt_new, st_new), memory_apply(wt_new, q, memory)

        (w, s), y_b = jax.lax.scan(token, (w, s), (q_b, a_b, e_b, th_b, ok_b, grads))
        return (w, s), y_b

    (w, s), y = jax.lax.scan(chunk, (weights, momentum), xs)
    return y.reshape(n_chunks * chunk_size, -1)[:T], w, s


def _prepare(q, k, v, alpha, eta, theta, state0):
    f32 = lambda x: x.astype(jnp.float32)
    weights = tuple(map(f32, state0.weights))
    momentum = tuple(map(f32, state0.momentum))
    return tuple(map(f32, (q, k, v, alpha, eta, theta))), weights, momentum


def _valid_mask(valid_BHT: jax.Array | None, alpha_BHT: jax.Array) -> jax.Array:
    """The validity mask as bool ``[B, H, T]`` (all True when not given)."""
    if valid_BHT is None:
        return jnp.ones(alpha_BHT.shape, bool)
    return jnp.asarray(valid_BHT).astype(bool)


def memory_update_reference(
    q_BHTK: jax.Array,
    k_BHTK: jax.Array,
    v_BHTV: jax.Array,
    alpha_BHT: jax.Array,
    eta_BHT: jax.Array,
    theta_BHT: jax.Array,
    state0: MemoryState,
    *,
    chunk_size: int,
    memory: str = "linear",
    max_surprise_norm: float | None = None,
    valid_BHT: jax.Array | None = None,
) -> tuple[jax.Array, MemoryState]:
    """Token-by-token Titans memory with chunk-start gradients; returns ``(y_BHTV, final_state)`` in float32.
    Tokens with ``valid_BHT`` False leave (M, S) unchanged (module docstring)."""
    (q, k, v, a, e, th), weights, momentum = _prepare(q_BHTK, k_BHTK, v_BHTV, alpha_BHT, eta_BHT, theta_BHT, state0)
    ok = _valid_mask(valid_BHT, alpha_BHT)
    fn = lambda *xs: _reference_one(*xs, chunk_size, memory, max_surprise_norm)
    y, w, s = jax.vmap(jax.vmap(fn))(q, k, v, a, e, th, ok, weights, momentum)
    return y, MemoryState(w, s)


def memory_update_per_token_exact(
    q_BHTK: jax.Array,
    k_BHTK: jax.Array,
    v_BHTV: jax.Array,
    alpha_BHT: jax.Array,
    eta_BHT: jax.Array,
    theta_BHT: jax.Array,
    state0: MemoryState,
    *,
    memory: str = "linear",
    max_surprise_norm: float | None = None,
    valid_BHT: jax.Array | None = None,
) -> tuple[jax.Array, MemoryState]:
    """The fully sequential recurrence (gradient at ``M_{t-1}``, eqs. 12-15); equals chunk_size=1. Tokens with
    ``valid_BHT`` False leave (M, S) unchanged."""
    (q, k, v, a, e, th), weights, momentum = _prepare(q_BHTK, k_BHTK, v_BHTV, alpha_BHT, eta_BHT, theta_BHT, state0)
    ok = _valid_mask(valid_BHT, alpha_BHT)

    def one(q_TK, k_TK, v_TV, a_T, e_T, th_T, ok_T, w0, s0):
        def token(c, x):
            w, s = c
            qt, kt, vt, at, et, tht, okt = x
            g = jax.grad(associative_loss)(w, kt, vt, memory)
            tht = tht * _clip_scale([gl[None] for gl in g], tht[None], max_surprise_norm)
            s_new = tuple(et * sl - tht * gl for sl, gl in zip(s, g, strict=True))
            w_new = tuple((1.0 - at) * wl + sl for wl, sl in zip(w, s_new, strict=True))
            w = tuple(jnp.where(okt, n, o) for n, o in zip(w_new, w, strict=True))
            s = tuple(jnp.where(okt, n, o) for n, o in zip(s_new, s, strict=True))
            return (w, s), memory_apply(w, qt, memory)

        (w, s), y = jax.lax.scan(token, (w0, s0), (q_TK, k_TK, v_TV, a_T, e_T, th_T, ok_T))
        return y, w, s

    y, w, s = jax.vmap(jax.vmap(one))(q, k, v, a, e, th, ok, weights, momentum)
    return y, MemoryState(w, s)
