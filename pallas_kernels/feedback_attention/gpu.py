"""Mosaic GPU (Hopper, ``plgpu``) kernels for TransformerFAM feedback attention (arXiv 2404.09173, Sec. 3.2).

One warpgroup per (batch, head, query tile): the query tile and the block's FAM keys/values are copied to SMEM with
TMA, then the key tiles of blocks n-M..n are streamed through a two-slot SMEM ring (the copy of tile t+1 overlaps
the WGMMAs of tile t) under an online softmax held in registers (WGMMA layout). Keys are handed to the kernel
transposed ([B,G,K,T], one XLA transpose), so the score WGMMA reads a [K, bk] SMEM tile: no ``k.T`` in-kernel.
Tiles before the diagonal run unmasked; the diagonal tiles apply ``key_pos <= query_pos``.

The backward pass runs dq, dk/dv and dFAM kernels built the same way (64 x 64 tiles). Supported: bfloat16 inputs,
head dim K % 64 == 0, block_q % 64 == 0, block_k % 64 == 0, F % 64 == 0 (F = 0 allowed), and SMEM within the H100
budget (K = 128, F = 64, 128-tiles fits; K = 128 with F = 128 does not); ``unsupported`` names what does not fit,
and ops.py turns that into an error (``impl="pallas"``) or a logged XLA fallback (``impl="auto"``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

F32 = jnp.float32
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
WGMMA_TILE = 64


SMEM_BUDGET = 232448 - 8192  # H100 dynamic SMEM per block, less room for barriers and reduction scratch
BWD_TILE = 64  # backward tiles (q and k): keeps the dq / dk,dv rings of four [64, K] streams within SMEM


def _smem_bytes(cfg, K: int, F: int, itemsize: int) -> dict[str, int]:
    """SMEM each kernel allocates (compiled mode), in bytes."""
    bq, bk, t = cfg.block_q, cfg.block_k, BWD_TILE
    return {
        "fwd": (bq * K + 2 * 2 * bk * K + 2 * F * K) * itemsize + 4 * bq,
        "dq": (2 * t * K + 3 * 2 * t * K + 3 * F * K) * itemsize + 8 * t,
        "dkv": (2 * max(t, F) * K + 4 * 2 * t * K) * itemsize + 16 * t,
    }


def unsupported(cfg, K: int, F: int, dtype, *, backward: bool = False) -> list[str]:
    """Why the Mosaic-GPU forward (or backward) kernel cannot run this configuration; empty when it can.

    ``cfg`` carries the tiles the forward would use (the backward always uses BWD_TILE x BWD_TILE)."""
    dtype = jnp.dtype(dtype)
    why = []
    if dtype != jnp.bfloat16:
        why.append(f"dtype {dtype} (the GPU kernels are bfloat16-only)")
    if K % WGMMA_TILE:
        why.append(f"head dim K={K} (needs a multiple of {WGMMA_TILE})")
    if F % WGMMA_TILE:
        why.append(f"FAM length F={F} (needs 0 or a multiple of {WGMMA_TILE})")
    if not backward:
        for name, t in (("block_q", cfg.block_q), ("block_k", cfg.block_k)):
            if t % WGMMA_TILE:
                why.append(f"tile size {name}={t} (needs a multiple of {WGMMA_TILE})")
    if why:
        return why
    smem = _smem_bytes(cfg, K, F, dtype.itemsize)
    need = max(smem["dq"], smem["dkv"]) if backward else smem["fwd"]
    if need > SMEM_BUDGET:
        which = "backward (64-tiles)" if backward else f"forward (block_q={cfg.block_q}, block_k={cfg.block_k})"
        why.append(f"shared-memory budget: the {which} needs {need} bytes > {SMEM_BUDGET} (K={K}, F={F})")
    return why


def supported(cfg, q_BHTK, famk_BGNFK, *, backward: bool = False) -> bool:
    """Whether the Mosaic-GPU forward (or backward) kernel handles this configuration (see ``unsupported``)."""
    return not unsupported(cfg, q_BHTK.shape[-1], famk_BGNFK.shape[3], q_BHTK.dtype, backward=backward)


def _to_bthk(x_BHTK):
    return x_BHTK.transpose(0, 2, 1, 3)


def _check(cfg, q_BHTK, famk_BGNFK, backward):
    why = unsupported(cfg, q_BHTK.shape[-1], famk_BGNFK.shape[3], q_BHTK.dtype, backward=backward)
    if why:
        raise ValueError(
            f"the Mosaic-GPU feedback-attention {'backward' if backward else 'forward'} kernel does "
            f"not support: {'; '.join(why)}"
        )


def forward(cfg, q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK):
    """Returns (o [B,H,Tp,K] in q's dtype, lse [B,H,Tp] f32). Unsupported configurations raise (ops.py decides)."""
    _check(cfg, q_BHTK, famk_BGNFK, False)
    return _forward_kernel(cfg, q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK)


def backward(cfg, q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK, do_BHTK, lse_BHT, delta_BHT):
    """Mosaic-GPU dq / dk,dv / dFAM kernels (64 x 64 tiles). Unsupported configurations raise (ops.py decides)."""
    _check(cfg, q_BHTK, famk_BGNFK, True)
    return _backward_kernels(
        cfg.replace(block_q=BWD_TILE, block_k=BWD_TILE),
        q_BHTK,
        k_BGTK,
        v_BGTK,
        famk_BGNFK,
        famv_BGNFK,
        do_BHTK,
        lse_BHT,
        delta_BHT,
    )


def interpret_params():
    """Mosaic-GPU interpret mode (simulated SMEM/TMA/barriers/WGMMA on CPU), used by the CPU parity tests."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # no public alias in jax 0.10

    return InterpretGPUParams()


def _mm(a, b, shape):
    """WGMMA a @ b into a fresh f32 accumulator of ``shape`` (b, and a unless in registers, live in SMEM)."""

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, F32))


class _Ring:
    """Two-slot SMEM ring over several GMEM streams: ``fetch(u)`` copies step u's tiles into slot u % 2."""

    def __init__(self, streams, bars):
        self.streams, self.bars = streams, bars  # [(smem [2, ...], src_fn(u) -> GMEM ref view)], [Barrier(2)]

    def fetch(self, u):
        slot = lax.rem(u, 2)
        for (smem, src), bar in zip(self.streams, self.bars, strict=True):
            plgpu.copy_gmem_to_smem(src(u), smem.at[slot], bar.at[slot])

    def wait(self, u):
        slot = lax.rem(u, 2)
        for bar in self.bars:
            plgpu.barrier_wait(bar.at[slot])
        return [smem.at[slot] for smem, _ in self.streams]


class _Ops:
    """Interpret-aware helpers: the GPU interpreter has no layout casts and reads WGMMA A operands from SMEM only."""

    def __init__(self, dtype, interpret):
        self.dtype, self.interpret = dtype, interpret
        self.tr = (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))

    def layout(self, x, lay):
        return x if self.interpret is not None else plgpu.layout_cast(x, lay)

    def iota(self, dim, shape):
        if self.interpret is not None:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def load_row(self, ref, dim):
        """[n] f32 vector from SMEM, laid out to broadcast along ``dim`` of a WGMMA-layout [.., ..] array."""
        return (
            ref[...] if self.interpret is not None else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - dim))
        )

    def stage(self, x, stage_refs):
        """The WGMMA A operand: registers when compiled; copied into a matching SMEM staging ref when interpreted."""
        if self.interpret is None:
            return x
        ref = next(r for r in stage_refs if r.shape == x.shape)
        ref[...] = x
        plgpu.commit_smem()
        return ref

    def smem(self, shape, dtype=None):
        dtype = dtype or self.dtype
        return plgpu.SMEM(shape, dtype, transforms=self.tr if dtype == self.dtype and len(shape) >= 2 else ())

    def staging(self, *shapes):
        return [self.smem(sh) for sh in shapes] if self.interpret is not None else []


