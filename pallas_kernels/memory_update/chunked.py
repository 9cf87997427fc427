"""Parallel chunked form of the Titans memory update (Behrouz et al. 2024, sec. 3.2, eqs. 16-18).

Within a chunk of C tokens every gradient is taken at the chunk-start memory (W0, S0), so for each memory layer
``l`` with per-token layer input ``x_j`` and output gradient ``dz_j`` (both from one batched forward/backward at W0)
the token-i state is a closed form (0-based positions i, j, m inside the chunk, ``g_j = theta_j x_j^T dz_j``)::

    S_i = E_i S0 - sum_{j<=i} P_ij g_j       P_ij = prod_{j<l<=i} eta_l,        E_i = prod_{l<=i} eta_l
    W_i = A_i W0 + c_i S0 - sum_{j<=i} G_ij g_j  D_im = prod_{m<l<=i} (1-alpha_l),  A_i = prod_{l<=i} (1-alpha_l)
                                             G = D diag(valid) P,                c = D (valid * E)

and retrieval uses the TTT dual form layer by layer: ``x^q_i W_i = A_i x^q_i W0 + c_i x^q_i S0 -
sum_j G_ij theta_j (x^q_i . x_j) dz_j`` -- batched matmuls only, the momentum recurrence reduced to the C x C
matrix G. The segment products D and P are formed RELATIVE TO THE CHUNK as masked cumulative products
(``D_im`` = cumprod over rows of a matrix that holds ``1 - alpha_l`` below the diagonal and 1 elsewhere): no
division by a running product (no 1/beta overflow as alpha -> 1) and, unlike a log-space segment sum, exact values
and gradients at alpha = 1 or eta = 0 (log 0 = -inf would give NaN gradients there). Padded tokens (``valid`` = 0,
alpha = 0, eta = 1, theta = 0) leave (W, S) unchanged, so ragged sequences need no special last chunk.

Chunk boundaries carry (W, S) through ``lax.scan``; all arithmetic is float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.memory_update.reference import MemoryState, clip_scale_from_sq

NUM_VEC = 8  # columns of ChunkCoeffs.vec, see chunk_coefficients
_HI = lax.Precision.HIGHEST


class ChunkCoeffs(NamedTuple):
    """Gate coefficients of each chunk, leading axes [B, H, N]: ``gt [.., C, C]`` and ``vec [.., C, 8]``."""

    gt: jax.Array
    vec: jax.Array


def _segment_products(x_C: jax.Array) -> jax.Array:
    """``out[..., i, j] = prod_{j < l <= i} x_l`` for i >= j (1 on the diagonal), 0 above the diagonal."""
    C = x_C.shape[-1]
    i = jnp.arange(C)[:, None]
    j = jnp.arange(C)[None, :]
    z_CC = jnp.where(i > j, x_C[..., :, None], 1.0)
    return jnp.where(i >= j, jnp.cumprod(z_CC, axis=-2), 0.0)


def chunk_coefficients(
    alpha_BHNC: jax.Array, eta_BHNC: jax.Array, theta_BHNC: jax.Array, valid_BHNC: jax.Array
) -> ChunkCoeffs:
    """Gate matrices of every chunk (see module docstring).

    ``gt[i, j] = G_ij theta_j``; ``vec`` columns: 0 ``A_i``, 1 ``c_i``, 2 ``theta_i``, 3 ``G_{C-1,i} theta_i``,
    4 ``P_{C-1,i} theta_i``, 5 ``E_{C-1}``, 6 ``A_{C-1}``, 7 ``c_{C-1}`` (5-7 broadcast over i).
    """
    f32 = lambda x: x.astype(jnp.float32)
    alpha, eta, theta, valid = map(f32, (alpha_BHNC, eta_BHNC, theta_BHNC, valid_BHNC))
    decay = 1.0 - alpha
    D_CC = _segment_products(decay)
    P_CC = _segment_products(eta)
    A_C = D_CC[..., :, 0] * decay[..., :1]
    E_C = P_CC[..., :, 0] * eta[..., :1]
    G_CC = jnp.einsum("...im,...mj->...ij", D_CC, valid[..., :, None] * P_CC, precision=_HI)
    c_C = jnp.einsum("...im,...m->...i", D_CC, valid * E_C, precision=_HI)
    gt_CC = G_CC * theta[..., None, :]
    bcast = lambda x: jnp.broadcast_to(x[..., -1:], x.shape)
    vec = jnp.stack(
        [A_C, c_C, theta, gt_CC[..., -1, :], P_CC[..., -1, :] * theta, bcast(E_C), bcast(A_C), bcast(c_C)], axis=-1
    )
    return ChunkCoeffs(gt_CC, vec)


def out_struct_like(x: jax.Array):
    """``ShapeDtypeStruct`` factory (float32 unless ``dtype`` is given) that carries x's shard_map axis type
    (needed under check_vma)."""
    mat = getattr(jax.typeof(x), "mat", None)
    if mat is None:
        return lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
    return lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


# --- matmuls without transposes (shared with the Pallas kernels, where `x.T` does not lower on Mosaic GPU) ---
def mm(a, b):
    """``a @ b`` with f32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def mm_tn(a, b):
    """``a.T @ b`` (contract the leading axes)."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def mm_nt(a, b):
    """``a @ b.T`` (contract the trailing axes)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _silu_and_grad(z):
    """``(silu(z), silu'(z))`` with a sigmoid built from exp(-|z|): no inf/inf in values or gradients."""
    e = jnp.exp(-jnp.abs(z))
    s = jnp.where(z >= 0, 1.0, e) / (1.0 + e)
    return z * s, s * (1.0 + z * (1.0 - s))


