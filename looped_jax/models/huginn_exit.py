"""Per-iteration exit criteria of the recurrent-depth model (Geiping et al. 2025, Sec. 6), as the
reference implements them (seal-rg/recurrent-pretraining, ``raven_modeling_minimal.py``,
``get_adaptive_exit_evaluator``), and the adaptive loop that applies one of them.

One criterion at a time, selected by name; ``threshold=None`` takes the reference default:

    name               exit value after step k                              exits when    default
    entropy-diff       |H(p_k) - H(p_{k-1})|, H = -sum p log(p + 1e-10)     value < thr   1e-3
    latent-diff        ||s_k - s_{k-1}|| / ||s_k||                          value < thr   0.03
    kl                 KL(p_{k-1} || p_k)   (old || new)                    value < thr   1e-3
    minp-kl            KL of min-p filtered distributions (old || new)      value < thr   1e-5
    argmax-stability   consecutive steps with unchanged argmax              value >= thr  5
    cosine             1 - cos(s_k, s_{k-1})                                value < thr   1e-3

Start values, as the reference's ``init``: p_0 uniform (1/V), previous entropy 100, previous
argmax -1 with counter 0 (so the first possible exit for argmax-stability at threshold n is step
n + 1), previous latent s_0. "min-kl" is accepted as an alias of the reference's "minp-kl" (min-p
filter: probabilities below 0.1 * max are set to 1/V, then renormalised).

``min_steps`` is the reference's: no check (and no update of the criterion's state) while the
0-based step index is < min_steps, so the earliest exit is after min_steps + 1 steps;
``check_every`` is its ``check_criterion_every_n_steps``. ``per_sequence`` is the reference's
``reduce=True``: the latent criteria average over a row's tokens, the distribution criteria
read the last token; without it every token decides on its own (``reduce=False``).

Departures: the KL is `looped_jax.recurrence.kl_divergence` (same quantity as the reference's
``F.kl_div(new, old, log_target=True)``, accurate where it is small, float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from looped_jax.recurrence import kl_divergence

DEFAULT_THRESHOLDS: dict[str, float] = {
    "entropy-diff": 1e-3,
    "latent-diff": 0.03,
    "kl": 1e-3,
    "minp-kl": 1e-5,
    "argmax-stability": 5,
    "cosine": 1e-3,
}
EXIT_CRITERIA = tuple(DEFAULT_THRESHOLDS)
_ALIASES = {"min-kl": "minp-kl"}
_LATENT = ("latent-diff", "cosine")


class ExitRule(NamedTuple):
    """One exit criterion (see the module docstring). ``criterion="none"`` disables exits."""

    criterion: str = "latent-diff"
    threshold: float | None = None  # None: the reference default for the criterion
    min_steps: int = 0  # no check before 0-based step min_steps (earliest exit: min_steps + 1)
    check_every: int = 1
    per_sequence: bool = False

    @property
    def uses_logits(self) -> bool:
        return self.criterion not in _LATENT


def resolve_exit_rule(rule: ExitRule | None) -> ExitRule | None:
    """Validates ``rule``, resolves aliases and default thresholds; None / "none" -> None."""
    if rule is None:
        return None
    if not isinstance(rule, ExitRule):
        raise ValueError(f"exit_rule must be an ExitRule, got {type(rule).__name__}")
    name = _ALIASES.get(rule.criterion, rule.criterion)
    if name == "none":
        return None
    if name not in DEFAULT_THRESHOLDS:
        raise ValueError(f"ExitRule.criterion must be one of {EXIT_CRITERIA + ('none',)}, got {rule.criterion!r}")
    thr = DEFAULT_THRESHOLDS[name] if rule.threshold is None else rule.threshold
    if not (isinstance(thr, int | float) and thr >= 0 and math.isfinite(thr)):
        raise ValueError(f"ExitRule.threshold must be a finite number >= 0 or None, got {rule.threshold!r}")
    if name == "argmax-stability":
        if thr != int(thr):
            raise ValueError(f"ExitRule.threshold for argmax-stability must be an integer, got {thr!r}")
        thr = int(thr)
    else:
        thr = float(thr)
    if not isinstance(rule.min_steps, int) or rule.min_steps < 0:
        raise ValueError(f"ExitRule.min_steps must be an int >= 0, got {rule.min_steps!r}")
    if not isinstance(rule.check_every, int) or rule.check_every < 1:
        raise ValueError(f"ExitRule.check_every must be an int >= 1, got {rule.check_every!r}")
    return ExitRule(name, thr, rule.min_steps, rule.check_every, bool(rule.per_sequence))


def _entropy(logits_BTV):
    p = jax.nn.softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.sum(p * jnp.log(p + 1e-10), axis=-1)


def _minp_log_probs(logits_BTV):
    p = jax.nn.softmax(logits_BTV.astype(jnp.float32), axis=-1)
    vocab = p.shape[-1]
    p = jnp.where(p < 0.1 * jnp.max(p, axis=-1, keepdims=True), 1.0 / vocab, p)
    return jnp.log(p / jnp.sum(p, axis=-1, keepdims=True))


def init_exit_state(rule: ExitRule, s0_BTD: jax.Array, vocab_size: int) -> dict[str, jax.Array]:
    """The criterion's state before the first step (the reference's ``init``)."""
    tok = s0_BTD.shape[:-1]
    name = rule.criterion
    if name in _LATENT:
        return {"prev": s0_BTD.astype(jnp.float32)}
    if name == "entropy-diff":
        return {"prev": jnp.full(tok, 100.0, jnp.float32)}
    if name in ("kl", "minp-kl"):
        return {"prev": jnp.full(tok + (vocab_size,), -math.log(vocab_size), jnp.float32)}
    return {"prev": jnp.full(tok, -1, jnp.int32), "count": jnp.zeros(tok, jnp.int32)}


def exit_check(
    rule: ExitRule, state: dict[str, jax.Array], s_BTD: jax.Array, logits_BTV: jax.Array | None
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(exit, value, new state) after a step with latent ``s_BTD`` (and its readout ``logits_BTV``
    for the distribution criteria). ``exit``/``value`` are [B] with ``per_sequence``, else [B, T]."""
    name = rule.criterion
    s = s_BTD.astype(jnp.float32)
    if name == "latent-diff":
        value = jnp.linalg.norm(s - state["prev"], axis=-1) / jnp.linalg.norm(s, axis=-1)
        new = {"prev": s}
    elif name == "cosine":
        prev = state["prev"]
        cos = jnp.sum(s * prev, -1) / jnp.linalg.norm(s, axis=-1) / jnp.linalg.norm(prev, axis=-1)
        value, new = 1.0 - cos, {"prev": s}
    elif name == "entropy-diff":
        ent = _entropy(logits_BTV)
        value, new = jnp.abs(ent - state["prev"]), {"prev": ent}
    elif name in ("kl", "minp-kl"):
        logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), -1) if name == "kl" else _minp_log_probs(logits_BTV)
        value, new = kl_divergence(state["prev"], logp), {"prev": logp}
    else:  # argmax-stability
        am = jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)
        count = jnp.where(am == state["prev"], state["count"] + 1, 0)
        value, new = count, {"prev": am, "count": count}
    if rule.per_sequence:
        value = jnp.mean(value, axis=-1) if name in _LATENT else value[:, -1]
    exits = value >= rule.threshold if name == "argmax-stability" else value < rule.threshold
    return exits, value, new


