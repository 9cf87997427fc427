"""Adaptive computation time with Q-learning halting and deep supervision, shared by HRM
(Wang et al. 2025, Sec. 2 "Deep supervision" and "Adaptive computational time") and TRM
(Jolicoeur-Martineau 2025, Sec. 4.6 "Simpler ACT").

Deep supervision keeps a persistent per-row carry across optimizer steps:

    carry = {z: latent states (detached), steps: int32 [B], halted: bool [B], data: the row's example}

Every optimizer step runs ONE segment (one forward of the recursive reasoner) for every row.
A row that halted at the previous step first resets its latents to the fixed initial state and
takes a fresh example from the incoming batch (all with ``jnp.where``: static shapes, one compile).
After the segment, with q = Linear(D, 2)(z_H[:, 0]) = (q_halt, q_continue):

    train:  halted = steps >= max_steps  or  (halt_signal and steps >= min_steps)
            halt_signal = q_halt > q_continue (HRM)   |   q_halt > 0 (TRM, no continue head)
            min_steps = U{2..max_steps} with probability ``exploration_prob``, else 0
    eval:   halted = steps >= max_steps  (run every step; accuracy is reported per step)

Loss = token loss + 0.5 (BCE(q_halt, whole sequence exactly correct) + BCE(q_continue, target)),
target = sigmoid(max(next q_halt, next q_continue)) from an extra no-gradient segment
(sigmoid(next q_halt) at the last step); TRM drops the continue term.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from looped_jax.losses import TOKEN_LOSSES, binary_cross_entropy_with_logits
from looped_jax.recurrence import unroll

# The example fields a carry holds for each row.
DATA_KEYS = ("inputs", "targets", "weights", "puzzle_ids")

# inner(z, data) -> (new z (detached), logits_BTV, q_halt_B, q_continue_B)
InnerFn = Callable[[Any, dict], tuple[Any, jax.Array, jax.Array, jax.Array]]


def example_data(batch: dict) -> dict:
    """The fields of ``batch`` a row of the carry keeps; ``puzzle_ids`` defaults to 0."""
    inputs = jnp.asarray(batch["inputs"], jnp.int32)
    puzzle_ids = batch.get("puzzle_ids")
    if puzzle_ids is None:
        puzzle_ids = jnp.zeros(inputs.shape[:1], jnp.int32)
    return {
        "inputs": inputs,
        "targets": jnp.asarray(batch["targets"], jnp.int32),
        "weights": jnp.asarray(batch["weights"], jnp.float32),
        "puzzle_ids": jnp.asarray(puzzle_ids, jnp.int32),
    }


def initial_act_carry(z0: Any, batch_size: int, seq_len: int) -> dict:
    """All rows start halted, so the first step loads every row's example and initial state."""
    return {
        "z": z0,
        "steps": jnp.zeros((batch_size,), jnp.int32),
        "halted": jnp.ones((batch_size,), bool),
        "data": {
            "inputs": jnp.zeros((batch_size, seq_len), jnp.int32),
            "targets": jnp.zeros((batch_size, seq_len), jnp.int32),
            "weights": jnp.zeros((batch_size, seq_len), jnp.float32),
            "puzzle_ids": jnp.zeros((batch_size,), jnp.int32),
        },
    }