def chunk_math(
    weights: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    q_CK: jax.Array,
    k_CK: jax.Array,
    v_CV: jax.Array,
    gt_CC: jax.Array,
    cols: Sequence[jax.Array],
    lasts: Sequence[jax.Array],
    *,
    residual: bool,
    max_surprise_norm: float | None,
) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
    """One chunk for one (batch, head): 2-D arrays only, returns ``(y_CV, weights_end, momentum_end)``.

    ``cols`` are vec columns 0-4 as ``[C, 1]`` arrays and ``lasts`` columns 5-7 as ``[1, 1]`` (see
    :func:`chunk_coefficients`). A single layer is the linear memory; L >= 2 layers are the SiLU MLP (residual
    when ``residual``). The same code runs under vmap in XLA and inside the Pallas kernels.
    """
    L = len(weights)
    q, k, v = (x.astype(jnp.float32) for x in (q_CK, k_CK, v_CV))
    a_C1, c_C1, th_C1, glast_C1, plast_C1 = cols
    e_last, a_last, c_last = lasts

    # forward of the keys through the chunk-start memory, then backprop of ||M(k) - v||^2
    xs, zs = [k], []
    for l in range(L):
        z = mm(xs[l], weights[l])
        zs.append(z)
        if l < L - 1:
            xs.append(_silu_and_grad(z)[0])
    pred = zs[-1] + k if residual else zs[-1]
    dz = [None] * L
    dz[L - 1] = 2.0 * (pred - v)
    for l in range(L - 1, 0, -1):
        dz[l - 1] = mm_nt(dz[l], weights[l]) * _silu_and_grad(zs[l - 1])[1]

    if max_surprise_norm is None:
        scale = jnp.ones((1, 1), jnp.float32)
    else:  # || sum_j theta_j x_j^T dz_j || over all layers, clipped to max_surprise_norm
        sq = jnp.zeros((1, 1), jnp.float32)
        for l in range(L):
            u = mm_tn(xs[l], th_C1 * dz[l])
            sq = sq + jnp.sum(jnp.sum(u * u, axis=1, keepdims=True), axis=0, keepdims=True)
        scale = clip_scale_from_sq(sq, max_surprise_norm)  # NaN-safe at sq == 0 (double where)

    # retrieval from the updated memory, layer by layer (dual form)
    xq = q
    for l in range(L):
        attn = mm_nt(xq, xs[l]) * gt_CC  # [C, C]: G_ij theta_j (x^q_i . x_j)
        zq = a_C1 * mm(xq, weights[l]) + c_C1 * mm(xq, momentum[l]) - scale * mm(attn, dz[l])
        xq = _silu_and_grad(zq)[0] if l < L - 1 else zq
    y = xq + q if residual else xq

    new_w, new_s = [], []
    for l in range(L):
        new_w.append(a_last * weights[l] + c_last * momentum[l] - scale * mm_tn(xs[l], glast_C1 * dz[l]))
        new_s.append(e_last * momentum[l] - scale * mm_tn(xs[l], plast_C1 * dz[l]))
    return y, new_w, new_s


def split_vec(vec_C8: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
    """``vec [C, 8]`` -> (columns 0-4 as ``[C, 1]``, columns 5-7 as ``[1, 1]``)."""
    cols = [vec_C8[:, i : i + 1] for i in range(5)]
    lasts = [vec_C8[0:1, i : i + 1] for i in range(5, NUM_VEC)]
    return cols, lasts


def batched_chunk_math(weights, momentum, q, k, v, gt, vec, *, residual, max_surprise_norm):
    """:func:`chunk_math` over leading [B, H] axes (``vec`` of shape [B, H, C, 8])."""

    def fn(w, s, q_, k_, v_, gt_, vec_):
        cols, lasts = split_vec(vec_)
        return chunk_math(w, s, q_, k_, v_, gt_, cols, lasts, residual=residual, max_surprise_norm=max_surprise_norm)

    return jax.vmap(jax.vmap(fn))(weights, momentum, q, k, v, gt, vec)


def scan_chunks(
    q_BHNCK: jax.Array,
    k_BHNCK: jax.Array,
    v_BHNCV: jax.Array,
    coeffs: ChunkCoeffs,
    state0: MemoryState,
    *,
    residual: bool,
    max_surprise_norm: float | None = None,
    return_boundaries: bool = False,
):
    """``lax.scan`` over chunks carrying (W, S); returns ``y_BHNCV`` (float32) and the final state.

    With ``return_boundaries`` also the states at every chunk start, as ``[B, H, N, ...]`` tuples (weights, momentum).
    """
    to_n = lambda x: jnp.moveaxis(x, 2, 0)
    xs = tuple(map(to_n, (q_BHNCK, k_BHNCK, v_BHNCV, coeffs.gt, coeffs.vec)))

    def step(carry, x):
        w, s = carry
        y, w_new, s_new = batched_chunk_math(w, s, *x, residual=residual, max_surprise_norm=max_surprise_norm)
        out = (y, w, s) if return_boundaries else y
        return (tuple(w_new), tuple(s_new)), out

    f32 = lambda t: tuple(x.astype(jnp.float32) for x in t)
    carry0 = (f32(state0.weights), f32(state0.momentum))
    (w, s), out = lax.scan(step, carry0, xs)
    if not return_boundaries:
        return jnp.moveaxis(out, 0, 2), MemoryState(w, s)
    y, w_b, s_b = out
    from_n = lambda t: tuple(jnp.moveaxis(x, 0, 2) for x in t)
    return jnp.moveaxis(y, 0, 2), MemoryState(w, s), MemoryState(from_n(w_b), from_n(s_b))
