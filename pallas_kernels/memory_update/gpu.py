"""GPU Pallas kernel for the chunked Titans memory update (Behrouz et al. 2024, sec. 3.2).

Grid ``(B, H)``: one program per (batch, head) walks the chunks sequentially in a ``fori_loop`` with the memory
weights and momentum of every layer held in float32 registers as the loop carry; each iteration loads one chunk of
q/k/v and its gate coefficients, runs chunked.chunk_math (the XLA path's dual-form math, transposes expressed as
``lax.dot_general`` contractions) and stores the chunk's outputs (plus, with ``save_boundaries``, the state at the
chunk start for the recompute backward in ops.py).

Lowering: this kernel is compiled with the Pallas **Triton** backend (``pltriton.CompilerParams``), not Mosaic
GPU. Mosaic GPU in this JAX version has no ``dot_general`` lowering -- matmuls must be written as warpgroup
``plgpu.wgmma`` calls on swizzled shared-memory tiles -- and chunk_math's ten matmuls per chunk with mixed operand
transposes would need a separate hand-tiled implementation. Triton dots need power-of-two dims >= 16, so
``chunk_size``, ``d_k``, ``d_v`` and the MLP hidden size must be powers of two >= 16 (:func:`supports`).
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.memory_update import chunked


def _pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def supports(chunk_size: int, dims: tuple[int, ...]) -> bool:
    """True when the Triton kernel can run these sizes (chunk size and every memory dim powers of two >= 16)."""
    return all(_pow2_at_least_16(d) for d in (chunk_size, *dims))


def _kernel(*refs, num_layers, num_chunks, residual, max_surprise_norm, save_boundaries):
    L = num_layers
    q_ref, k_ref, v_ref, gt_ref, vec_ref = refs[:5]
    w0_refs, s0_refs = refs[5 : 5 + L], refs[5 + L : 5 + 2 * L]
    outs = refs[5 + 2 * L :]
    y_ref, wN_refs, sN_refs = outs[0], outs[1 : 1 + L], outs[1 + L : 1 + 2 * L]
    if save_boundaries:
        wb_refs, sb_refs = outs[1 + 2 * L : 1 + 3 * L], outs[1 + 3 * L : 1 + 4 * L]
    b, h = pl.program_id(0), pl.program_id(1)

    def body(c, carry):
        w, s = carry
        if save_boundaries:
            for l in range(L):
                wb_refs[l][b, h, c] = w[l]
                sb_refs[l][b, h, c] = s[l]
        cols = [vec_ref[b, h, c, :, pl.ds(i, 1)] for i in range(5)]
        lasts = [vec_ref[b, h, c, pl.ds(0, 1), pl.ds(i, 1)] for i in range(5, chunked.NUM_VEC)]
        y, nw, ns = chunked.chunk_math(
            w,
            s,
            q_ref[b, h, c],
            k_ref[b, h, c],
            v_ref[b, h, c],
            gt_ref[b, h, c],
            cols,
            lasts,
            residual=residual,
            max_surprise_norm=max_surprise_norm,
        )
        y_ref[b, h, c] = y.astype(y_ref.dtype)
        return tuple(nw), tuple(ns)

    w0 = tuple(r[b, h].astype(jax.numpy.float32) for r in w0_refs)
    s0 = tuple(r[b, h].astype(jax.numpy.float32) for r in s0_refs)
    w, s = lax.fori_loop(0, num_chunks, body, (w0, s0))
    for l in range(L):
        wN_refs[l][b, h] = w[l]
        sN_refs[l][b, h] = s[l]


@functools.partial(jax.jit, static_argnames=("residual", "max_surprise_norm", "interpret", "save_boundaries"))
def memory_update_gpu(
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
    """Same contract as tpu.memory_update_tpu: ``(y_BHNCV f32, w_end, s_end, w_chunk_starts, s_chunk_starts)``."""
    B, H, N, C, K = q_BHNCK.shape
    V = v_BHNCV.shape[-1]
    L = len(weights)
    shapes = [tuple(w.shape[2:]) for w in weights]
    dims = tuple(d for shp in shapes for d in shp)
    if not supports(C, dims):
        raise ValueError(
            f"the GPU memory-update kernel needs chunk_size and memory dims that are powers of two >= 16, got "
            f"chunk_size={C}, layer shapes={shapes}; use impl='xla' for these sizes"
        )
    sds = chunked.out_struct_like(q_BHNCK)
    out_shape = [sds((B, H, N, C, V))] + [sds((B, H, *shp)) for shp in shapes] * 2
    if save_boundaries:
        out_shape += [sds((B, H, N, *shp)) for shp in shapes] * 2
    kernel = functools.partial(
        _kernel,
        num_layers=L,
        num_chunks=N,
        residual=residual,
        max_surprise_norm=max_surprise_norm,
        save_boundaries=save_boundaries,
    )
    outs = pl.pallas_call(
        kernel,
        grid=(B, H),
        out_shape=out_shape,
        # the state is the loop carry in registers: more warps for bigger memories (fewer spills per thread)
        compiler_params=pltriton.CompilerParams(num_warps=4 if max(map(math.prod, shapes)) <= 64 * 64 else 8),
        interpret=interpret,
        name="titans_memory_update",
    )(q_BHNCK, k_BHNCK, v_BHNCV, gt_BHNCC, vec_BHNC8, *weights, *momentum)
    y = outs[0]
    w_end, s_end = tuple(outs[1 : 1 + L]), tuple(outs[1 + L : 1 + 2 * L])
    if save_boundaries:
        w_b, s_b = tuple(outs[1 + 2 * L : 1 + 3 * L]), tuple(outs[1 + 3 * L : 1 + 4 * L])
    else:
        w_b, s_b = (), ()
    return y, w_end, s_end, w_b, s_b
