"""TransformerFAM layer math (Hwang et al. 2024, "TransformerFAM: Feedback attention is working memory",
arXiv 2404.09173, Sec. 3.2 and Alg. 2), written over a pre-norm ``looped_jax.nn.Block`` so that any
foundation model's weights serve: FAM adds no per-layer parameters.

Per layer and block tau (block size S, memory segments M, F FAM vectors):

    Q, K, V     = proj(norm(x_tau))                       (all tokens of the layer at once)
    QF, KF, VF  = proj(norm(F_{tau-1}))                   (same projections, FAM rotary positions)
    x_tau      += Attn(Q -> [K, V of blocks tau-M..tau-1;  KF_{tau-1}, VF_{tau-1};  causal block tau])
    F_tau       = r + Attn(QF -> [KF_{tau-1}, VF_{tau-1};  K, V of block tau])     (no memory segments)
    F_tau      += MLP(norm(F_tau));  x_tau += MLP(norm(x_tau))

``r`` is F_{tau-1}, except for the first update from the learned prompt, which uses a zero residual.
Rotary positions: F_tau sits at the last F positions of block tau (the block it compressed); F_0 sits at
the F positions before the sequence. The FAM recurrence runs as a ``lax.scan`` over blocks (F queries per
block), producing KF_{tau-1}/VF_{tau-1} for every block; the token rows then go through one call of
``pallas_kernels.feedback_attention`` (the XLA reference on CPU, the Pallas kernels on TPU / GPU).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from looped_jax import sharding as shd
from looped_jax.nn import Block
from looped_jax.nn.platform import target_platform
from pallas_kernels.feedback_attention.ops import feedback_attention


def fam_positions(pos0_B: jax.Array, block_index, block_size: int, fam_length: int) -> jax.Array:
    """Rotary positions [B, F] of F_n, the FAM that compressed block n (n = -1: the prompt F_0)."""
    i_F = jnp.arange(fam_length, dtype=jnp.float32)
    start = (jnp.asarray(block_index, jnp.float32) + 1.0) * block_size - fam_length
    return pos0_B.astype(jnp.float32)[:, None] + start + i_F[None, :]


def dense_attend(q_BFHK: jax.Array, k_BLGK: jax.Array, v_BLGK: jax.Array, mask_BL: jax.Array | None = None):
    """Softmax attention of F queries over L keys (GQA; optional key mask [B, L]); f32 softmax, [B, F, H, K]."""
    B, F, H, K = q_BFHK.shape
    G = k_BLGK.shape[2]
    q_BFGRK = q_BFHK.astype(jnp.float32).reshape(B, F, G, H // G, K)
    scores_BGRFL = jnp.einsum("bfgrk,blgk->bgrfl", q_BFGRK, k_BLGK.astype(jnp.float32)) / jnp.sqrt(jnp.float32(K))
    if mask_BL is not None:
        scores_BGRFL = jnp.where(mask_BL[:, None, None, None, :], scores_BGRFL, -jnp.inf)
    probs_BGRFL = jax.nn.softmax(scores_BGRFL, axis=-1)
    o_BFGRK = jnp.einsum("bgrfl,blgk->bfgrk", probs_BGRFL, v_BLGK.astype(jnp.float32))
    return o_BFGRK.reshape(B, F, H, K).astype(q_BFHK.dtype)


def _mlp_residual(block: Block, x_BTD: jax.Array) -> jax.Array:
    return x_BTD + block.mlp(block.norm_mlp_in(x_BTD)).astype(x_BTD.dtype)


def fam_keys(block: Block, fam_BFD: jax.Array, pos_BF: jax.Array) -> tuple[jax.Array, jax.Array]:
    """KF, VF [B, F, G, K] of a FAM at rotary positions ``pos_BF``."""
    _, kf_BFGK, vf_BFGK = block.attn.project(block.norm_attn_in(fam_BFD), pos_BF)
    return kf_BFGK, vf_BFGK


def fam_update(
    block: Block,
    fam_BFD: jax.Array,
    resid_BFD: jax.Array,
    kf_BFGK: jax.Array,
    vf_BFGK: jax.Array,
    qpos_BF: jax.Array,
    k_BSGK: jax.Array,
    v_BSGK: jax.Array,
) -> jax.Array:
    """F_tau from F_{tau-1} and block tau's keys/values (Alg. 2): FAM queries attend to [KF_{tau-1}; block]."""
    qf_BFHK, _, _ = block.attn.project(block.norm_attn_in(fam_BFD), qpos_BF)
    o_BFHK = dense_attend(qf_BFHK, jnp.concatenate([kf_BFGK, k_BSGK], 1), jnp.concatenate([vf_BFGK, v_BSGK], 1))
    new_BFD = resid_BFD + block.attn.output(o_BFHK).astype(resid_BFD.dtype)
    return _mlp_residual(block, new_BFD)


