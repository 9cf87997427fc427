"""What every model family gives the trainer: the one interface, written down.

The trainer (``train/trainer.py``) calls only these three methods; it never probes a
model for attributes or signatures:

* ``initial_carry(batch_size) -> pytree | None``: the persistent per-row training carry of a
  stateful family (HRM/TRM deep supervision, FAM state passing), arrays with a leading batch
  axis and static shapes; ``None`` for a stateless family. The trainer keeps it in its state,
  shards it like the batch and checkpoints it.
* ``loss(batch, *, rng, train=True, carry=None) -> LossOutput``: the training objective of one
  step; ``carry`` is the carry of the previous step (``None`` for a stateless family, or to start
  from ``initial_carry``) and ``LossOutput.carry`` the next one.
* ``evaluate(batch, *, num_loops=None, rng=None) -> dict``: *sums* over the batch that the
  trainer adds up across batches, at least ``loss_sum``, ``correct`` and ``num_tokens`` (the
  trainer reports loss = loss_sum / num_tokens and accuracy = correct / num_tokens).
  ``num_loops`` (a traced int32 or None for the family's default) sets the test-time depth.

Optional, for the trainer's latent-prediction objective (``cfg.latent``, `looped_jax.train.latent`):

* ``hidden_states(inputs_BT, *, positions_BT=None, segment_ids_BT=None, num_loops=None, rng=None)
  -> [S, B, T, D]``: the states the targets are built from, last = the state the head reads
  (layer outputs of a transformer, loop states of a looped model; ``num_loops`` a Python int).
  Families with it: ``looped`` (and its unshared baseline), ``recurrent_depth``.

`TokenModel` gives the common stateless implementation of ``initial_carry`` and ``evaluate``
(weighted next-token cross-entropy of ``__call__``'s logits).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax

from looped_jax.losses import cross_entropy

EVAL_SUM_KEYS = ("loss_sum", "correct", "num_tokens")


class LossOutput(NamedTuple):
    """One training step's objective, its metrics (scalars) and the next carry (None if stateless)."""

    loss: jax.Array
    metrics: dict
    carry: Any = None


@runtime_checkable
class Model(Protocol):
    """The interface every family implements (see the module docstring)."""

    def initial_carry(self, batch_size: int) -> Any: ...

    def loss(self, batch: dict, *, rng: jax.Array | None, train: bool = True, carry: Any = None) -> LossOutput: ...

    def evaluate(self, batch: dict, *, num_loops: Any = None, rng: jax.Array | None = None) -> dict: ...


def token_eval_sums(logits_BTV: jax.Array, batch: dict) -> dict:
    """Summed weighted cross-entropy, correct tokens and token count of one batch."""
    _, m = cross_entropy(logits_BTV, batch["targets"], batch["weights"])
    n = m["num_tokens"]
    return {"loss_sum": m["loss"] * n, "correct": m["accuracy"] * n, "num_tokens": n}


class TokenModel:
    """Mixin for stateless families scored by next-token cross-entropy of ``__call__``'s logits."""

    def initial_carry(self, batch_size: int) -> None:
        del batch_size
        return None

    def evaluate(self, batch: dict, *, num_loops: Any = None, rng: jax.Array | None = None) -> dict:
        kwargs = {} if num_loops is None else {"num_loops": num_loops}
        logits_BTV = self(  # type: ignore[operator]
            batch["inputs"],
            positions_BT=batch.get("positions"),
            segment_ids_BT=batch.get("segment_ids"),
            rng=rng,
            **kwargs,
        )
        return token_eval_sums(logits_BTV, batch)


def check_model(model: Any) -> None:
    """Raises a TypeError naming the methods a family is missing."""
    missing = [m for m in ("initial_carry", "loss", "evaluate") if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(f"{type(model).__name__} does not implement the model interface: missing {missing}")