class AdaptiveLoopResult(NamedTuple):
    out_s: jax.Array  # latent each element had when it exited (or at the last step)
    final_s: jax.Array  # latent after the last step run (== out_s when exited elements freeze)
    steps: jax.Array  # int32 [elements]: step at which each element exited (max_steps if never)
    exited: jax.Array  # bool [elements]
    num_iterations: jax.Array  # int32 scalar: steps the loop ran
    aux: Any


def adaptive_loop(
    step: Callable,
    readout: Callable | None,
    s0_BTD: jax.Array,
    rule: ExitRule,
    *,
    max_steps: int,
    vocab_size: int,
    freeze: bool,
    aux: Any = None,
) -> AdaptiveLoopResult:
    """Runs ``s, aux <- step(s, aux, index, active)`` until every element exited or ``max_steps``.

    Elements are rows (``rule.per_sequence``, or [B, 1] inputs) or tokens. ``active`` is the
    bool mask of elements that have not exited, or None when ``freeze`` is off: then every
    element keeps stepping until all have exited (the reference's batched generation), and an
    element's output is the latent it had when it exited. With ``freeze`` an exited element's
    latent stays as it was. ``readout(s) -> logits`` is needed by the distribution criteria.
    A ``while_loop`` (inference only); not the loop engine's `iterate_to_convergence`, whose
    criteria are conjunctions of latent change / KL / argmax with different start values.
    """
    if rule.uses_logits and readout is None:
        raise ValueError(f"exit criterion {rule.criterion!r} needs a readout")
    batch, length = s0_BTD.shape[0], s0_BTD.shape[1]
    elem_shape = (batch,) if rule.per_sequence else (batch, length)

    def to_tok(mask):  # element mask -> [B, T, 1]
        m = mask[:, None] if rule.per_sequence else mask
        return jnp.broadcast_to(m, (batch, length))[..., None]

    init = {
        "k": jnp.zeros((), jnp.int32),
        "s": s0_BTD,
        "out": s0_BTD,
        "steps": jnp.full(elem_shape, max_steps, jnp.int32),
        "exited": jnp.zeros(elem_shape, bool),
        "crit": init_exit_state(rule, s0_BTD, vocab_size),
        "aux": aux,
    }

    def cond(c):
        return (c["k"] < max_steps) & ~jnp.all(c["exited"])

    def body(c):
        k = c["k"]
        active = ~c["exited"]
        s_new, aux_new = step(c["s"], c["aux"], k, active if freeze else None)
        if freeze:
            s_new = jnp.where(to_tok(active), s_new, c["s"])
        checked = (k >= rule.min_steps) & ((k - rule.min_steps) % rule.check_every == 0)

        def check(crit):
            logits = readout(s_new) if rule.uses_logits else None
            exits, _, new = exit_check(rule, crit, s_new, logits)
            if freeze:  # an exited element's criterion state stays as it was
                new = jax.tree.map(
                    lambda n, o: jnp.where(active.reshape(active.shape + (1,) * (n.ndim - active.ndim)), n, o),
                    new,
                    crit,
                )
            return exits, new

        exits, crit = jax.lax.cond(checked, check, lambda crit: (jnp.zeros(elem_shape, bool), crit), c["crit"])
        new_exit = exits & active
        return {
            "k": k + 1,
            "s": s_new,
            "out": jnp.where(to_tok(new_exit), s_new, c["out"]),
            "steps": jnp.where(new_exit, k + 1, c["steps"]),
            "exited": c["exited"] | new_exit,
            "crit": crit,
            "aux": aux_new,
        }

    final = jax.lax.while_loop(cond, body, init)
    out_s = jnp.where(to_tok(final["exited"]), final["out"], final["s"])
    return AdaptiveLoopResult(out_s, final["s"], final["steps"], final["exited"], final["k"], final["aux"])