def prompt_step(block: Block, fam_BFD: jax.Array, pos_BF: jax.Array) -> jax.Array:
    """Carries the learned prompt F_0 up through one layer: the block applied to the F prompt vectors alone
    (they attend to each other unmasked, as FAM vectors do)."""
    q_BFHK, k_BFGK, v_BFGK = block.attn.project(block.norm_attn_in(fam_BFD), pos_BF)
    x_BFD = fam_BFD + block.attn.output(dense_attend(q_BFHK, k_BFGK, v_BFGK)).astype(fam_BFD.dtype)
    return _mlp_residual(block, x_BFD)


def layer_forward(
    block: Block,
    x_BTD: jax.Array,
    pos_BT: jax.Array,
    fam_BFD: jax.Array,
    resid_BFD: jax.Array,
    *,
    block_size: int,
    memory_segments: int,
    stop_gradient: bool = False,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """One FAM layer over a whole sequence (T a multiple of block_size). Returns (x_BTD, F_N): the layer's
    output and its FAM after the last block. ``stop_gradient`` truncates backprop through the FAM between
    blocks (default: full BPTT)."""
    B, T, _ = x_BTD.shape
    S, F = block_size, fam_BFD.shape[1]
    N = T // S
    q_BTHK, k_BTGK, v_BTGK = block.attn.project(block.norm_attn_in(x_BTD), pos_BT)
    G, K = k_BTGK.shape[2:]
    if F:
        pos0_B = pos_BT[:, 0]
        blocks_N = jnp.arange(N)
        xs = (
            jnp.moveaxis(k_BTGK.reshape(B, N, S, G, K), 1, 0),
            jnp.moveaxis(v_BTGK.reshape(B, N, S, G, K), 1, 0),
            blocks_N,
        )

        def step(carry, inputs):
            fam, resid = carry
            k_BSGK, v_BSGK, n = inputs
            kf_BFGK, vf_BFGK = fam_keys(block, fam, fam_positions(pos0_B, n - 1, S, F))
            new = fam_update(block, fam, resid, kf_BFGK, vf_BFGK, fam_positions(pos0_B, n, S, F), k_BSGK, v_BSGK)
            if stop_gradient:
                new = jax.lax.stop_gradient(new)
            return (new, new), (kf_BFGK, vf_BFGK)

        (fam_BFD, _), (famk_NBFGK, famv_NBFGK) = jax.lax.scan(step, (fam_BFD, resid_BFD), xs)
        famk_BNFGK = jnp.moveaxis(famk_NBFGK, 0, 1)
        famv_BNFGK = jnp.moveaxis(famv_NBFGK, 0, 1)
    else:
        famk_BNFGK = famv_BNFGK = jnp.zeros((B, N, 0, G, K), k_BTGK.dtype)
    # the kernel under shard_map over batch and heads (Pallas calls cannot be auto-partitioned); its code path is
    # the one of the platform being traced for (an AOT compile for TPU from a CPU host gets the Mosaic kernels)
    kernel = partial(
        feedback_attention, block_size=S, memory_segments=memory_segments, impl=impl, platform=target_platform()
    )
    qkv, fam = ("batch", None, "heads", None), ("batch", None, None, "heads", None)
    o_BTHK = shd.shard_kernel(
        kernel, (q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK), (qkv, qkv, qkv, fam, fam), qkv,
        batch=B, heads=(q_BTHK.shape[2], G),
    )  # fmt: skip
    x_BTD = x_BTD + block.attn.output(o_BTHK).astype(x_BTD.dtype)
    return _mlp_residual(block, x_BTD), fam_BFD


class LayerCache(NamedTuple):
    """Streaming state of one FAM layer: K/V of the last (memory_segments + 1) blocks in a ring of
    W = (M + 1) * S slots (slot t mod W holds token t), the current FAM F_{n-1} and the residual its
    next update adds (zero until the first update from the prompt)."""

    k_BWGK: jax.Array
    v_BWGK: jax.Array
    fam_BFD: jax.Array
    resid_BFD: jax.Array


def layer_decode(
    block: Block,
    x_B1D: jax.Array,
    t: jax.Array,
    slot_pos_W: jax.Array,
    cache: LayerCache,
    *,
    block_size: int,
    memory_segments: int,
) -> tuple[jax.Array, LayerCache]:
    """One token (stream index ``t``, also its rotary position) through one FAM layer; ``slot_pos_W`` already
    holds t at slot t mod W. At the last token of a block the FAM is updated (same math as ``layer_forward``)."""
    B = x_B1D.shape[0]
    S, M, F = block_size, memory_segments, cache.fam_BFD.shape[1]
    W = cache.k_BWGK.shape[1]
    n = t // S
    pos_B1 = jnp.full((B, 1), t, jnp.float32)
    q_B1HK, k_B1GK, v_B1GK = block.attn.project(block.norm_attn_in(x_B1D), pos_B1)
    slot = t % W
    k_BWGK = jax.lax.dynamic_update_slice_in_dim(cache.k_BWGK, k_B1GK.astype(cache.k_BWGK.dtype), slot, axis=1)
    v_BWGK = jax.lax.dynamic_update_slice_in_dim(cache.v_BWGK, v_B1GK.astype(cache.v_BWGK.dtype), slot, axis=1)
    visible_W = (slot_pos_W >= 0) & (slot_pos_W <= t) & (slot_pos_W >= (n - M) * S)
    zeros_B = jnp.zeros((B,), jnp.float32)
    if F:
        kf_BFGK, vf_BFGK = fam_keys(block, cache.fam_BFD, fam_positions(zeros_B, n - 1, S, F))
        keys_BLGK = jnp.concatenate([kf_BFGK, k_BWGK], 1)
        vals_BLGK = jnp.concatenate([vf_BFGK, v_BWGK], 1)
        mask_L = jnp.concatenate([jnp.ones((F,), bool), visible_W])
    else:
        keys_BLGK, vals_BLGK, mask_L = k_BWGK, v_BWGK, visible_W
    o_B1HK = dense_attend(q_B1HK, keys_BLGK, vals_BLGK, jnp.broadcast_to(mask_L, (B, mask_L.shape[0])))
    x_B1D = x_B1D + block.attn.output(o_B1HK).astype(x_B1D.dtype)
    x_B1D = _mlp_residual(block, x_B1D)
    fam_BFD, resid_BFD = cache.fam_BFD, cache.resid_BFD
    if F:

        def update(_):
            start = (n % (M + 1)) * S
            k_BSGK = jax.lax.dynamic_slice_in_dim(k_BWGK, start, S, axis=1)
            v_BSGK = jax.lax.dynamic_slice_in_dim(v_BWGK, start, S, axis=1)
            qpos_BF = fam_positions(zeros_B, n, S, F)
            new = fam_update(block, cache.fam_BFD, cache.resid_BFD, kf_BFGK, vf_BFGK, qpos_BF, k_BSGK, v_BSGK)
            return new, new

        fam_BFD, resid_BFD = jax.lax.cond(t % S == S - 1, update, lambda _: (fam_BFD, resid_BFD), None)
    return x_B1D, LayerCache(k_BWGK, v_BWGK, fam_BFD, resid_BFD)