def _where_rows(mask_B: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """Row-wise select: a where mask_B else b (mask broadcast over trailing axes)."""
    return jnp.where(mask_B.reshape(mask_B.shape + (1,) * (a.ndim - 1)), a, b)


def reset_rows(carry: dict, batch: dict, z_init: Any) -> tuple[Any, jax.Array, dict]:
    """Halted rows take the initial latents, step 0 and the batch's example; others keep theirs."""
    halted = carry["halted"]
    z = jax.tree.map(lambda zi, zc: _where_rows(halted, jnp.broadcast_to(zi, zc.shape), zc), z_init, carry["z"])
    steps = jnp.where(halted, 0, carry["steps"])
    new_data = example_data(batch)
    if new_data["inputs"].shape != carry["data"]["inputs"].shape:
        raise ValueError(
            f"batch inputs have shape {new_data['inputs'].shape} but the ACT carry holds "
            f"{carry['data']['inputs'].shape}; initial_carry(batch_size) must match the batch"
        )
    data = {k: _where_rows(halted, new_data[k], carry["data"][k]) for k in DATA_KEYS}
    return z, steps, data


def act_step(
    inner: InnerFn,
    carry: dict,
    batch: dict,
    z_init: Any,
    *,
    rng: jax.Array | None,
    train: bool,
    max_steps: int,
    exploration_prob: float,
    use_continue: bool,
) -> tuple[dict, dict]:
    """One deep-supervision segment for every row. Returns (new carry, outputs)."""
    z, steps, data = reset_rows(carry, batch, z_init)
    z_new, logits_BTV, q_halt_B, q_cont_B = inner(z, data)
    steps = steps + 1
    is_last_B = steps >= max_steps
    halted = is_last_B
    outputs = {"logits": logits_BTV, "q_halt": q_halt_B, "q_continue": q_cont_B}
    if train and max_steps > 1:
        signal = (q_halt_B > q_cont_B) if use_continue else (q_halt_B > 0)
        halted = halted | jax.lax.stop_gradient(signal)
        if exploration_prob > 0:
            if rng is None:
                raise ValueError("ACT training with exploration_prob > 0 needs an rng")
            k_explore, k_min = jax.random.split(rng)
            explore_B = jax.random.uniform(k_explore, steps.shape) < exploration_prob
            min_steps_B = jnp.where(explore_B, jax.random.randint(k_min, steps.shape, 2, max_steps + 1), 0)
            halted = halted & (steps >= min_steps_B)
        if use_continue:
            _, _, next_halt_B, next_cont_B = inner(z_new, data)
            target = jnp.where(is_last_B, next_halt_B, jnp.maximum(next_halt_B, next_cont_B))
            outputs["target_q_continue"] = jax.lax.stop_gradient(jax.nn.sigmoid(target))
    new_carry = {"z": jax.lax.stop_gradient(z_new), "steps": steps, "halted": halted, "data": data}
    return new_carry, outputs


def sequence_correct(logits_BTV: jax.Array, data: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-token correct [B,T] on weighted tokens, supervised-token counts [B], exact [B])."""
    mask_BT = data["weights"] > 0
    counts_B = mask_BT.sum(-1)
    correct_BT = mask_BT & (jnp.argmax(logits_BTV, axis=-1) == data["targets"])
    return correct_BT, counts_B, correct_BT.sum(-1) == counts_B


def exact_match(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Whole-answer accuracy: (exact_B, valid_B), exact_B = every weighted token of the row is right
    (and the row has one), valid_B = the row has any weight. The one exact-match rule of the package."""
    _, counts_B, exact_B = sequence_correct(logits_BTV, {"targets": targets_BT, "weights": weights_BT})
    valid_B = counts_B > 0
    return exact_B & valid_B, valid_B


def act_loss(carry: dict, outputs: dict, *, loss_type: str = "stablemax") -> tuple[jax.Array, dict]:
    """HRM's ACTLossHead: mean over rows of (per-row mean token loss + 0.5 (BCE_halt + BCE_cont)).

    Metrics are averaged over rows that halted this step (``count`` of them), as in the public code.
    """
    if loss_type not in TOKEN_LOSSES:
        raise ValueError(f"loss_type={loss_type!r}; expected one of {sorted(TOKEN_LOSSES)}")
    data = carry["data"]
    logits_BTV = outputs["logits"]
    batch = logits_BTV.shape[0]
    correct_BT, counts_B, exact_B = sequence_correct(logits_BTV, data)
    weights_BT = data["weights"]
    token_loss_BT = TOKEN_LOSSES[loss_type](logits_BTV, data["targets"])
    lm_loss = jnp.sum((token_loss_BT * weights_BT).sum(-1) / jnp.maximum(weights_BT.sum(-1), 1.0)) / batch
    q_halt_loss = jnp.sum(binary_cross_entropy_with_logits(outputs["q_halt"], exact_B.astype(jnp.float32))) / batch
    loss = lm_loss + 0.5 * q_halt_loss
    metrics = {"lm_loss": lm_loss, "q_halt_loss": q_halt_loss}
    if "target_q_continue" in outputs:
        bce_cont_B = binary_cross_entropy_with_logits(outputs["q_continue"], outputs["target_q_continue"])
        q_cont_loss = jnp.sum(bce_cont_B) / batch
        loss = loss + 0.5 * q_cont_loss
        metrics["q_continue_loss"] = q_cont_loss
    valid_B = carry["halted"] & (counts_B > 0)
    count = valid_B.sum()
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    token_acc_B = correct_BT.sum(-1) / jnp.maximum(counts_B, 1)
    metrics.update(
        loss=loss,
        count=count.astype(jnp.float32),
        accuracy=jnp.where(valid_B, token_acc_B, 0.0).sum() / denom,
        exact_accuracy=(valid_B & exact_B).sum() / denom,
        q_halt_accuracy=(valid_B & ((outputs["q_halt"] >= 0) == exact_B)).sum() / denom,
        steps=jnp.where(valid_B, carry["steps"], 0).sum() / denom,
    )
    return loss, metrics


def evaluate_all_steps(
    inner: InnerFn, z0: Any, batch: dict, *, max_steps: int, use_continue: bool
) -> dict[str, jax.Array]:
    """Runs ``max_steps`` segments from the initial state (no halting, no gradient: the engine's
    ``unroll`` with grad_steps=0, recording each step's scores) and reports, per row:

    exact_S_B / token_acc_S_B: exact-match and token accuracy after every step [S, B];
    halt_step_B: the first step whose halt signal fires (max_steps if none);
    exact_at_halt_B: exact match of the prediction at that step (the ACT answer).
    """
    data = example_data(batch)
    batch_size = data["inputs"].shape[0]
    z = jax.tree.map(lambda zi, zc: jnp.broadcast_to(zi, (batch_size,) + zc.shape[1:]), z0, z0)

    # carry = (z, scores of the last step); the engine records the scores after every step.
    def step(params, carry, data):
        del params
        z_new, logits_BTV, q_halt_B, q_cont_B = inner(carry[0], data)
        correct_BT, counts_B, exact_B = sequence_correct(logits_BTV, data)
        signal_B = (q_halt_B > q_cont_B) if use_continue else (q_halt_B > 0)
        token_acc_B = correct_BT.sum(-1) / jnp.maximum(counts_B, 1)
        return z_new, exact_B, token_acc_B, signal_B

    scores0 = (jnp.zeros((batch_size,), bool), jnp.zeros((batch_size,), jnp.float32), jnp.zeros((batch_size,), bool))
    _, (exact_SB, token_acc_SB, signal_SB) = unroll(
        step, None, (z,) + scores0, data, num_steps=max_steps, grad_steps=0, record_fn=lambda carry: carry[1:]
    )
    signal_SB = signal_SB.at[-1].set(True)
    halt_index_B = jnp.argmax(signal_SB, axis=0)
    exact_at_halt_B = jnp.take_along_axis(exact_SB, halt_index_B[None], axis=0)[0]
    return {
        "exact_S_B": exact_SB,
        "token_acc_S_B": token_acc_SB,
        "halt_step_B": halt_index_B + 1,
        "exact_at_halt_B": exact_at_halt_B,
        "valid_B": data["weights"].sum(-1) > 0,
    }
