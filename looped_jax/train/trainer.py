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

import os
import signal
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from looped_jax import sharding as shd
from looped_jax.checkpoint import Checkpointer, CheckpointError, as_path
from looped_jax.config import ExperimentConfig, to_dict
from looped_jax.models import build_model
from looped_jax.models.protocol import EVAL_SUM_KEYS, check_model
from looped_jax.train.adam_atan2 import puzzle_labels
from looped_jax.train.latent import LATENT_KEY, Predictor, latent_loss, model_params, tau_at, teacher_update
from looped_jax.train.metrics import MetricsLogger
from looped_jax.train.optimizer import make_optimizer

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
# What went bad in a non-finite step (the guard's ``bad_code``).
NONFINITE_METRICS = {1: "loss", 2: "grad_norm", 3: "params"}
# Exit status of a run that stopped cleanly on SIGTERM/SIGINT after saving (EX_TEMPFAIL: run it again).
EXIT_PREEMPTED = 75


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient norm or parameters (``train.nonfinite_policy``)."""


def init_guard() -> dict:
    """The non-finite guard's state, carried through the jitted step (int32 scalars)."""
    # One buffer per entry: the guard is donated to the step, and a buffer cannot be donated twice.
    return {k: jnp.zeros((), jnp.int32) for k in ("halted", "bad_step", "bad_code", "consecutive", "skipped")}


class _Signals:
    """SIGTERM/SIGINT: the first asks the loop to stop after the current step; a second exits at once."""

    def __init__(self, log):
        self.received: int | None = None
        self.log = log
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            os.write(2, f"second {signal.Signals(signum).name}: exiting now without saving\n".encode())
            os._exit(128 + signum)
        self.received = signum
        os.write(2, f"{signal.Signals(signum).name}: finishing this step, saving, then exiting\n".encode())

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


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


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """decay * ema + (1 - decay) * params, except the sparse ``puzzle_emb`` table, which is copied: TRM's
    EMAHelper averages parameters only, and its puzzle table is a sign-SGD-trained buffer."""
    labels = puzzle_labels(params)
    return jax.tree.map(lambda lab, e, p: p if lab == "puzzle" else decay * e + (1.0 - decay) * p, labels, ema, params)


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: number of optimizer steps taken
    params: Any  # pure nested dict of float32 arrays
    opt_state: Any
    carry: Any = None  # the model's persistent per-row training carry (see module docstring)
    ema_params: Any = None  # EMA of params when optim.ema_decay > 0
    teacher_params: Any = None  # the latent-prediction teacher (EMA of the model) when latent.weight > 0

    @property
    def eval_params(self):
        """The weights evaluation and export use: the EMA when one is kept (without the
        latent-prediction predictor, which is a training device only)."""
        return model_params(self.params if self.ema_params is None else self.ema_params)