def _forward_kernel(cfg, q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK, *, interpret=None):
    """Mosaic-GPU forward; ``interpret=interpret_params()`` runs it on CPU (layout casts are then skipped)."""
    B, H, Tp, K = q_BHTK.shape
    G = k_BGTK.shape[1]
    R = H // G
    F = famk_BGNFK.shape[3]
    S, M, bq, bk = cfg.block_size, cfg.memory_segments, cfg.block_q, cfg.block_k
    scale, dtype = cfg.scale, q_BHTK.dtype
    kpb = S // bk
    has_fam = F > 0
    ops = _Ops(dtype, interpret)
    wgmma, row = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)

    def step(carry, kt_smem, v_smem, n_keys, mask_start):
        """Online-softmax update with one key tile stored transposed, [K, n_keys], and its [n_keys, K] values."""
        acc, m_i, l_i = carry

        s = _mm(q_smem_ref[0], kt_smem, (bq, n_keys)) * scale  # [bq, K] x [K, n_keys]
        if mask_start is not None:
            q_pos = q_start_ref[0] + ops.iota(0, (bq, n_keys))
            k_pos = mask_start + ops.iota(1, (bq, n_keys))
            s = jnp.where(k_pos <= q_pos, s, MASK_VALUE)
        m_next = jnp.maximum(m_i, s.max(axis=1))
        alpha = jnp.exp(m_i - m_next)
        p = jnp.exp(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)

        pv = _mm(ops.stage(p.astype(dtype), p_smem_refs), v_smem, (bq, K))
        return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_next, l_i

    # Python closures read these through one-element lists (set inside the kernel body).
    q_smem_ref, q_start_ref, p_smem_refs = [None], [None], []

    def kernel(q_ref, k_ref, v_ref, *refs):
        if interpret is not None:
            p_smem_refs[:] = refs[-2:]
            refs = refs[:-2]
        if has_fam:
            fk_ref, fv_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, fk_smem, fv_smem, lse_smem, bars, kbar, vbar = refs
        else:
            o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, bars, kbar, vbar = refs
        b, h, i = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tiles")
        g = lax.div(h, jnp.array(R, h.dtype))
        q_start = i * bq
        n = lax.div(q_start, jnp.array(S, q_start.dtype))
        q_smem_ref[0], q_start_ref[0] = q_smem, q_start

        first = jnp.maximum((n - M) * kpb, 0)
        last = lax.div(q_start + bq - 1, jnp.array(bk, q_start.dtype))
        n_full = lax.div(q_start + 1, jnp.array(bk, q_start.dtype))  # tiles entirely <= the first query

        def fetch(t):
            slot = lax.rem(t, 2)
            keys = pl.ds(t * bk, bk)
            plgpu.copy_gmem_to_smem(k_ref.at[b, g, :, keys], k_smem.at[slot], kbar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, g, keys], v_smem.at[slot], vbar.at[slot])

        plgpu.copy_gmem_to_smem(q_ref.at[b, h, pl.ds(q_start, bq)], q_smem, bars.at[0])
        fetch(first)
        if has_fam:
            plgpu.copy_gmem_to_smem(fk_ref.at[b, g, n], fk_smem, bars.at[1])
            plgpu.copy_gmem_to_smem(fv_ref.at[b, g, n], fv_smem, bars.at[2])
        plgpu.barrier_wait(bars.at[0])

        acc = ops.layout(jnp.zeros((bq, K), F32), wgmma)
        m_i = ops.layout(jnp.full((bq,), -jnp.inf, F32), row)
        l_i = ops.layout(jnp.zeros((bq,), F32), row)
        carry = (acc, m_i, l_i)
        if has_fam:
            plgpu.barrier_wait(bars.at[1])
            plgpu.barrier_wait(bars.at[2])
            carry = step(carry, fk_smem, fv_smem, F, None)

        def body(t, carry, masked):
            @pl.when(t + 1 <= last)
            def _prefetch():  # slot (t+1) % 2 was last read by tile t-1, whose WGMMAs have completed
                fetch(t + 1)

            slot = lax.rem(t, 2)
            plgpu.barrier_wait(kbar.at[slot])
            plgpu.barrier_wait(vbar.at[slot])
            return step(carry, k_smem.at[slot], v_smem.at[slot], bk, t * bk if masked else None)

        mid = jnp.maximum(n_full, first)
        carry = lax.fori_loop(first, mid, functools.partial(body, masked=False), carry)
        acc, m_i, l_i = lax.fori_loop(mid, last + 1, functools.partial(body, masked=True), carry)

        q_smem[...] = (acc / lax.broadcast_in_dim(l_i, acc.shape, [0])).astype(dtype)
        lse_smem[...] = m_i + jnp.log(l_i)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, h, pl.ds(q_start, bq)])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_start, bq)])
        plgpu.wait_smem_to_gmem(0)

    scratch = [ops.smem((bq, K)), ops.smem((2, K, bk)), ops.smem((2, bk, K))]  # keys transposed: [K, bk] tiles
    if has_fam:
        scratch += [ops.smem((K, F)), ops.smem((F, K))]
    scratch += [ops.smem((bq,), F32), plgpu.Barrier(num_barriers=3)] + [plgpu.Barrier(num_barriers=2)] * 2
    scratch += ops.staging((bq, bk), (bq, max(F, 64)))
    # Keys go in transposed ([.., K, T]) so the score WGMMA reads a plain [K, bk] SMEM tile: no transpose in-kernel.
    kt_BGKT = k_BGTK.transpose(0, 1, 3, 2)
    args = (q_BHTK, kt_BGKT, v_BGTK) + ((famk_BGNFK.transpose(0, 1, 2, 4, 3), famv_BGNFK) if has_fam else ())
    o_BHTK, lse_BHT = plgpu.kernel(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(q_BHTK.shape, dtype), jax.ShapeDtypeStruct((B, H, Tp), F32)],
        scratch_shapes=scratch,
        grid=(B, H, Tp // bq),
        grid_names=("batch", "heads", "q_tiles"),
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
    )(*args)
    return o_BHTK, lse_BHT


