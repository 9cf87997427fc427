"""Pallas TPU (Mosaic) kernels for TransformerFAM feedback attention (arXiv 2404.09173, Sec. 3.2).

Layout inside the kernels: q, dO [B,H,Tp,K]; k, v [B,G,Tp,K]; FAM [B,G,N,F,K]; Tp = N * block_size (``ops.py``
pads T). The per-row statistics lse, delta (f32) are stored lane-dense, one q tile per row: [B,H,Tp/bq,1,bq]
(``ops.py`` hands them over as [B,H,Tp]); a [B,H,Tp,1] column would pad every value to 128 lanes on TPU (256 MiB
instead of 2 MiB for 16 heads at 32k tokens). In-kernel the statistics are turned between row and column form with
an exact masked reduction (``_row`` / ``_col``). Flash-attention style (Dao et al. 2022), online softmax:

- forward / dq: grid (B, H, Tp/bq, (M+1)*S/bk). Query tile i lies in block n; key step j walks the key tiles of
  blocks n-M..n. The index map clamps the tile to [0, last causal tile], so skipped steps re-use the block already in
  VMEM (no DMA); the kernel skips them with ``pl.when``. The FAM tile of block n is folded in at j == 0.
- dk/dv: grid (B, G, Tp/bk, R, (M+1)*S/bq): key tile t of block n is read by the query tiles of blocks n..n+M; the
  R = H/G query heads sharing the kv head are summed in the same scratch accumulator. The dk/dv and dFAM steps work
  on transposed scores s^T = k q^T [bk, bq], so the lse / delta rows broadcast as they are stored.
- dFAM: grid (B, G, N, R, S/bq): FAM keys of block n are read by the query tiles of block n only.

Visibility inside the chosen tiles is simply ``key_pos <= query_pos``: earlier blocks always satisfy it, and the own
block is causal; it is only evaluated on tiles that straddle the diagonal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128  # online-softmax statistics are kept lane-replicated, [bq, 128]
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
F32 = jnp.float32


def _dot(a, b, dims):
    """MXU product with f32 accumulation; f32 operands at full precision (regardless of the global matmul-precision
    flag, whose "highest" would request an fp32 contraction Mosaic rejects for bf16 operands)."""
    precision = lax.Precision.HIGHEST if a.dtype == F32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _params(cfg, semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _div(a, b: int):
    """Integer division of a non-negative traced index (``lax.div``: floor_divide would lower ``sign``)."""
    return lax.div(a, jnp.asarray(b, jnp.int32))


def _dims(cfg, q_BHTK, k_BGTK, famk_BGNFK):
    B, H, Tp, K = q_BHTK.shape
    G = k_BGTK.shape[1]
    S, M, bq, bk = cfg.block_size, cfg.memory_segments, cfg.block_q, cfg.block_k
    return B, H, G, H // G, Tp, K, famk_BGNFK.shape[2], famk_BGNFK.shape[3], S, M, bq, bk


def _fwd_key_tile(i, j, *, S, M, bq, bk):
    """(unclamped key tile, clamped key tile) of key step j for query tile i."""
    kt = (_div(i * bq, S) - M) * (S // bk) + j
    last = _div(i * bq + bq - 1, bk)  # last tile holding a key <= the tile's last query
    return kt, jnp.minimum(jnp.maximum(kt, 0), last)


def _causal_mask(q_start, k_start, bq, bk):
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    return k_pos <= q_pos


def _scores(q, k, scale, mask):
    s = _dot(q, k, NT) * scale
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _eye(n):
    return lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)


def _row(col_N1):
    """[n, 1] (or lane-replicated [n, L]) column -> [1, n] row, exactly (one nonzero per sum)."""
    n = col_N1.shape[0]
    return jnp.sum(jnp.where(_eye(n), jnp.broadcast_to(col_N1[:, :1], (n, n)), 0.0), axis=0, keepdims=True)


def _col(row_1N):
    """[1, n] row -> [n, 1] column, exactly."""
    n = row_1N.shape[1]
    return jnp.sum(jnp.where(_eye(n), jnp.broadcast_to(row_1N, (n, n)), 0.0), axis=1, keepdims=True)


def to_rows(x_BHT, bq: int):
    """[B,H,Tp] -> the kernels' lane-dense [B,H,Tp/bq,1,bq]."""
    B, H, Tp = x_BHT.shape
    return x_BHT.reshape(B, H, Tp // bq, 1, bq)


def from_rows(x_BHN1Q):
    B, H, n, _, bq = x_BHN1Q.shape
    return x_BHN1Q.reshape(B, H, n * bq)


# ----------------------------------------------------------------------------------------------------- forward
def _softmax_step(q, k, v, mask, m_sc, l_sc, acc_sc, scale):
    """One online-softmax update with a [bk, K] key/value tile (Milakov & Gimelshein 2018)."""
    s = _scores(q, k, scale, mask)  # [bq, bk]
    m_prev = m_sc[...]  # [bq, LANES]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, :1])
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    pv = _dot(p.astype(v.dtype), v, NN)
    acc_sc[...] = acc_sc[...] * alpha[:, :1] + pv
    m_sc[...] = m_next


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, has_fam, S, M, bq, bk, nk, scale):
    if has_fam:
        fk_ref, fv_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    i, j = pl.program_id(2), pl.program_id(3)
    q_start = i * bq
    kt, _ = _fwd_key_tile(i, j, S=S, M=M, bq=bq, bk=bk)
    k_start = kt * bk

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, F32)
        l_sc[...] = jnp.zeros(l_sc.shape, F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, F32)
        if has_fam:  # the F FAM keys of this block: visible to every query
            _softmax_step(q_ref[...], fk_ref[...], fv_ref[...], None, m_sc, l_sc, acc_sc, scale)

    visible = (kt >= 0) & (k_start <= q_start + bq - 1)
    diagonal = k_start + bk - 1 > q_start

    @pl.when(visible & jnp.logical_not(diagonal))
    def _full():
        _softmax_step(q_ref[...], k_ref[...], v_ref[...], None, m_sc, l_sc, acc_sc, scale)

    @pl.when(visible & diagonal)
    def _masked():
        mask = _causal_mask(q_start, k_start, bq, bk)
        _softmax_step(q_ref[...], k_ref[...], v_ref[...], mask, m_sc, l_sc, acc_sc, scale)

    @pl.when(j == nk - 1)
    def _finalize():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / l[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = _row(m_sc[...] + jnp.log(l))


def forward(cfg, q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK):
    """Returns (o [B,H,Tp,K] in q's dtype, lse [B,H,Tp] f32)."""
    B, H, G, R, Tp, K, N, F, S, M, bq, bk = _dims(cfg, q_BHTK, k_BGTK, famk_BGNFK)
    nk = (M + 1) * S // bk
    tile = functools.partial(_fwd_key_tile, S=S, M=M, bq=bq, bk=bk)
    q_spec = pl.BlockSpec((None, None, bq, K), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, K), lambda b, h, i, j: (b, _div(h, R), tile(i, j)[1], 0))
    fam_spec = pl.BlockSpec((None, None, None, F, K), lambda b, h, i, j: (b, _div(h, R), _div(i * bq, S), 0, 0))
    lse_spec = pl.BlockSpec((None, None, None, 1, bq), lambda b, h, i, j: (b, h, i, 0, 0))
    has_fam = F > 0
    in_specs = [q_spec, kv_spec, kv_spec] + ([fam_spec, fam_spec] if has_fam else [])
    args = (q_BHTK, k_BGTK, v_BGTK) + ((famk_BGNFK, famv_BGNFK) if has_fam else ())
    kernel = functools.partial(_fwd_kernel, has_fam=has_fam, S=S, M=M, bq=bq, bk=bk, nk=nk, scale=cfg.scale)
    o_BHTK, lse_BHN1Q = pl.pallas_call(
        kernel,
        grid=(B, H, Tp // bq, nk),
        in_specs=in_specs,
        out_specs=[q_spec, lse_spec],
        out_shape=[
            jax.ShapeDtypeStruct(q_BHTK.shape, q_BHTK.dtype),
            jax.ShapeDtypeStruct((B, H, Tp // bq, 1, bq), F32),
        ],
        scratch_shapes=[pltpu.VMEM((bq, LANES), F32), pltpu.VMEM((bq, LANES), F32), pltpu.VMEM((bq, K), F32)],
        compiler_params=_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="fam_attention_fwd",
    )(*args)
    return o_BHTK, from_rows(lse_BHN1Q)


# ---------------------------------------------------------------------------------------------------- backward
def _dq_step(q, k, v, do, lse, delta, mask, dq_sc, scale):
    """lse, delta: [bq, 1] columns."""
    p = jnp.exp(_scores(q, k, scale, mask) - lse)  # [bq, bk]; masked entries underflow to 0
    dp = _dot(do, v, NT)
    ds = p * (dp - delta)
    dq_sc[...] += _dot(ds.astype(k.dtype), k, NN)


def _dq_kernel(q_ref, k_ref, v_ref, *refs, has_fam, S, M, bq, bk, nk, scale):
    if has_fam:
        fk_ref, fv_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, stat_sc = refs
    else:
        do_ref, lse_ref, delta_ref, dq_ref, dq_sc, stat_sc = refs
    i, j = pl.program_id(2), pl.program_id(3)
    q_start = i * bq
    kt, _ = _fwd_key_tile(i, j, S=S, M=M, bq=bq, bk=bk)
    k_start = kt * bk
    step = lambda k_ref_, v_ref_, mask: _dq_step(
        q_ref[...], k_ref_[...], v_ref_[...], do_ref[...], stat_sc[:, 0:1], stat_sc[:, 1:2], mask, dq_sc, scale
    )

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, F32)
        # the q tile's lse / delta rows as columns (lanes 0 / 1), once per tile
        lanes = lax.broadcasted_iota(jnp.int32, stat_sc.shape, 1)
        stat_sc[...] = jnp.where(lanes == 0, _col(lse_ref[...]), _col(delta_ref[...]))
        if has_fam:
            step(fk_ref, fv_ref, None)

    visible = (kt >= 0) & (k_start <= q_start + bq - 1)
    diagonal = k_start + bk - 1 > q_start

    @pl.when(visible & jnp.logical_not(diagonal))
    def _full():
        step(k_ref, v_ref, None)

    @pl.when(visible & diagonal)
    def _masked():
        step(k_ref, v_ref, _causal_mask(q_start, k_start, bq, bk))

    @pl.when(j == nk - 1)
    def _finalize():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_step(q, k, v, do, lse, delta, mask_t, dk_sc, dv_sc, scale):
    """Transposed scores: lse, delta are [1, bq] rows; ``mask_t`` is [bk, bq]."""
    s_t = _dot(k, q, NT) * scale  # [bk, bq]
    if mask_t is not None:
        s_t = jnp.where(mask_t, s_t, MASK_VALUE)
    p_t = jnp.exp(s_t - lse)
    dv_sc[...] += _dot(p_t.astype(do.dtype), do, NN)  # [bk, K]
    dp_t = _dot(v, do, NT)  # [bk, bq]
    ds_t = p_t * (dp_t - delta)
    dk_sc[...] += _dot(ds_t.astype(q.dtype), q, NN)


def _causal_mask_t(q_start, k_start, bq, bk):
    """[bk, bq]: key (row) visible to query (column)."""
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
    return k_pos <= q_pos


def _dkv_query_tile(t, j, *, S, M, bq, bk, nq):
    """(unclamped, clamped) query tile of step j for key tile t: tiles from t's start to the end of block n+M."""
    first = _div(t * bk, bq)
    last = jnp.minimum((_div(t * bk, S) + M + 1) * (S // bq), nq) - 1
    qt = first + j
    return qt, jnp.minimum(qt, last), last


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, S, M, bq, bk, nq,
                nqs, R, scale):  # fmt: skip
    t, r, j = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    qt, _, last = _dkv_query_tile(t, j, S=S, M=M, bq=bq, bk=bk, nq=nq)
    q_start, k_start = qt * bq, t * bk
    step = lambda mask: _dkv_step(
        q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], mask, dk_sc, dv_sc, scale
    )

    @pl.when((r == 0) & (j == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, F32)

    visible = qt <= last
    diagonal = k_start + bk - 1 > q_start

    @pl.when(visible & jnp.logical_not(diagonal))
    def _full():
        step(None)

    @pl.when(visible & diagonal)
    def _masked():
        step(_causal_mask_t(q_start, k_start, bq, bk))

    @pl.when((r == R - 1) & (j == nqs - 1))
    def _finalize():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dfam_kernel(q_ref, fk_ref, fv_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, R, nqs, scale):
    r, j = pl.program_id(3), pl.program_id(4)

    @pl.when((r == 0) & (j == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, F32)

    _dkv_step(
        q_ref[...], fk_ref[...], fv_ref[...], do_ref[...], lse_ref[...], delta_ref[...], None, dk_sc, dv_sc, scale
    )

    @pl.when((r == R - 1) & (j == nqs - 1))
    def _finalize():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(cfg, q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK, do_BHTK, lse_BHT, delta_BHT):
    """lse, delta [B,H,Tp] f32. Returns (dq, dk, dv, dfamk, dfamv) in the input dtypes and layouts."""
    B, H, G, R, Tp, K, N, F, S, M, bq, bk = _dims(cfg, q_BHTK, k_BGTK, famk_BGNFK)
    lse_rows, delta_rows = to_rows(lse_BHT, bq), to_rows(delta_BHT, bq)
    nq, nk = Tp // bq, (M + 1) * S // bk
    has_fam = F > 0
    scale = cfg.scale

    # dq: same grid and tile walk as the forward.
    tile = functools.partial(_fwd_key_tile, S=S, M=M, bq=bq, bk=bk)
    q_spec = pl.BlockSpec((None, None, bq, K), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, K), lambda b, h, i, j: (b, _div(h, R), tile(i, j)[1], 0))
    fam_spec = pl.BlockSpec((None, None, None, F, K), lambda b, h, i, j: (b, _div(h, R), _div(i * bq, S), 0, 0))
    row_spec = pl.BlockSpec((None, None, None, 1, bq), lambda b, h, i, j: (b, h, i, 0, 0))
    in_specs = [q_spec, kv_spec, kv_spec] + ([fam_spec, fam_spec] if has_fam else []) + [q_spec, row_spec, row_spec]
    args = (q_BHTK, k_BGTK, v_BGTK) + ((famk_BGNFK, famv_BGNFK) if has_fam else ())
    args += (do_BHTK, lse_rows, delta_rows)
    dq_BHTK = pl.pallas_call(
        functools.partial(_dq_kernel, has_fam=has_fam, S=S, M=M, bq=bq, bk=bk, nk=nk, scale=scale),
        grid=(B, H, nq, nk),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_BHTK.shape, q_BHTK.dtype),
        scratch_shapes=[pltpu.VMEM((bq, K), F32), pltpu.VMEM((bq, LANES), F32)],
        compiler_params=_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="fam_attention_dq",
    )(*args)

    # dk, dv: per key tile, walk the query tiles (and the R query heads) that read it.
    nqs = (M + 1) * S // bq
    qtile = functools.partial(_dkv_query_tile, S=S, M=M, bq=bq, bk=bk, nq=nq)
    q_spec = pl.BlockSpec((None, None, bq, K), lambda b, g, t, r, j: (b, g * R + r, qtile(t, j)[1], 0))
    row_spec = pl.BlockSpec((None, None, None, 1, bq), lambda b, g, t, r, j: (b, g * R + r, qtile(t, j)[1], 0, 0))
    kv_spec = pl.BlockSpec((None, None, bk, K), lambda b, g, t, r, j: (b, g, t, 0))
    dk_BGTK, dv_BGTK = pl.pallas_call(
        functools.partial(_dkv_kernel, S=S, M=M, bq=bq, bk=bk, nq=nq, nqs=nqs, R=R, scale=scale),
        grid=(B, G, Tp // bk, R, nqs),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k_BGTK.shape, k_BGTK.dtype), jax.ShapeDtypeStruct(v_BGTK.shape, v_BGTK.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, K), F32), pltpu.VMEM((bk, K), F32)],
        compiler_params=_params(cfg, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=cfg.interpret,
        name="fam_attention_dkv",
    )(q_BHTK, k_BGTK, v_BGTK, do_BHTK, lse_rows, delta_rows)

    if not has_fam:
        return dq_BHTK, dk_BGTK, dv_BGTK, jnp.zeros_like(famk_BGNFK), jnp.zeros_like(famv_BGNFK)

    # dFAM: the FAM keys of block n are read by the S/bq query tiles of block n (all R heads of the group).
    per_block = S // bq
    q_spec = pl.BlockSpec((None, None, bq, K), lambda b, g, n, r, j: (b, g * R + r, n * per_block + j, 0))
    row_spec = pl.BlockSpec((None, None, None, 1, bq), lambda b, g, n, r, j: (b, g * R + r, n * per_block + j, 0, 0))
    fam_spec = pl.BlockSpec((None, None, None, F, K), lambda b, g, n, r, j: (b, g, n, 0, 0))
    dfamk_BGNFK, dfamv_BGNFK = pl.pallas_call(
        functools.partial(_dfam_kernel, R=R, nqs=per_block, scale=scale),
        grid=(B, G, N, R, per_block),
        in_specs=[q_spec, fam_spec, fam_spec, q_spec, row_spec, row_spec],
        out_specs=[fam_spec, fam_spec],
        out_shape=[
            jax.ShapeDtypeStruct(famk_BGNFK.shape, famk_BGNFK.dtype),
            jax.ShapeDtypeStruct(famv_BGNFK.shape, famv_BGNFK.dtype),
        ],
        scratch_shapes=[pltpu.VMEM((F, K), F32), pltpu.VMEM((F, K), F32)],
        compiler_params=_params(cfg, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=cfg.interpret,
        name="fam_attention_dfam",
    )(q_BHTK, famk_BGNFK, famv_BGNFK, do_BHTK, lse_rows, delta_rows)
    return dq_BHTK, dk_BGTK, dv_BGTK, dfamk_BGNFK, dfamv_BGNFK
