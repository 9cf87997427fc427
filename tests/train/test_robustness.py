"""Training that survives signals, NaNs and a user's mistakes (non-finite policies, SIGTERM, CLI)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from looped_jax.checkpoint import Checkpointer, CheckpointError
from looped_jax.config import (
    CheckpointConfig,
    ExperimentConfig,
    OptimConfig,
    TrainConfig,
    load_config,
    parse_cli_overrides,
)
from looped_jax.models.recurrent_depth import RecurrentDepthConfig
from looped_jax.train.trainer import EXIT_PREEMPTED, NonFiniteError, Trainer
from tests.train.tiny import single_device_mesh, tiny_chains_data

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    return tiny_chains_data(str(tmp_path_factory.mktemp("tfds")))


def _cfg(data_cfg, out, *, steps=8, save_every=2, **train_kw):
    model = RecurrentDepthConfig(
        vocab_size=35, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
        num_prelude_layers=1, num_core_layers=1, num_coda_layers=1, mean_loops=3, grad_steps=2,
    )  # fmt: skip
    return ExperimentConfig(
        model=model,
        data=data_cfg,
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=1),
        train=TrainConfig(num_steps=steps, global_batch_size=8, log_every=2, output_dir=str(out), **train_kw),
        checkpoint=CheckpointConfig(save_every=save_every, keep=10, async_save=False),
    )


class _NaNAt(Trainer):
    """Poisons the loss and parameters of the steps in ``bad_steps`` (0-based step index)."""

    bad_steps: tuple[int, ...] = ()

    def _train_step(self, state, batch, lr_scale=None):
        new, metrics = super()._train_step(state, batch, lr_scale=lr_scale)
        bad = jnp.isin(state.step, jnp.asarray(self.bad_steps, jnp.int32))
        poison = jnp.where(bad, jnp.nan, 0.0)
        params = jax.tree.map(lambda p: p + poison.astype(p.dtype), new.params)
        return new._replace(params=params), dict(metrics, loss=metrics["loss"] + poison)


def _trainer(cls, cfg, bad_steps=()):
    t = cls(cfg, mesh=single_device_mesh(), log=False)
    t.bad_steps = tuple(bad_steps)
    return t


def _finite(tree) -> bool:
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(jax.device_get(tree)))


def test_stop_policy_raises_naming_step_and_keeps_last_good_checkpoint(data_cfg, tmp_path):
    cfg = _cfg(data_cfg, tmp_path)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 5 .*last good checkpoint is step 4"):
        _trainer(_NaNAt, cfg, bad_steps=(4,)).fit()
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()


def test_skip_policy_drops_the_bad_update_and_counts_it(data_cfg, tmp_path):
    cfg = _cfg(data_cfg, tmp_path, nonfinite_policy="skip", max_consecutive_skips=2)
    state, history = _trainer(_NaNAt, cfg, bad_steps=(3,)).fit()
    assert int(state.step) == 8 and history["skipped"] == 1 and _finite(state.params)


@pytest.mark.slow  # in CI by .ci/run (-m slow on this file)
def test_skip_policy_stops_after_too_many_in_a_row(data_cfg, tmp_path):
    cfg = _cfg(data_cfg, tmp_path, nonfinite_policy="skip", max_consecutive_skips=2)
    with pytest.raises(NonFiniteError, match=r"2 non-finite steps in a row"):
        _trainer(_NaNAt, cfg, bad_steps=(3, 4)).fit()


@pytest.mark.slow
def test_rollback_policy_restores_and_lowers_the_learning_rate(data_cfg, tmp_path):
    cfg = _cfg(data_cfg, tmp_path, nonfinite_policy="rollback", rollback_lr_factor=0.5)
    # Step index 5 is bad once: after the rollback to step 4 the run goes on (the trainer's
    # bad_steps only poisons the first pass, by the step counter it sees next).
    t = _trainer(_NaNAt, cfg, bad_steps=(5,))
    calls = {"n": 0}
    orig = t._check_guard

    def check(*a, **kw):
        out = orig(*a, **kw)
        if out is not None:
            calls["n"] += 1
            t.bad_steps = ()  # a transient fault: gone after the rollback
            t.guarded_step = jax.jit(t._guarded_step, donate_argnums=(0, 2))
        return out

    t._check_guard = check
    state, history = t.fit()
    assert calls["n"] == 1 and history["rollbacks"] == 1
    assert int(state.step) == 8 and _finite(state.params)
    assert history["train"]["learning_rate"] == pytest.approx(0.5 * float(t.schedule(7)))
    # The lowered rate reaches the updates: steps 5-8 redone at half the rate end elsewhere than a
    # run that never went bad (which the rollback run would equal bitwise without the lower rate).
    straight, _ = Trainer(_cfg(data_cfg, tmp_path / "straight"), mesh=single_device_mesh(), log=False).fit()
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state.params, straight.params))
    assert max(diffs) > 1e-6


def test_nan_from_a_huge_learning_rate_never_reaches_a_checkpoint(data_cfg, tmp_path):
    cfg = _cfg(data_cfg, tmp_path, steps=6)
    cfg = cfg.__class__(**{**cfg.__dict__, "optim": OptimConfig(learning_rate=1e30, warmup_steps=0, grad_clip=0.0)})
    with pytest.raises(NonFiniteError, match=r"non-finite"):
        Trainer(cfg, mesh=single_device_mesh(), log=False).fit()
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    for step in ckpt.all_steps():
        state, _, _ = ckpt.restore(Trainer(cfg, mesh=single_device_mesh(), log=False).abstract_state(), step=step)
        assert _finite(state.params), step
    ckpt.close()


@pytest.mark.parametrize("during", ["step", pytest.param("async_save", marks=pytest.mark.slow)])
def test_sigterm_saves_the_current_step_and_resume_is_exact(data_cfg, tmp_path, during):
    straight, _ = Trainer(_cfg(data_cfg, tmp_path / "a", save_every=0), mesh=single_device_mesh(), log=False).fit()

    class _KillAt(Trainer):
        def global_batch(self, batch):
            self.calls = getattr(self, "calls", 0) + 1
            if during == "step" and self.calls == 3:  # while the third step runs
                os.kill(os.getpid(), signal.SIGTERM)
            return super().global_batch(batch)

    cfg = _cfg(data_cfg, tmp_path / "b", save_every=2 if during == "async_save" else 0)
    cfg = cfg.__class__(**{**cfg.__dict__, "checkpoint": cfg.checkpoint.__class__(
        save_every=cfg.checkpoint.save_every, keep=10, async_save=during == "async_save")})  # fmt: skip
    orig_save = Checkpointer.save

    def save_then_signal(self, step, *a, **kw):  # the signal lands while the async save of step 2 is in flight
        out = orig_save(self, step, *a, **kw)
        if during == "async_save" and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    Checkpointer.save = save_then_signal
    try:
        _, history = _KillAt(cfg, mesh=single_device_mesh(), log=False).fit()
    finally:
        Checkpointer.save = orig_save
    assert history["stopped_by"] == "signal" and history["signal"] == "SIGTERM" and history["steps"] == 3
    ckpt = Checkpointer(tmp_path / "b" / "checkpoints", async_save=False)
    assert ckpt.all_steps() == ([2, 3] if during == "async_save" else [3])
    ckpt.close()
    resumed, _ = Trainer(cfg, mesh=single_device_mesh(), log=False).fit()
    assert int(resumed.step) == 8
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), jax.device_get(straight.params))


@pytest.mark.slow
def test_fresh_run_into_a_directory_with_checkpoints_is_an_error(data_cfg, tmp_path):
    Trainer(_cfg(data_cfg, tmp_path, steps=2), mesh=single_device_mesh(), log=False).fit()
    fresh = _cfg(data_cfg, tmp_path, steps=2)
    fresh = fresh.__class__(**{**fresh.__dict__, "checkpoint": CheckpointConfig(resume=False, async_save=False)})
    with pytest.raises(CheckpointError, match=r"checkpoint.resume=false .* train.overwrite=true"):
        Trainer(fresh, mesh=single_device_mesh(), log=False).fit()


@pytest.mark.slow
def test_num_steps_below_the_checkpoint_is_an_error(data_cfg, tmp_path):
    Trainer(_cfg(data_cfg, tmp_path, steps=4), mesh=single_device_mesh(), log=False).fit()
    with pytest.raises(CheckpointError, match=r"at step 4, past train.num_steps=2"):
        Trainer(_cfg(data_cfg, tmp_path, steps=2), mesh=single_device_mesh(), log=False).fit()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config"], "--config needs a config file path"),
        (["--config", "--config.train.num_steps=3"], "--config needs a config file path"),
        (["--config=a.py", "--config=b.py"], "--config is given twice"),
        (["--config=a.py", "--config.train.seed", "--config.train.num_steps=3"], "has no value"),
        (["--config=a.py", "--config.train.seed=1", "--config.train.seed=2"], "given twice"),
        (["--config=a.py", "--confg.train.seed=1"], "unexpected argument '--confg.train.seed=1'"),
    ],
)
def test_command_line_mistakes_are_named(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_cli_overrides(argv)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"optim.learning_rate": "inf"}, "optim.learning_rate' must be a finite number"),
        ({"optim.weight_decay": "-1"}, "optim.weight_decay"),
        ({"optim.eps": "0"}, "optim.eps"),
        ({"optim.name": "sgd"}, "optim.name.*adam_atan2"),
        ({"train.seed": "-3"}, "train.seed"),
        ({"train.output_dir": ""}, "train.output_dir"),
        ({"train.nonfinite_policy": "ignore"}, "train.nonfinite_policy"),
        ({"model.name": "looped"}, "model.name' selects the model family"),
    ],
)
def test_config_values_are_validated_by_name(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(str(ROOT / "configs" / "recurrent_depth_chains.py"), override)


def test_optim_name_can_be_set_from_the_command_line():
    cfg = load_config(str(ROOT / "configs" / "recurrent_depth_chains.py"), {"optim.name": "adam_atan2"})
    assert cfg.optim.name == "adam_atan2"


def test_train_script_exits_75_on_sigterm_and_resumes(tmp_path):
    """The CLI: SIGTERM mid-run saves and exits 75; running again finishes; a bad flag exits 2."""
    args = [
        sys.executable, str(ROOT / "scripts" / "train.py"),
        "--config", str(ROOT / "configs" / "recurrent_depth_chains.py"),
        f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.num_train=64", "--config.data.num_test=16",
        "--config.train.num_steps=400", "--config.train.global_batch_size=8", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.checkpoint.save_every=0", f"--config.train.output_dir={tmp_path}",
    ]  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[train] step") and int(line.split()[2]) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.stdout.read()
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, out
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    saved = ckpt.latest_step()
    ckpt.close()
    assert saved is not None and 3 <= saved < 400, out
    bad = subprocess.run(args[:-1] + ["--config.train.num_steps=nope"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "train.num_steps" in bad.stderr.splitlines()[0], bad.stderr
