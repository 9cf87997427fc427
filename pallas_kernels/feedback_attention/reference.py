"""Pure-JAX ground truth for TransformerFAM feedback attention (Hwang et al. 2024, arXiv 2404.09173).

TransformerFAM (Sec. 3.2, Fig. 2) runs block sliding window attention (BSWA): the sequence is cut into blocks of
``block_size`` tokens; a token of block n attends causally within its own block, fully to the ``memory_segments``
previous blocks, and fully to the feedback-attention-memory (FAM) keys/values handed to block n (the model passes the
FAM of the previous block, KF_{n-1}). This module materialises the per-block score matrix explicitly; the Pallas
kernels in ``tpu.py``/``gpu.py`` are checked against it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def num_blocks(seq_len: int, block_size: int) -> int:
    """N = ceil(T / block_size): the number of (possibly ragged) blocks, hence of FAM slots."""
    return -(-seq_len // block_size)


def feedback_attention_reference(
    q_BTHK: jax.Array,
    k_BTGK: jax.Array,
    v_BTGK: jax.Array,
    famk_BNFGK: jax.Array,
    famv_BNFGK: jax.Array,
    *,
    block_size: int,
    memory_segments: int,
    sm_scale: float | None = None,
) -> jax.Array:
    """Block sliding window attention over local keys plus per-block FAM keys; f32 softmax, output in q's dtype.

    Shapes: q [B,T,H,K]; k, v [B,T,G,K] with H % G == 0 (query head h reads kv head h // (H // G));
    famk, famv [B,N,F,G,K] with N = ceil(T / block_size); famk[:, n] is visible to every token of block n.
    """
    o_BTHK, _ = feedback_attention_reference_with_lse(
        q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK,
        block_size=block_size, memory_segments=memory_segments, sm_scale=sm_scale,
    )  # fmt: skip
    return o_BTHK


def feedback_attention_reference_with_lse(
    q_BTHK: jax.Array,
    k_BTGK: jax.Array,
    v_BTGK: jax.Array,
    famk_BNFGK: jax.Array,
    famv_BNFGK: jax.Array,
    *,
    block_size: int,
    memory_segments: int,
    sm_scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``feedback_attention_reference`` plus the f32 log-sum-exp of each query's scores, [B,T,H]."""
    B, T, H, K = q_BTHK.shape
    G = k_BTGK.shape[2]
    R = H // G
    S, M = block_size, memory_segments
    N = num_blocks(T, S)
    F = famk_BNFGK.shape[2]
    scale = 1.0 / math.sqrt(K) if sm_scale is None else sm_scale
    out_dtype = q_BTHK.dtype
    f32 = jnp.float32

    # Pad T to N*S and cut into blocks; M leading zero blocks stand in for blocks before the sequence start.
    pad = N * S - T
    q_BNSGRK = jnp.pad(q_BTHK.astype(f32), ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, N, S, G, R, K)
    k_BNSGK = jnp.pad(k_BTGK.astype(f32), ((0, 0), (M * S, pad), (0, 0), (0, 0))).reshape(B, N + M, S, G, K)
    v_BNSGK = jnp.pad(v_BTGK.astype(f32), ((0, 0), (M * S, pad), (0, 0), (0, 0))).reshape(B, N + M, S, G, K)

    # Keys of block n: blocks n-M..n (M+1 windows of S) then the F FAM slots -> L = (M+1)*S + F keys.
    windows_k = [k_BNSGK[:, j : j + N] for j in range(M + 1)]
    windows_v = [v_BNSGK[:, j : j + N] for j in range(M + 1)]
    keys_BNLGK = jnp.concatenate(windows_k + [famk_BNFGK.astype(f32)], axis=2)
    vals_BNLGK = jnp.concatenate(windows_v + [famv_BNFGK.astype(f32)], axis=2)

    # Visibility [N, S, L]: window j holds block n-M+j, valid if that block exists (n-M+j >= 0); the own block
    # (j == M) is causal; FAM keys are always visible.
    n_N = jnp.arange(N)
    s_S = jnp.arange(S)
    masks = []
    for j in range(M + 1):
        exists_N = n_N - M + j >= 0
        if j == M:
            vis_NSS = (s_S[None, :, None] >= s_S[None, None, :]) & exists_N[:, None, None]
        else:
            vis_NSS = jnp.broadcast_to(exists_N[:, None, None], (N, S, S))
        masks.append(vis_NSS)
    masks.append(jnp.ones((N, S, F), bool))
    vis_NSL = jnp.concatenate(masks, axis=2)

    scores_BNGRSL = jnp.einsum("bnsgrk,bnlgk->bngrsl", q_BNSGRK, keys_BNLGK, precision="highest") * scale
    scores_BNGRSL = jnp.where(vis_NSL[None, :, None, None], scores_BNGRSL, -jnp.inf)
    lse_BNGRS = jax.nn.logsumexp(scores_BNGRSL, axis=-1)  # every row sees at least its own token
    probs_BNGRSL = jnp.exp(scores_BNGRSL - lse_BNGRS[..., None])
    o_BNSGRK = jnp.einsum("bngrsl,bnlgk->bnsgrk", probs_BNGRSL, vals_BNLGK, precision="highest")
    lse_BTH = lse_BNGRS.transpose(0, 1, 4, 2, 3).reshape(B, N * S, H)[:, :T]
    return o_BNSGRK.reshape(B, N * S, H, K)[:, :T].astype(out_dtype), lse_BTH
