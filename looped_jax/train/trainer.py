"""The trainer: a jitted, sharded train step over pure parameter pytrees, a data pipeline
with resumable state, periodic evaluation, metrics and orbax checkpoints.

Every family goes through this code, and the trainer calls only the model interface of
``looped_jax.models.protocol``: ``initial_carry(batch_size)``, ``loss(batch, *, rng, train,
carry) -> LossOutput`` and ``evaluate(batch, *, num_loops, rng) -> sums``.

Stateful training (HRM/TRM deep supervision, FAM state passing): a family whose
``initial_carry`` is not None gets a persistent carry kept in ``TrainState.carry`` (sharded over
the batch like the data, checkpointed with the state) and handed to the next step's ``loss``.
With ``optim.ema_decay > 0`` the state also holds an EMA of the parameters, which evaluation uses.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from looped_jax import sharding as shd
from looped_jax.checkpoint import Checkpointer
from looped_jax.config import ExperimentConfig, to_dict
from looped_jax.models import build_model
from looped_jax.models.protocol import EVAL_SUM_KEYS, check_model
from looped_jax.train.metrics import MetricsLogger
from looped_jax.train.optimizer import make_optimizer

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def optimizer_state_specs(abstract_opt, abstract_params, param_specs):
    """PartitionSpecs of an optimizer state: a leaf whose key path ends with a parameter's path
    and has that parameter's shape (Adam moments, EMAs, the masked halves of a multi_transform)
    is sharded like the parameter; everything else (counts, scalars) is replicated."""
    by_path = {}
    for path, spec in jax.tree_util.tree_leaves_with_path(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)):
        by_path[tuple(path)] = spec
    shapes = {tuple(path): x.shape for path, x in jax.tree_util.tree_leaves_with_path(abstract_params)}

    def spec_of(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            suffix = path[start:]
            if suffix in by_path and shapes.get(suffix) == getattr(leaf, "shape", None):
                return by_path[suffix]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_of, abstract_opt)


def summarize_eval(totals: dict[str, float]) -> dict[str, float]:
    """Loss and accuracy per token from the summed ``evaluate`` outputs; extra sums are kept, and
    ``exact_sum`` / ``num_rows`` (whole-answer accuracy, reasoners) become ``exact_accuracy``."""
    n = max(totals.get("num_tokens", 0.0), 1.0)
    out = {k: v for k, v in totals.items() if k not in ("loss_sum", "correct")}
    out.update(loss=totals.get("loss_sum", 0.0) / n, accuracy=totals.get("correct", 0.0) / n)
    out["num_tokens"] = totals.get("num_tokens", 0.0)
    if "exact_sum" in totals and "num_rows" in totals:
        out["exact_accuracy"] = totals["exact_sum"] / max(totals["num_rows"], 1.0)
    return out


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: number of optimizer steps taken
    params: Any  # pure nested dict of float32 arrays
    opt_state: Any
    carry: Any = None  # the model's persistent per-row training carry (see module docstring)
    ema_params: Any = None  # EMA of params when optim.ema_decay > 0

    @property
    def eval_params(self):
        """The weights evaluation and export use: the EMA when one is kept."""
        return self.params if self.ema_params is None else self.ema_params


class Trainer:
    """Builds the model, mesh, optimizer and jitted steps for one ``ExperimentConfig``."""

    def __init__(self, cfg: ExperimentConfig, *, mesh: jax.sharding.Mesh | None = None, log: bool = True):
        self.cfg = cfg
        self.mesh = mesh if mesh is not None else shd.make_mesh(cfg.mesh)
        self.tx, self.schedule = make_optimizer(cfg.optim, cfg.train.num_steps)
        self.base_key = jax.random.key(cfg.train.seed)
        abstract_model = nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(cfg.train.seed)))
        self.graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
        if jax.tree.leaves(abstract_rest):
            raise ValueError("models must keep all their state in nnx.Param variables")
        check_model(abstract_model)
        param_specs = shd.pure_param_specs(abstract_params, self.mesh)
        abstract_opt = jax.eval_shape(self.tx.init, nnx.to_pure_dict(abstract_params))
        opt_specs = optimizer_state_specs(abstract_opt, nnx.to_pure_dict(abstract_params), param_specs)
        abstract_carry = jax.eval_shape(lambda: abstract_model.initial_carry(cfg.train.global_batch_size))
        self.stateful = abstract_carry is not None
        carry_specs = None
        if self.stateful:
            carry_specs = jax.tree.map(
                lambda x: shd.batch_spec(self.mesh, x.ndim) if x.ndim else PartitionSpec(), abstract_carry
            )
        ema_specs = param_specs if cfg.optim.ema_decay > 0 else None
        self.state_specs = TrainState(PartitionSpec(), param_specs, opt_specs, carry_specs, ema_specs)
        self.state_shardings = shd.named(self.mesh, self.state_specs)
        # Leading (batch) axis split over data x fsdp; valid for batch fields of any rank.
        self.batch_sharding = NamedSharding(self.mesh, shd.batch_spec(self.mesh, 1))
        self.logger = MetricsLogger(cfg.train.output_dir) if log else None
        from looped_jax.data import vocab_size

        data_vocab = vocab_size(cfg.data)
        if cfg.model.vocab_size < data_vocab:
            raise ValueError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of data "
                f"{cfg.data.name!r} ({data_vocab} tokens); set --config.model.vocab_size={data_vocab}"
            )
        dp = shd.data_parallel_size(self.mesh)
        if cfg.train.global_batch_size % dp:
            raise ValueError(
                f"train.global_batch_size={cfg.train.global_batch_size} must be divisible by the "
                f"data-parallel size data*fsdp={dp}"
            )
        self.train_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_shardings.params, self.batch_sharding, None))

    # -- pure functions ------------------------------------------------------------------------

    def model(self, params) -> nnx.Module:
        return nnx.merge(self.graphdef, params)

    def _init(self) -> TrainState:
        model = build_model(self.cfg.model, rngs=nnx.Rngs(self.cfg.train.seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        carry = model.initial_carry(self.cfg.train.global_batch_size)
        ema = jax.tree.map(jnp.copy, params) if self.cfg.optim.ema_decay > 0 else None
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params), carry, ema)

    def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(self.base_key, state.step)

        def loss_fn(params):
            out = self.model(params).loss(batch, rng=rng, train=True, carry=state.carry)
            return out.loss, (out.metrics, out.carry)

        (_, (metrics, carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            decay = self.cfg.optim.ema_decay
            ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads), learning_rate=self.schedule(state.step))
        return TrainState(state.step + 1, params, opt_state, carry, ema), metrics

    def _eval_step(self, params, batch: dict, num_loops) -> dict:
        sums = self.model(params).evaluate(batch, num_loops=num_loops, rng=jax.random.key(0))
        missing = [k for k in EVAL_SUM_KEYS if k not in sums]
        if missing:
            raise ValueError(f"{type(self.model(params)).__name__}.evaluate must return the sums {list(EVAL_SUM_KEYS)}")
        return sums

    # -- host-side loop -----------------------------------------------------------------------

    def init_state(self) -> TrainState:
        with jax.set_mesh(self.mesh):
            return jax.jit(self._init, out_shardings=self.state_shardings)()

    def abstract_state(self) -> TrainState:
        with jax.set_mesh(self.mesh):
            shapes = jax.eval_shape(self._init)
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings
        )

    def global_batch(self, batch: dict) -> dict:
        """Lays this host's slice of the batch out on the mesh as global arrays (every field of it)."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch is missing fields {missing}; every batch needs {list(BATCH_KEYS)}")
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v)) for k, v in batch.items()}

    def make_train_iterator(self):
        from looped_jax.data import make_pipeline

        return make_pipeline(
            self.cfg.data,
            split="train",
            global_batch_size=self.cfg.train.global_batch_size,
            seed=self.cfg.train.seed,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )

    def evaluate(self, params, split: str, *, num_batches: int | None = None, num_loops=None, batch_size=None) -> dict:
        """Token loss / accuracy over (the first ``num_batches`` batches of) a split."""
        from looped_jax.data import make_pipeline

        it = make_pipeline(
            self.cfg.data,
            split=split,
            global_batch_size=batch_size or self.cfg.train.global_batch_size,
            seed=0,
            shuffle=False,
            num_epochs=1,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )
        totals: dict[str, float] = {}
        loops = None if num_loops is None else jnp.int32(num_loops)
        with jax.set_mesh(self.mesh):
            for i, batch in enumerate(it):
                if num_batches is not None and i >= num_batches:
                    break
                out = jax.device_get(self.eval_step(params, self.global_batch(batch), loops))
                for k, v in out.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
        return summarize_eval(totals)

    def fit(self, *, eval_splits: tuple[str, ...] = (), stop_at: int | None = None) -> tuple[TrainState, dict]:
        """Trains to ``train.num_steps``, resuming from the latest checkpoint if there is one.

        ``stop_at`` ends the run early (after a checkpoint) as if it had been interrupted there.
        ``train.max_minutes > 0`` is a wall-clock budget for this call (compilation included): the
        first step to end past it is the last, and is logged and checkpointed like a final step.
        The history holds ``steps`` (the step reached), ``stopped_by`` (None, "stop_at" or
        "max_minutes"), ``train_seconds``, the last logged ``train`` metrics and the ``eval`` results.
        """
        cfg = self.cfg
        out_dir = Path(cfg.train.output_dir).expanduser()
        ckpt = None
        if cfg.checkpoint.enabled:
            ckpt = Checkpointer(
                out_dir / "checkpoints",
                keep=cfg.checkpoint.keep,
                save_every=cfg.checkpoint.save_every,
                async_save=cfg.checkpoint.async_save,
            )
        config_dict = to_dict(cfg)
        t_start = time.perf_counter()
        budget_s = 60.0 * cfg.train.max_minutes
        it = self.make_train_iterator()
        if ckpt is not None and cfg.checkpoint.resume and ckpt.latest_step() is not None:
            state, data_state, step = ckpt.restore(self.abstract_state(), config=config_dict)
            if data_state is not None:
                it.set_state(data_state)
            self._print(f"resumed from step {step} in {ckpt.directory}")
        else:
            state = self.init_state()
        start = int(state.step)
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        last_time, last_step = time.perf_counter(), start
        history: dict = {"stopped_by": None}
        metrics = None
        with jax.set_mesh(self.mesh):
            end = cfg.train.num_steps if stop_at is None else min(stop_at, cfg.train.num_steps)
            for step in range(start, end):
                state, metrics = self.train_step(state, self.global_batch(next(it)))
                done = step + 1
                # The budget is checked on finished steps (not just dispatched ones), so the step
                # reached is the one whose result exists when time runs out.
                out_of_time = budget_s > 0 and self._seconds_since(t_start, state.step) >= budget_s
                if done % cfg.train.log_every == 0 or done == cfg.train.num_steps or out_of_time:
                    metrics = jax.device_get(metrics)
                    now = time.perf_counter()
                    rate = (done - last_step) / max(now - last_time, 1e-9)
                    last_time, last_step = now, done
                    self._log(done, dict(metrics, steps_per_s=rate, tokens_per_s=rate * tokens_per_step))
                if ckpt is not None and ckpt.should_save(done):
                    ckpt.save(done, state, config=config_dict, data_state=it.get_state())
                if out_of_time:
                    history["stopped_by"] = "max_minutes"
                    self._print(f"train.max_minutes={cfg.train.max_minutes:g} reached: stopping at step {done}")
                    break
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < cfg.train.num_steps:
                    self._run_evals(state, done, eval_splits)
            if history["stopped_by"] is None and int(state.step) < cfg.train.num_steps:
                history["stopped_by"] = "stop_at"
            if ckpt is not None and int(state.step) > start and ckpt.latest_step() != int(state.step):
                ckpt.save(int(state.step), state, config=config_dict, data_state=it.get_state())
            history["steps"] = int(state.step)
            history["train_seconds"] = time.perf_counter() - t_start
            history["eval"] = self._run_evals(state, int(state.step), eval_splits)
        if ckpt is not None:
            ckpt.close()
        history["train"] = None if metrics is None else {k: float(v) for k, v in jax.device_get(metrics).items()}
        return state, history

    @staticmethod
    def _seconds_since(t_start: float, step: jax.Array) -> float:
        """Wall-clock seconds since ``t_start`` once ``step`` (an output of the last train step) is computed."""
        jax.block_until_ready(step)
        return time.perf_counter() - t_start

    def _run_evals(self, state: TrainState, step: int, splits: tuple[str, ...]) -> dict:
        results = {}
        for split in splits:
            results[split] = self.evaluate(state.eval_params, split, num_batches=self.cfg.train.eval_batches)
            self._log(step, results[split], prefix=f"eval/{split}")
        return results

    def _log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if self.logger is not None:
            self.logger.write(step, metrics, prefix=prefix)

    def _print(self, msg: str) -> None:
        if self.logger is not None:
            print(msg, flush=True)
