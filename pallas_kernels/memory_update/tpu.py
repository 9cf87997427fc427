"""Mosaic TPU kernel for the chunked Titans memory update (Behrouz et al. 2024, sec. 3.2).

Grid ``(B, H, N)``: batch and heads "parallel", chunks "arbitrary" (sequential). The memory weights and momentum
of every layer live in float32 VMEM scratch across the chunk axis; each grid step loads one chunk of q/k/v and that
chunk's per-token gates, builds the C x C gate matrices in VMEM (:func:`gate_coefficients`, the values of
chunked.chunk_coefficients), runs chunked.chunk_math (the same dual-form math as the XLA path) and writes the
chunk's outputs; the last chunk writes the final state.

TPU layout: the gates enter as one lane-dense ``[B, H, N, 4, C]`` float32 array (rows alpha, eta, theta, valid;
tokens on lanes): 16 bytes per token, where precomputed ``[.., C, C]`` matrices cost 4 C bytes per token and a
trailing axis of 8 coefficients pads to 128 lanes. ``y`` is written in q's dtype (ops.py returns it in that dtype,
so bf16 inputs give the values of an f32 output followed by the cast). With ``save_boundaries`` the float32 state
at the start of every chunk is also written, for the recompute backward in ops.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.memory_update import chunked

NUM_GATES = 4  # rows of the kernel's gate array: alpha, eta, theta, valid
F32 = jnp.float32


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _col(row_1C):
    """[1, C] row -> [C, 1] column, exactly (each sum has one nonzero term)."""
    C = row_1C.shape[1]
    eye = _iota((C, C), 0) == _iota((C, C), 1)
    return jnp.sum(jnp.where(eye, jnp.broadcast_to(row_1C, (C, C)), 0.0), axis=1, keepdims=True)


def _row(col_C1):
    """[C, 1] column -> [1, C] row, exactly."""
    C = col_C1.shape[0]
    eye = _iota((C, C), 0) == _iota((C, C), 1)
    return jnp.sum(jnp.where(eye, jnp.broadcast_to(col_C1, (C, C)), 0.0), axis=0, keepdims=True)


def _segment_products(x_C1):
    """``out[i, j] = prod_{j < l <= i} x_l`` for i >= j (1 on the diagonal), 0 above it, from a [C, 1] column.

    The cumulative product down the rows of ``z[l, j] = x_l if l > j else 1`` as a Hillis-Steele scan: log2(C)
    steps of ``z *= z shifted down by s rows`` (a sublane rotate, rows that wrap around masked to 1). Products only:
    exact zeros at alpha = 1 or eta = 0, no division, no log."""
    C = x_C1.shape[0]
    i, j = _iota((C, C), 0), _iota((C, C), 1)
    z = jnp.where(i > j, jnp.broadcast_to(x_C1, (C, C)), 1.0)
    s = 1
    while s < C:
        z = z * jnp.where(i >= s, pltpu.roll(z, s, 0), 1.0)
        s *= 2
    return jnp.where(i >= j, z, 0.0)


def gate_coefficients(gates_4C):
    """``(gt [C, C], cols, lasts)`` of one chunk from its gate rows (alpha, eta, theta, valid; each [1, C]): the
    values of chunked.chunk_coefficients (``gt``, vec columns 0-4 as [C, 1], columns 5-7 as [1, 1]), built in VMEM
    with 2-D ops only."""
    alpha, eta, theta, valid = (gates_4C[r : r + 1, :].astype(F32) for r in range(NUM_GATES))
    C = gates_4C.shape[1]
    decay = 1.0 - alpha
    D_CC = _segment_products(_col(decay))  # D_im = prod_{m<l<=i} (1 - alpha_l)
    P_CC = _segment_products(_col(eta))  # P_ij = prod_{j<l<=i} eta_l
    A_C1 = D_CC[:, 0:1] * decay[:, 0:1]
    E_C1 = P_CC[:, 0:1] * eta[:, 0:1]
    G_CC = lax.dot_general(
        D_CC, _col(valid) * P_CC, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=F32
    )
    c_C1 = jnp.sum(D_CC * (valid * _row(E_C1)), axis=1, keepdims=True)  # c = D (valid * E)
    gt_CC = G_CC * theta
    cols = [A_C1, c_C1, _col(theta), _col(gt_CC[C - 1 : C, :]), _col(P_CC[C - 1 : C, :] * theta)]
    lasts = [E_C1[C - 1 : C, :], A_C1[C - 1 : C, :], c_C1[C - 1 : C, :]]
    return gt_CC, cols, lasts


def _kernel(*refs, num_layers, residual, max_surprise_norm, save_boundaries):
    L = num_layers
    q_ref, k_ref, v_ref, gates_ref = refs[:4]
    w0_refs, s0_refs = refs[4 : 4 + L], refs[4 + L : 4 + 2 * L]
    outs = refs[4 + 2 * L :]
    y_ref, wN_refs, sN_refs = outs[0], outs[1 : 1 + L], outs[1 + L : 1 + 2 * L]
    rest = outs[1 + 2 * L :]
    if save_boundaries:
        wb_refs, sb_refs, rest = rest[:L], rest[L : 2 * L], rest[2 * L :]
    w_scr, s_scr = rest[:L], rest[L : 2 * L]
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _init():
        for l in range(L):
            w_scr[l][...] = w0_refs[l][...].astype(F32)
            s_scr[l][...] = s0_refs[l][...].astype(F32)

    w = [r[...] for r in w_scr]
    s = [r[...] for r in s_scr]
    if save_boundaries:
        for l in range(L):
            wb_refs[l][...] = w[l]
            sb_refs[l][...] = s[l]
    gt_CC, cols, lasts = gate_coefficients(gates_ref[...])
    y, nw, ns = chunked.chunk_math(
        w,
        s,
        q_ref[...],
        k_ref[...],
        v_ref[...],
        gt_CC,
        cols,
        lasts,
        residual=residual,
        max_surprise_norm=max_surprise_norm,
    )
    y_ref[...] = y.astype(y_ref.dtype)
    for l in range(L):
        w_scr[l][...] = nw[l]
        s_scr[l][...] = ns[l]

    @pl.when(c == pl.num_programs(2) - 1)
    def _final():
        for l in range(L):
            wN_refs[l][...] = nw[l]
            sN_refs[l][...] = ns[l]


@functools.partial(jax.jit, static_argnames=("residual", "max_surprise_norm", "interpret", "save_boundaries"))
def memory_update_tpu(
    q_BHNCK: jax.Array,
    k_BHNCK: jax.Array,
    v_BHNCV: jax.Array,
    gates_BHN4C: jax.Array,
    weights: tuple[jax.Array, ...],
    momentum: tuple[jax.Array, ...],
    *,
    residual: bool,
    max_surprise_norm: float | None,
    interpret: bool = False,
    save_boundaries: bool = True,
):
    """Returns ``(y_BHNCV in q's dtype, weights_end, momentum_end, weights_at_chunk_starts, momentum_at_chunk_starts)``.

    ``gates_BHN4C``: float32 rows alpha, eta, theta, valid of every chunk (padded tokens: 0, 1, 0, 0). The boundary
    tuples hold ``[B, H, N, d_in, d_out]`` arrays (empty tuples when ``save_boundaries`` is False).
    """
    B, H, N, C, K = q_BHNCK.shape
    V = v_BHNCV.shape[-1]
    L = len(weights)
    shapes = [tuple(w.shape[2:]) for w in weights]

    chunk = lambda d: pl.BlockSpec((None, None, None, C, d), lambda b, h, c: (b, h, c, 0, 0))
    state = lambda shp: pl.BlockSpec((None, None, *shp), lambda b, h, c: (b, h, 0, 0))
    bound = lambda shp: pl.BlockSpec((None, None, None, *shp), lambda b, h, c: (b, h, c, 0, 0))
    gate_spec = pl.BlockSpec((None, None, None, NUM_GATES, C), lambda b, h, c: (b, h, c, 0, 0))
    in_specs = [chunk(K), chunk(K), chunk(V), gate_spec]
    in_specs += [state(shp) for shp in shapes] * 2
    out_specs = [chunk(V)] + [state(shp) for shp in shapes] * 2
    sds = chunked.out_struct_like(q_BHNCK)
    out_shape = [sds((B, H, N, C, V), q_BHNCK.dtype)] + [sds((B, H, *shp)) for shp in shapes] * 2
    if save_boundaries:
        out_specs += [bound(shp) for shp in shapes] * 2
        out_shape += [sds((B, H, N, *shp)) for shp in shapes] * 2
    scratch = [pltpu.VMEM(shp, F32) for shp in shapes] * 2

    kernel = functools.partial(
        _kernel, num_layers=L, residual=residual, max_surprise_norm=max_surprise_norm, save_boundaries=save_boundaries
    )
    outs = pl.pallas_call(
        kernel,
        grid=(B, H, N),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="titans_memory_update",
    )(q_BHNCK, k_BHNCK, v_BHNCV, gates_BHN4C.astype(F32), *weights, *momentum)
    y = outs[0]
    w_end, s_end = tuple(outs[1 : 1 + L]), tuple(outs[1 + L : 1 + 2 * L])
    if save_boundaries:
        w_b, s_b = tuple(outs[1 + 2 * L : 1 + 3 * L]), tuple(outs[1 + 3 * L : 1 + 4 * L])
    else:
        w_b, s_b = (), ()
    return y, w_end, s_end, w_b, s_b
