"""Optimizer: AdamW with linear warmup + cosine decay and global-norm clipping (optax), or the
HRM/TRM recipe (``optim.name="adam_atan2"``): AdamATan2 on the network and sign-SGD on the
puzzle-identifier embedding, with HRM's linear warmup to a constant rate when
``end_learning_rate_ratio == 1``."""

from __future__ import annotations

import dataclasses

import jax
import optax

from looped_jax.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay to ``end_learning_rate_ratio`` of it."""
    decay_steps = cfg.decay_steps or num_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(decay_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.end_learning_rate_ratio,
    )


def decay_mask(params) -> object:
    """Weight decay on matrices only: norms scales, biases and other vectors are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, num_steps)
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    if cfg.name == "adam_atan2":
        from looped_jax.train.adam_atan2 import hrm_optimizer, linear_warmup

        puzzle_lr = cfg.puzzle_emb_learning_rate or cfg.learning_rate
        puzzle_wd = cfg.weight_decay if cfg.puzzle_emb_weight_decay < 0 else cfg.puzzle_emb_weight_decay
        if cfg.end_learning_rate_ratio == 1.0:
            schedule = linear_warmup(cfg.learning_rate, cfg.warmup_steps)
            puzzle_schedule = linear_warmup(puzzle_lr, cfg.warmup_steps)
        else:
            puzzle_schedule = learning_rate_schedule(dataclasses.replace(cfg, learning_rate=puzzle_lr), num_steps)
        parts.append(
            hrm_optimizer(
                schedule,
                weight_decay=cfg.weight_decay,
                puzzle_learning_rate=puzzle_schedule,
                puzzle_weight_decay=puzzle_wd,
                b1=cfg.b1,
                b2=cfg.b2,
            )
        )
        return optax.chain(*parts), schedule
    parts.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts), schedule