# ----------------------------------------------------------------------------------------------------- backward
def _backward_kernels(cfg, q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK, do_BHTK, lse_BHT, delta_BHT, *,
                      interpret=None):  # fmt: skip
    """Mosaic-GPU dq, dk/dv and dFAM kernels (same tile walks as tpu.py), single warpgroup, TMA double-buffering.

    Every WGMMA B operand is copied in the orientation it is consumed in (k and k^T, q and q^T, ...; the transposes
    are XLA ops outside the kernel), so nothing is transposed in-kernel."""
    B, H, Tp, K = q_BHTK.shape
    G = k_BGTK.shape[1]
    R, F, N = H // G, famk_BGNFK.shape[3], famk_BGNFK.shape[2]
    S, M, bq, bk = cfg.block_size, cfg.memory_segments, cfg.block_q, cfg.block_k
    scale, dtype = cfg.scale, q_BHTK.dtype
    kpb, qpb = S // bk, S // bq
    ops = _Ops(dtype, interpret)
    wgmma = plgpu.Layout.WGMMA
    has_fam = F > 0
    T_ = lambda x: jnp.swapaxes(x, -1, -2)
    kt_BGKT, vt_BGKT, qt_BHKT, dot_BHKT = T_(k_BGTK), T_(v_BGTK), T_(q_BHTK), T_(do_BHTK)
    div = lambda a, b: lax.div(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))
    smem = ops.smem

    # --------------------------------------------------------------------------------------------- dq
    def dq_kernel(q_ref, do_ref, lse_ref, delta_ref, kt_ref, k_ref, vt_ref, *refs):
        refs = list(refs)
        stage_refs = refs[-2:] if interpret is not None else []
        refs = refs[:-2] if interpret is not None else refs
        fam_refs = refs[:3] if has_fam else []
        refs = refs[3:] if has_fam else refs
        dq_ref, q_s, do_s, lse_s, delta_s, kt_s, k_s, vt_s, *rest = refs
        fam_s = rest[:3] if has_fam else []
        bars, rbars = rest[-2], rest[-1]
        b, h, i = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tiles")
        g = div(h, R)
        q_start = i * bq
        n = div(q_start, S)
        rows = (b, h, pl.ds(q_start, bq))
        for j, (src, dst) in enumerate(((q_ref, q_s), (do_ref, do_s), (lse_ref, lse_s), (delta_ref, delta_s))):
            plgpu.copy_gmem_to_smem(src.at[rows], dst, bars.at[j])
        if has_fam:
            for j, (src, dst) in enumerate(zip(fam_refs, fam_s, strict=True)):
                plgpu.copy_gmem_to_smem(src.at[b, g, n], dst, bars.at[4 + j])
        first = jnp.maximum((n - M) * kpb, 0)
        last = div(q_start + bq - 1, bk)
        keys = lambda u: pl.ds(u * bk, bk)
        ring = _Ring(
            [(kt_s, lambda u: kt_ref.at[b, g, :, keys(u)]), (k_s, lambda u: k_ref.at[b, g, keys(u)]),
             (vt_s, lambda u: vt_ref.at[b, g, :, keys(u)])],
            list(rbars),
        )  # fmt: skip
        ring.fetch(first)
        for j in range(4):
            plgpu.barrier_wait(bars.at[j])
        lse, delta = ops.load_row(lse_s, 0), ops.load_row(delta_s, 0)

        def step(dq, kt, k, vt, n_keys, mask_start):
            shape = (bq, n_keys)
            s = _mm(q_s, kt, shape) * scale
            if mask_start is not None:
                s = jnp.where(mask_start + ops.iota(1, shape) <= q_start + ops.iota(0, shape), s, MASK_VALUE)
            p = jnp.exp(s - lax.broadcast_in_dim(lse, shape, [0]))
            dp = _mm(do_s, vt, shape)
            ds = p * (dp - lax.broadcast_in_dim(delta, shape, [0]))
            return dq + _mm(ops.stage(ds.astype(dtype), stage_refs), k, (bq, K))

        dq = ops.layout(jnp.zeros((bq, K), F32), wgmma)
        if has_fam:
            for j in range(3):
                plgpu.barrier_wait(bars.at[4 + j])
            dq = step(dq, fam_s[0], fam_s[1], fam_s[2], F, None)

        def body(u, dq, masked):
            @pl.when(u + 1 <= last)
            def _prefetch():
                ring.fetch(u + 1)

            kt, k, vt = ring.wait(u)
            return step(dq, kt, k, vt, bk, u * bk if masked else None)

        mid = jnp.maximum(div(q_start + 1, bk), first)
        dq = lax.fori_loop(first, mid, functools.partial(body, masked=False), dq)
        dq = lax.fori_loop(mid, last + 1, functools.partial(body, masked=True), dq)
        q_s[...] = (dq * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_s, dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    scratch = [smem((bq, K)), smem((bq, K)), smem((bq,), F32), smem((bq,), F32),
               smem((2, K, bk)), smem((2, bk, K)), smem((2, K, bk))]  # fmt: skip
    if has_fam:
        scratch += [smem((K, F)), smem((F, K)), smem((K, F))]
    scratch += [plgpu.Barrier(num_barriers=7), [plgpu.Barrier(num_barriers=2) for _ in range(3)]]
    scratch += ops.staging((bq, bk), (bq, max(F, 64)))
    fam_args = (T_(famk_BGNFK), famk_BGNFK, T_(famv_BGNFK)) if has_fam else ()
    dq_BHTK = plgpu.kernel(
        dq_kernel,
        out_shape=jax.ShapeDtypeStruct(q_BHTK.shape, dtype),
        scratch_shapes=scratch,
        grid=(B, H, Tp // bq),
        grid_names=("batch", "heads", "q_tiles"),
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
    )(q_BHTK, do_BHTK, lse_BHT, delta_BHT, kt_BGKT, k_BGTK, vt_BGKT, *fam_args)

    # ------------------------------------------------------------------------------------- dk/dv, dFAM
    def dkv_call(n_keys, n_tiles, key_slice, q_tiles, masked):
        """Grid (B, G, n_tiles): key tile j ([n_keys, K] at key_slice(j)) against query tiles q_tiles(j) x R heads."""

        def kernel(k_ref, v_ref, q_ref, qt_ref, do_ref, dot_ref, lse_ref, delta_ref, *refs):
            refs = list(refs)
            stage_refs = refs[-2:] if interpret is not None else []
            refs = refs[:-2] if interpret is not None else refs
            dk_ref, dv_ref, k_s, v_s, q_s, qt_s, do_s, dot_s, lse_s, delta_s, bars, rbars = refs
            b, g, j = lax.axis_index("batch"), lax.axis_index("groups"), lax.axis_index("k_tiles")
            src = key_slice(b, g, j)
            plgpu.copy_gmem_to_smem(k_ref.at[src], k_s, bars.at[0])
            plgpu.copy_gmem_to_smem(v_ref.at[src], v_s, bars.at[1])
            first, n_q = q_tiles(j)
            k_start = j * n_keys

            def head_rows(u):  # step u -> (head, query rows)
                u = jnp.asarray(u, jnp.int32)
                r, qt = div(u, n_q), first + lax.rem(u, jnp.asarray(n_q, jnp.int32))
                return g * R + r, pl.ds(qt * bq, bq), qt

            def rows(u):
                h, sl, _ = head_rows(u)
                return (b, h, sl)

            def cols(u):
                h, sl, _ = head_rows(u)
                return (b, h, slice(None), sl)

            ring = _Ring(
                [(q_s, lambda u: q_ref.at[rows(u)]), (qt_s, lambda u: qt_ref.at[cols(u)]),
                 (do_s, lambda u: do_ref.at[rows(u)]), (dot_s, lambda u: dot_ref.at[cols(u)]),
                 (lse_s, lambda u: lse_ref.at[rows(u)]), (delta_s, lambda u: delta_ref.at[rows(u)])],
                list(rbars),
            )  # fmt: skip
            steps = R * n_q
            ring.fetch(0)
            plgpu.barrier_wait(bars.at[0])
            plgpu.barrier_wait(bars.at[1])
            shape = (n_keys, bq)

            def body(u, carry):
                dk, dv = carry

                @pl.when(u + 1 < steps)
                def _prefetch():
                    ring.fetch(u + 1)

                q, qt, do, dot, lse_r, delta_r = ring.wait(u)
                s_t = _mm(k_s, qt, shape) * scale  # [keys, queries]
                if masked:
                    q_start = head_rows(u)[2] * bq
                    s_t = jnp.where(k_start + ops.iota(0, shape) <= q_start + ops.iota(1, shape), s_t, MASK_VALUE)
                p_t = jnp.exp(s_t - lax.broadcast_in_dim(ops.load_row(lse_r, 1), shape, [1]))
                dv = dv + _mm(ops.stage(p_t.astype(dtype), stage_refs), do, (n_keys, K))
                dp_t = _mm(v_s, dot, shape)
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(ops.load_row(delta_r, 1), shape, [1]))
                dk = dk + _mm(ops.stage(ds_t.astype(dtype), stage_refs), q, (n_keys, K))
                return dk, dv

            zeros = ops.layout(jnp.zeros((n_keys, K), F32), wgmma)
            dk, dv = lax.fori_loop(0, steps, body, (zeros, zeros))
            k_s[...] = (dk * scale).astype(dtype)
            v_s[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_s, dk_ref.at[src])
            plgpu.copy_smem_to_gmem(v_s, dv_ref.at[src])
            plgpu.wait_smem_to_gmem(0)

        scratch = [smem((n_keys, K)), smem((n_keys, K)), smem((2, bq, K)), smem((2, K, bq)), smem((2, bq, K)),
                   smem((2, K, bq)), smem((2, bq), F32), smem((2, bq), F32),
                   plgpu.Barrier(num_barriers=2), [plgpu.Barrier(num_barriers=2) for _ in range(6)]]  # fmt: skip
        scratch += ops.staging((n_keys, bq), (n_keys, bq))  # two slots keep the ref unpacking uniform
        return kernel, scratch

    def run_dkv(kernel, scratch, k_arr, v_arr, n_tiles):
        return plgpu.kernel(
            kernel,
            out_shape=[jax.ShapeDtypeStruct(k_arr.shape, dtype), jax.ShapeDtypeStruct(v_arr.shape, dtype)],
            scratch_shapes=scratch,
            grid=(B, G, n_tiles),
            grid_names=("batch", "groups", "k_tiles"),
            compiler_params=plgpu.CompilerParams(),
            interpret=interpret,
        )(k_arr, v_arr, q_BHTK, qt_BHKT, do_BHTK, dot_BHKT, lse_BHT, delta_BHT)

    nq = Tp // bq

    def local_q_tiles(j):  # query tiles from key tile j's start to the end of block n+M (clamped at Tp)
        first = div(j * bk, bq)
        last = jnp.minimum((div(j * bk, S) + M + 1) * qpb, nq) - 1
        return first, last - first + 1

    kernel, scratch = dkv_call(bk, Tp // bk, lambda b, g, j: (b, g, pl.ds(j * bk, bk)), local_q_tiles, True)
    dk_BGTK, dv_BGTK = run_dkv(kernel, scratch, k_BGTK, v_BGTK, Tp // bk)
    if not has_fam:
        return dq_BHTK, dk_BGTK, dv_BGTK, jnp.zeros_like(famk_BGNFK), jnp.zeros_like(famv_BGNFK)
    kernel, scratch = dkv_call(F, N, lambda b, g, n: (b, g, n), lambda n: (n * qpb, jnp.int32(qpb)), False)
    dfamk, dfamv = run_dkv(kernel, scratch, famk_BGNFK, famv_BGNFK, N)
    return dq_BHTK, dk_BGTK, dv_BGTK, dfamk, dfamv