class Trainer:
    """Builds the model, mesh, optimizer and jitted steps for one ``ExperimentConfig``."""

    def __init__(self, cfg: ExperimentConfig, *, mesh: jax.sharding.Mesh | None = None, log: bool = True):
        self.cfg = cfg
        if cfg.train.mean_loops_ramp_steps > 0 and not hasattr(cfg.model, "mean_loops"):
            raise ValueError(f"train.mean_loops_ramp_steps needs a model with mean_loops; {cfg.model.name!r} has none")
        self.mesh = mesh if mesh is not None else shd.make_mesh(cfg.mesh)
        self.tx, self.schedule = make_optimizer(cfg.optim, cfg.train.num_steps)
        self.base_key = jax.random.key(cfg.train.seed)
        abstract_model = nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(cfg.train.seed)))
        self.graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
        if jax.tree.leaves(abstract_rest):
            raise ValueError("models must keep all their state in nnx.Param variables")
        check_model(abstract_model)
        param_specs = shd.pure_param_specs(abstract_params, self.mesh)
        pure_abstract = nnx.to_pure_dict(abstract_params)
        self.latent = cfg.latent.weight > 0
        teacher_specs = None
        if self.latent:
            if not callable(getattr(abstract_model, "hidden_states", None)):
                raise ValueError(
                    f"latent.weight={cfg.latent.weight} needs a model that exposes hidden_states; "
                    f"{type(abstract_model).__name__} (model.name={cfg.model.name!r}) does not "
                    "(families that do: looped, recurrent_depth)"
                )
            abstract_pred = nnx.eval_shape(lambda: self._make_predictor(nnx.Rngs(0)))
            self.predictor_graphdef, pred_state = nnx.split(abstract_pred, nnx.Param)
            teacher_specs = param_specs
            param_specs = {**param_specs, LATENT_KEY: shd.pure_param_specs(pred_state, self.mesh)}
            pure_abstract = {**pure_abstract, LATENT_KEY: nnx.to_pure_dict(pred_state)}
        abstract_opt = jax.eval_shape(self.tx.init, pure_abstract)
        opt_specs = optimizer_state_specs(abstract_opt, pure_abstract, param_specs)
        abstract_carry = jax.eval_shape(lambda: abstract_model.initial_carry(cfg.train.global_batch_size))
        self.stateful = abstract_carry is not None
        carry_specs = None
        if self.stateful:
            carry_specs = jax.tree.map(
                lambda x: shd.batch_spec(self.mesh, x.ndim) if x.ndim else PartitionSpec(), abstract_carry
            )
        ema_specs = param_specs if cfg.optim.ema_decay > 0 else None
        self.state_specs = TrainState(PartitionSpec(), param_specs, opt_specs, carry_specs, ema_specs, teacher_specs)
        self.state_shardings = shd.named(self.mesh, self.state_specs)
        # Leading (batch) axis split over data x fsdp; valid for batch fields of any rank.
        self.batch_sharding = NamedSharding(self.mesh, shd.batch_spec(self.mesh, 1))
        # Only process 0 writes metrics and prints (every process runs the same steps).
        self.logger = MetricsLogger(cfg.train.output_dir) if log and jax.process_index() == 0 else None
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
        self.guarded_step = jax.jit(
            self._guarded_step,
            in_shardings=(self.state_shardings, self.batch_sharding, None, None),
            out_shardings=(self.state_shardings, None, None),
            donate_argnums=(0, 2),
        )
        self.eval_step = jax.jit(
            self._eval_step, in_shardings=(model_params(self.state_shardings.params), self.batch_sharding, None)
        )

    # -- pure functions ------------------------------------------------------------------------

    def model(self, params) -> nnx.Module:
        """The model with ``params`` (a train state's params, or the model's alone)."""
        return nnx.merge(self.graphdef, model_params(params))

    def _make_predictor(self, rngs: nnx.Rngs) -> Predictor:
        d = self.cfg.model.d_model
        return Predictor(d, self.cfg.latent.predictor_hidden or 2 * d, rngs=rngs)

    def _init(self, params=None) -> TrainState:
        model = build_model(self.cfg.model, rngs=nnx.Rngs(self.cfg.train.seed))
        if params is None:
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        carry = model.initial_carry(self.cfg.train.global_batch_size)
        teacher = None
        if self.latent:
            teacher = jax.tree.map(jnp.copy, params)
            predictor = self._make_predictor(nnx.Rngs(self.cfg.train.seed + 1))
            params = {**params, LATENT_KEY: nnx.to_pure_dict(nnx.state(predictor, nnx.Param))}
        ema = jax.tree.map(jnp.copy, params) if self.cfg.optim.ema_decay > 0 else None
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params), carry, ema, teacher)

    def _train_step(self, state: TrainState, batch: dict, lr_scale=None) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(self.base_key, state.step)

        extra = {}
        ramp = self.cfg.train.mean_loops_ramp_steps
        if ramp > 0:  # recurrence curriculum: a linear ramp of the mean loop count (traced, one compile)
            start, target = self.cfg.train.mean_loops_ramp_start, float(self.cfg.model.mean_loops)
            extra["mean_loops"] = start + (target - start) * jnp.minimum(state.step.astype(jnp.float32) / ramp, 1.0)

        def loss_fn(params):
            model = self.model(params)
            out = model.loss(batch, rng=rng, train=True, carry=state.carry, **extra)
            loss, metrics = out.loss, out.metrics
            if self.latent:
                predictor = nnx.merge(self.predictor_graphdef, params[LATENT_KEY])
                lat, lat_metrics = latent_loss(
                    model,
                    self.model(state.teacher_params),
                    predictor,
                    batch,
                    jax.random.fold_in(rng, 0x1A7E),
                    self.cfg.latent,
                )
                metrics = dict(metrics, **lat_metrics, family_loss=loss)
                loss = loss + self.cfg.latent.weight * lat
                metrics["loss"] = loss
            return loss, (metrics, out.carry)

        (_, (metrics, carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        if lr_scale is not None:
            updates = jax.tree.map(lambda u: (u * lr_scale).astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            decay = self.cfg.optim.ema_decay
            ema = ema_update(ema, params, decay)
        teacher = state.teacher_params
        if teacher is not None:
            tau = tau_at(state.step, self.cfg.latent, self.cfg.train.num_steps)
            teacher = teacher_update(teacher, params, tau)
            metrics = dict(metrics, teacher_tau=tau)
        metrics = dict(
            metrics,
            grad_norm=optax.global_norm(grads),
            learning_rate=self.schedule(state.step) * (1.0 if lr_scale is None else lr_scale),
        )
        return TrainState(state.step + 1, params, opt_state, carry, ema, teacher), metrics

    def _guarded_step(self, state: TrainState, batch: dict, guard: dict, lr_scale) -> tuple[TrainState, dict, dict]:
        """`_train_step` with the non-finite guard of ``train.nonfinite_policy``, all on device.

        A step whose loss, gradient norm or new parameters are not finite never reaches the state:
        under "skip" the update is dropped (the step counts, the data moves on); under "stop" and
        "rollback" (or after ``max_consecutive_skips`` skips in a row) the guard halts and every
        later step leaves the state as it is, until the host sees ``halted`` at its next check.
        ``lr_scale`` multiplies the updates (rollback lowers it; the same as scaling the learning
        rate for AdamW, whose decay is applied before the learning rate).
        """
        tcfg = self.cfg.train
        new, metrics = self._train_step(state, batch, lr_scale=lr_scale)
        leaves = [x for x in jax.tree.leaves(new.params) if jnp.issubdtype(x.dtype, jnp.floating)]
        params_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
        loss_ok, grad_ok = jnp.isfinite(metrics["loss"]), jnp.isfinite(metrics["grad_norm"])
        ok = loss_ok & grad_ok & params_ok
        code = jnp.where(~loss_ok, 1, jnp.where(~grad_ok, 2, jnp.where(~params_ok, 3, 0))).astype(jnp.int32)
        halted = guard["halted"] > 0
        bad = ~ok & ~halted
        consecutive = jnp.where(bad, guard["consecutive"] + 1, jnp.where(halted, guard["consecutive"], 0))
        if tcfg.nonfinite_policy == "skip":
            halt_now = bad & (consecutive >= tcfg.max_consecutive_skips)
            skipped_state = state._replace(step=state.step + 1)
        else:
            halt_now = bad
            skipped_state = state
        keep_old = halted | halt_now
        pick = lambda a, b, c: jax.tree.map(lambda x, y, z: jnp.where(keep_old, x, jnp.where(ok, z, y)), a, b, c)
        out = TrainState(*(pick(o, k, n) for o, k, n in zip(state, skipped_state, new, strict=True)))
        guard = {
            "halted": (halted | halt_now).astype(jnp.int32),
            "bad_step": jnp.where(bad, state.step + 1, guard["bad_step"]).astype(jnp.int32),
            "bad_code": jnp.where(bad, code, guard["bad_code"]).astype(jnp.int32),
            "consecutive": consecutive.astype(jnp.int32),
            "skipped": guard["skipped"] + bad.astype(jnp.int32),
        }
        return out, dict(metrics, nonfinite=(~ok).astype(jnp.int32)), guard

    def _eval_step(self, params, batch: dict, num_loops) -> dict:
        sums = self.model(params).evaluate(batch, num_loops=num_loops, rng=jax.random.key(0))
        missing = [k for k in EVAL_SUM_KEYS if k not in sums]
        if missing:
            raise ValueError(f"{type(self.model(params)).__name__}.evaluate must return the sums {list(EVAL_SUM_KEYS)}")
        return sums

    # -- host-side loop -----------------------------------------------------------------------

    def init_state(self) -> TrainState:
        """Step 0: parameters from the seed, or from ``train.init_params_from`` when set."""
        with jax.set_mesh(self.mesh):
            if self.cfg.train.init_params_from:
                params = self.load_init_params(self.cfg.train.init_params_from)
                return jax.jit(self._init, out_shardings=self.state_shardings)(params)
            return jax.jit(self._init, out_shardings=self.state_shardings)()

    def load_init_params(self, path: str) -> dict:
        """Parameters of a params-only export (``model.safetensors`` + manifest), checked against ``model``."""
        from looped_jax.export.params import load_params_safetensors

        saved_cfg, params = load_params_safetensors(path)
        ours, theirs = to_dict(self.cfg.model), to_dict(saved_cfg)
        diff = [
            f"model.{k}: export has {theirs.get(k)!r}, config has {v!r}" for k, v in ours.items() if theirs.get(k) != v
        ]
        if diff:
            raise ValueError(f"train.init_params_from={path!r} holds another model: " + "; ".join(diff[:6]))
        self._print(f"initial parameters from {path}")
        want = jax.eval_shape(self._init).params
        return jax.tree.map(lambda p, w: jnp.asarray(p, w.dtype), params, want)

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
                out = jax.device_get(self.eval_step(model_params(params), self.global_batch(batch), loops))
                for k, v in out.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
        return summarize_eval(totals)

    def fit(self, *, eval_splits: tuple[str, ...] = (), stop_at: int | None = None) -> tuple[TrainState, dict]:
        """Trains to ``train.num_steps``, resuming from the newest good checkpoint if there is one.

        ``stop_at`` ends the run early (after a checkpoint) as if it had been interrupted there.
        ``train.max_minutes > 0`` is a wall-clock budget for this call (compilation included): the
        first step to end past it is the last, and is logged and checkpointed like a final step.
        SIGTERM/SIGINT finish the current step, save it and stop (``stopped_by="signal"``); a second
        signal exits at once. A non-finite step is handled by ``train.nonfinite_policy`` (stop and
        exhausted skip/rollback raise `NonFiniteError` naming the step and metric).
        The history holds ``steps`` (the step reached), ``stopped_by`` (None, "stop_at",
        "max_minutes", "signal" or "already_done"), ``train_seconds``, ``step_seconds`` (train steps
        only: no compile, saves or evals), ``skipped`` and ``rollbacks``, the last logged ``train``
        metrics and the ``eval`` results.
        """
        cfg, tcfg = self.cfg, self.cfg.train
        out_dir = as_path(tcfg.output_dir)
        ckpt = None
        if cfg.checkpoint.enabled:
            ckpt = Checkpointer(
                out_dir / "checkpoints",
                keep=cfg.checkpoint.keep,
                save_every=cfg.checkpoint.save_every,
                async_save=cfg.checkpoint.async_save,
                log=self._print,
            )
        try:
            return self._fit(ckpt, out_dir, eval_splits, stop_at)
        finally:
            if ckpt is not None:
                ckpt.close()
            if self.logger is not None:
                self.logger.flush()

    def _restore_or_init(self, ckpt, config_dict, it) -> TrainState:
        cfg = self.cfg
        if ckpt is not None and not cfg.checkpoint.resume and ckpt.all_steps():
            if not cfg.train.overwrite:
                raise CheckpointError(
                    f"checkpoint.resume=false but {ckpt.directory} already has checkpoints at steps "
                    f"{ckpt.all_steps()}; resume (checkpoint.resume=true), use a fresh train.output_dir, "
                    "or set train.overwrite=true to delete them"
                )
            self._print(f"train.overwrite=true: deleting checkpoints {ckpt.delete_all()} in {ckpt.directory}")
        if ckpt is not None and cfg.checkpoint.resume and ckpt.all_steps():
            state, data_state, step = ckpt.restore(
                self.abstract_state(), config=config_dict, allow_batch_change=cfg.train.allow_batch_change
            )
            if step > cfg.train.num_steps:
                raise CheckpointError(
                    f"the checkpoint in {ckpt.directory} is at step {step}, past train.num_steps="
                    f"{cfg.train.num_steps}; raise train.num_steps or use a fresh train.output_dir"
                )
            if data_state is not None:
                it.set_state(data_state)
            self._print(f"resumed from step {step} in {ckpt.directory}")
            return state
        return self.init_state()

    def _fit(self, ckpt, out_dir, eval_splits, stop_at) -> tuple[TrainState, dict]:
        cfg, tcfg = self.cfg, self.cfg.train
        config_dict = to_dict(cfg)
        t_start = time.perf_counter()
        budget_s = 60.0 * tcfg.max_minutes
        it = self.make_train_iterator()
        state = self._restore_or_init(ckpt, config_dict, it)
        start = int(state.step)
        if self.logger is not None:
            self.logger.truncate_after(start)  # rows of steps this run will redo are replaced
        tokens_per_step = tcfg.global_batch_size * cfg.data.seq_len
        history: dict = {"stopped_by": None, "skipped": 0, "rollbacks": 0}
        if start >= tcfg.num_steps:
            self._print(f"the checkpoint is at step {start} = train.num_steps: nothing to train")
            history["stopped_by"] = "already_done"
        metrics = None
        guard = init_guard()
        lr_scale = jnp.float32(1.0)
        step_seconds, excluded = 0.0, 0.0
        compiled = False
        profiling = False
        end = tcfg.num_steps if stop_at is None else min(stop_at, tcfg.num_steps)
        last_time, last_step = time.perf_counter(), start
        with jax.set_mesh(self.mesh), _Signals(self._print) as signals:
            step = start
            while step < end:
                if step == tcfg.profile_start and not profiling:
                    jax.profiler.start_trace(str(out_dir / "profile"))
                    profiling = True
                state, metrics, guard = self.guarded_step(state, self.global_batch(next(it)), guard, lr_scale)
                done = step = step + 1
                if not compiled:  # the first step of a call compiles: keep it out of the step rate
                    jax.block_until_ready(state.step)
                    compiled = True
                    now = time.perf_counter()
                    self._print(f"first step (compile included) took {now - t_start:.1f} s")
                    last_time, last_step = now, done
                if profiling and done >= tcfg.profile_stop:
                    jax.block_until_ready(state.step)
                    jax.profiler.stop_trace()
                    profiling = False
                    self._print(f"profile of steps {tcfg.profile_start}..{tcfg.profile_stop} in {out_dir / 'profile'}")
                out_of_time = budget_s > 0 and self._seconds_since(t_start, state.step) >= budget_s
                stop_signal = self._signal_agreed(signals, ckpt, done, done % tcfg.log_every == 0)
                log_now = done % tcfg.log_every == 0 or done == tcfg.num_steps or out_of_time or stop_signal
                save_now = ckpt is not None and ckpt.should_save(done)
                if log_now or save_now or done == end:
                    restored = self._check_guard(guard, ckpt, it, history)
                    if restored is not None:  # rollback: continue from the last good checkpoint
                        state, lr_scale = restored, lr_scale * tcfg.rollback_lr_factor
                        guard = init_guard()
                        step = int(state.step)
                        last_time, last_step, excluded = time.perf_counter(), step, 0.0
                        continue
                if log_now:
                    metrics = jax.device_get(metrics)
                    now = time.perf_counter()
                    window = max(now - last_time - excluded, 1e-9)
                    if done > last_step:
                        step_seconds += window
                    rate = (done - last_step) / window
                    last_time, last_step, excluded = now, done, 0.0
                    extra = {"skipped": history["skipped"]} if tcfg.nonfinite_policy == "skip" else {}
                    self._log(
                        done,
                        dict(metrics, **extra, steps_per_s=rate, tokens_per_s=rate * tokens_per_step),
                        total=tcfg.num_steps,
                    )
                if save_now:
                    t0 = time.perf_counter()
                    ckpt.save(done, state, config=config_dict, data_state=it.get_state())
                    excluded += time.perf_counter() - t0
                if out_of_time:
                    history["stopped_by"] = "max_minutes"
                    self._print(f"train.max_minutes={tcfg.max_minutes:g} reached: stopping at step {done}")
                    break
                if stop_signal:
                    history["stopped_by"] = "signal"
                    history["signal"] = signal.Signals(signals.received or signal.SIGTERM).name
                    self._print(f"{history['signal']}: stopping at step {done}")
                    break
                if tcfg.eval_every and done % tcfg.eval_every == 0 and done < tcfg.num_steps:
                    t0 = time.perf_counter()
                    self._run_evals(state, done, eval_splits)
                    excluded += time.perf_counter() - t0
            if profiling:
                jax.profiler.stop_trace()
            if int(state.step) > start:
                self._check_guard(guard, ckpt, it, history, final=True)
            if history["stopped_by"] is None and int(state.step) < tcfg.num_steps:
                history["stopped_by"] = "stop_at"
            if ckpt is not None and int(state.step) > start and ckpt.latest_step() != int(state.step):
                ckpt.save(int(state.step), state, config=config_dict, data_state=it.get_state())
            if ckpt is not None:
                ckpt.wait()
            history["steps"] = int(state.step)
            history["train_seconds"] = time.perf_counter() - t_start
            history["step_seconds"] = step_seconds
            history["eval"] = self._run_evals(state, int(state.step), eval_splits)
        history["train"] = None if metrics is None else {k: float(v) for k, v in jax.device_get(metrics).items()}
        return state, history

    def _signal_agreed(self, signals: _Signals, ckpt, step: int, sync_point: bool) -> bool:
        """Whether to stop for a signal: this process's flag, or (multi-host) Orbax's preemption sync
        point, and at log steps the flag of any process, so every process stops at the same step."""
        local = signals.received is not None
        if jax.process_count() == 1:
            return local
        agreed = False
        if ckpt is not None:
            try:
                agreed = bool(ckpt.manager.reached_preemption(step))
            except Exception:  # no preemption service in this jax.distributed set-up
                agreed = False
        if sync_point:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.int32(local))
            agreed = agreed or bool(np.max(flags))
        return agreed

    def _check_guard(self, guard, ckpt, it, history, *, final: bool = False) -> TrainState | None:
        """Acts on the device-side non-finite guard; returns the restored state after a rollback."""
        g = {k: int(v) for k, v in jax.device_get(guard).items()}
        history["skipped"] = g["skipped"]
        if not g["halted"]:
            return None
        tcfg = self.cfg.train
        metric = NONFINITE_METRICS.get(g["bad_code"], "?")
        what = f"non-finite {metric} at step {g['bad_step']}"
        if tcfg.nonfinite_policy == "skip":
            raise NonFiniteError(
                f"{what}: {g['consecutive']} non-finite steps in a row (train.max_consecutive_skips="
                f"{tcfg.max_consecutive_skips}, {g['skipped']} skipped in all); nothing new was saved"
            )
        if tcfg.nonfinite_policy == "stop" or history["rollbacks"] >= tcfg.max_rollbacks:
            rolled = f" after {history['rollbacks']} rollbacks" if tcfg.nonfinite_policy == "rollback" else ""
            last = None if ckpt is None else ckpt.latest_step()
            raise NonFiniteError(
                f"{what}{rolled} (train.nonfinite_policy={tcfg.nonfinite_policy}); nothing new was saved, "
                f"the last good checkpoint is step {last}"
            )
        history["rollbacks"] += 1
        if ckpt is not None and ckpt.all_steps():
            state, data_state, step = ckpt.restore(
                self.abstract_state(), config=to_dict(self.cfg), allow_batch_change=tcfg.allow_batch_change
            )
            if data_state is not None:
                it.set_state(data_state)
        else:
            state, step = self.init_state(), 0
            it.set_state(self.make_train_iterator().get_state())
        factor = tcfg.rollback_lr_factor ** history["rollbacks"]
        self._print(
            f"{what}: rolled back to step {step} with the learning rate x{factor:g}"
            f" (rollback {history['rollbacks']} of {tcfg.max_rollbacks})"
        )
        return state

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

    def _log(self, step: int, metrics: dict, prefix: str = "train", total: int | None = None) -> None:
        if self.logger is not None:
            self.logger.write(step, metrics, prefix=prefix, total=total)

    def _print(self, msg: str) -> None:
        if self.logger is not None:
            print(msg, flush=True)
