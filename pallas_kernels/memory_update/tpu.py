"""Mosaic TPU kernel for the chunked Titans memory update (Behrouz et al. 2024, sec. 3.2).

Grid ``(B, H, N)``: batch and heads "parallel", chunks "arbitrary" (sequential). The memory weights and momentum
of every layer live in float32 VMEM scratch across the chunk axis; each grid step loads one chunk of q/k/v and its
gate coefficients (chunked.chunk_coefficients), runs chunked.chunk_math (the same dual-form math as the XLA path)
and writes the chunk's outputs; the last chunk writes the final state.

TPU layout: the per-token coefficient vectors enter transposed, ``[B, H, N, 8, C]`` (tokens on lanes; a trailing
axis of 8 would pad to 128 lanes, 16x its size), and are turned into ``[C, 1]`` columns in-kernel by an exact
masked reduction; ``y`` is written in q's dtype (ops.py casts it to that dtype anyway, so bf16 inputs give the same
values as an f32 output followed by the cast). With ``save_boundaries`` the state at the
start of every chunk is also written, for the recompute backward in ops.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.memory_update import chunked


def _col(row_1C):
    """[1, C] row -> [C, 1] column, exactly (each sum has one nonzero term)."""
    C = row_1C.shape[1]
    eye = lax.broadcasted_iota(jnp.int32, (C, C), 0) == lax.broadcasted_iota(jnp.int32, (C, C), 1)
    return jnp.sum(jnp.where(eye, jnp.broadcast_to(row_1C, (C, C)), 0.0), axis=1, keepdims=True)


def _kernel(*refs, num_layers, residual, max_surprise_norm, save_boundaries):
    L = num_layers
    q_ref, k_ref, v_ref, gt_ref, vec_ref = refs[:5]
    w0_refs, s0_refs = refs[5 : 5 + L], refs[5 + L : 5 + 2 * L]
    outs = refs[5 + 2 * L :]
    y_ref, wN_refs, sN_refs = outs[0], outs[1 : 1 + L], outs[1 + L : 1 + 2 * L]
    rest = outs[1 + 2 * L :]
    if save_boundaries:
        wb_refs, sb_refs, rest = rest[:L], rest[L : 2 * L], rest[2 * L :]
    w_scr, s_scr = rest[:L], rest[L : 2 * L]
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _init():
        for l in range(L):
            w_scr[l][...] = w0_refs[l][...].astype(jnp.float32)
            s_scr[l][...] = s0_refs[l][...].astype(jnp.float32)

    w = [r[...] for r in w_scr]
    s = [r[...] for r in s_scr]
    if save_boundaries:
        for l in range(L):
            wb_refs[l][...] = w[l]
            sb_refs[l][...] = s[l]
    cols = [_col(vec_ref[i : i + 1, :]) for i in range(5)]  # vec_ref: [8, C], tokens on lanes
    lasts = [vec_ref[i : i + 1, 0:1] for i in range(5, chunked.NUM_VEC)]
    y, nw, ns = chunked.chunk_math(
        w,
        s,
        q_ref[...],
        k_ref[...],
        v_ref[...],
        gt_ref[...],
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
    gt_BHNCC: jax.Array,
    vec_BHNC8: jax.Array,
    weights: tuple[jax.Array, ...],
    momentum: tuple[jax.Array, ...],
    *,
    residual: bool,
    max_surprise_norm: float | None,
    interpret: bool = False,
    save_boundaries: bool = True,
):
    """Returns ``(y_BHNCV in q's dtype, weights_end, momentum_end, weights_at_chunk_starts, momentum_at_chunk_starts)``.

    The boundary tuples hold ``[B, H, N, d_in, d_out]`` arrays (empty tuples when ``save_boundaries`` is False).
    """
    B, H, N, C, K = q_BHNCK.shape
    V = v_BHNCV.shape[-1]
    L = len(weights)
    shapes = [tuple(w.shape[2:]) for w in weights]

    chunk = lambda d: pl.BlockSpec((None, None, None, C, d), lambda b, h, c: (b, h, c, 0, 0))
    state = lambda shp: pl.BlockSpec((None, None, *shp), lambda b, h, c: (b, h, 0, 0))
    bound = lambda shp: pl.BlockSpec((None, None, None, *shp), lambda b, h, c: (b, h, c, 0, 0))
    vec_spec = pl.BlockSpec((None, None, None, chunked.NUM_VEC, C), lambda b, h, c: (b, h, c, 0, 0))
    in_specs = [chunk(K), chunk(K), chunk(V), chunk(C), vec_spec]
    in_specs += [state(shp) for shp in shapes] * 2
    out_specs = [chunk(V)] + [state(shp) for shp in shapes] * 2
    sds = chunked.out_struct_like(q_BHNCK)
    out_shape = [sds((B, H, N, C, V), q_BHNCK.dtype)] + [sds((B, H, *shp)) for shp in shapes] * 2
    if save_boundaries:
        out_specs += [bound(shp) for shp in shapes] * 2
        out_shape += [sds((B, H, N, *shp)) for shp in shapes] * 2
    scratch = [pltpu.VMEM(shp, jnp.float32) for shp in shapes] * 2

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
    )(q_BHNCK, k_BHNCK, v_BHNCV, gt_BHNCC, jnp.swapaxes(vec_BHNC8, -1, -2), *weights, *momentum)
    y = outs[0]
    w_end, s_end = tuple(outs[1 : 1 + L]), tuple(outs[1 + L : 1 + 2 * L])
    if save_boundaries:
        w_b, s_b = tuple(outs[1 + 2 * L : 1 + 3 * L]), tuple(outs[1 + 3 * L : 1 + 4 * L])
    else:
        w_b, s_b = (), ()
    return y, w_end, s_end, w_b, s_b
