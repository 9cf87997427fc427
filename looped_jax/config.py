"""Typed experiment configs and command-line overrides.

A config file in ``configs/`` defines ``get_config() -> ExperimentConfig``. Any field can be
overridden as ``--config.model.mean_loops=8``; an unknown field or a value that does not parse
as the field's type is an error naming the field. Configs are frozen dataclasses, so every
override re-runs the field validation in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def check_field(ok: bool, field: str, expected: str, got: Any) -> None:
    """Raises a ValueError naming the config ``field`` and what it expected, unless ``ok``."""
    if not ok:
        raise ValueError(f"config field {field} must be {expected}, got {got!r}")


def check_model_field(ok: bool, field: str, expected: str, got: Any) -> None:
    """`check_field` for a field of the model config (named ``model.<field>`` in the error)."""
    check_field(ok, f"model.{field}", expected, got)


def check_finite(cfg: Any, section: str) -> None:
    """Raises naming ``section.field`` for every float field of ``cfg`` that is NaN or infinite."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"config field {section}.{f.name} must be a finite number, got {v!r}")


# The optimizers `looped_jax.train.optimizer.make_optimizer` builds.
OPTIMIZER_NAMES = ("adamw", "adam_atan2")
# What the trainer does when a step's loss, gradient norm or new parameters are not finite.
NONFINITE_POLICIES = ("stop", "skip", "rollback")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay, global-norm gradient clipping."""

    name: str = "adamw"  # "adamw" or "adam_atan2" (HRM/TRM: AdamATan2 + sign-SGD on the puzzle embedding)
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    decay_steps: int = 0  # 0 = decay over train.num_steps
    end_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.0  # > 0 keeps an EMA of the weights, used for evaluation (TRM uses 0.999)
    puzzle_emb_learning_rate: float = 0.0  # adam_atan2: sign-SGD lr of `puzzle_emb` params (0 = learning_rate)
    puzzle_emb_weight_decay: float = -1.0  # adam_atan2: its decoupled weight decay (< 0 = weight_decay)

    def __post_init__(self):
        check_finite(self, "optim")
        check_field(self.learning_rate > 0, "optim.learning_rate", "> 0", self.learning_rate)
        check_field(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        check_field(self.eps > 0, "optim.eps", "> 0", self.eps)
        check_field(self.warmup_steps >= 0, "optim.warmup_steps", ">= 0", self.warmup_steps)
        check_field(self.decay_steps >= 0, "optim.decay_steps", ">= 0", self.decay_steps)
        check_field(
            0 <= self.end_learning_rate_ratio <= 1,
            "optim.end_learning_rate_ratio",
            "in [0, 1]",
            self.end_learning_rate_ratio,
        )
        check_field(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1/b2", "in [0, 1)", (self.b1, self.b2))
        check_field(self.grad_clip >= 0, "optim.grad_clip", ">= 0", self.grad_clip)
        check_field(0 <= self.ema_decay < 1, "optim.ema_decay", "in [0, 1)", self.ema_decay)
        check_field(self.name in OPTIMIZER_NAMES, "optim.name", f"one of {list(OPTIMIZER_NAMES)}", self.name)
        check_field(
            self.puzzle_emb_learning_rate >= 0, "optim.puzzle_emb_learning_rate", ">= 0", self.puzzle_emb_learning_rate
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    num_steps: int = 1000
    global_batch_size: int = 32
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 8
    output_dir: str = "runs/default"
    # Wall-clock budget of one Trainer.fit call in minutes (0 = none): training stops after the first
    # step that ends past it, with that step logged, checkpointed (if enabled) and returned.
    max_minutes: float = 0.0
    # Recurrence curriculum (McLeish et al. 2025): with N > 0 steps, models with a sampled loop count
    # (recurrent_depth) draw it around a mean that rises linearly from mean_loops_ramp_start to
    # model.mean_loops over the first N steps. 0 = a fixed mean (the default behaviour).
    mean_loops_ramp_steps: int = 0
    mean_loops_ramp_start: float = 1.0
    # Non-finite guard (checked inside the jitted step): "stop" ends the run with an error naming the
    # step and metric, keeping the last good checkpoint; "skip" drops the update and stops after
    # `max_consecutive_skips` bad steps in a row; "rollback" restores the last good checkpoint and
    # continues with the learning rate times `rollback_lr_factor` (at most `max_rollbacks` times).
    nonfinite_policy: str = "stop"
    max_consecutive_skips: int = 5
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    # A fresh run (checkpoint.resume=false) into a directory with checkpoints is an error unless
    # overwrite=true, which deletes them first.
    overwrite: bool = False
    # Resuming with a different global_batch_size is an error unless this is set; the data
    # position is then mapped to the same number of rows consumed.
    allow_batch_change: bool = False
    # A fresh run (nothing to resume) starts from these parameters instead of the seed's: a
    # params-only export directory (model.safetensors + manifest.json, from scripts/export.py
    # --format safetensors or scripts/retrofit.py) whose model config equals model. "" = off.
    init_params_from: str = ""
    # jax.profiler trace of steps [profile_start, profile_stop) into output_dir/profile (-1 = off).
    profile_start: int = -1
    profile_stop: int = -1

    def __post_init__(self):
        check_finite(self, "train")
        check_field(bool(str(self.output_dir).strip()), "train.output_dir", "a non-empty path", self.output_dir)
        check_field(0 <= self.seed < 2**32, "train.seed", "in [0, 2**32)", self.seed)
        check_field(self.eval_batches >= 1, "train.eval_batches", ">= 1", self.eval_batches)
        check_field(
            self.nonfinite_policy in NONFINITE_POLICIES,
            "train.nonfinite_policy",
            f"one of {list(NONFINITE_POLICIES)}",
            self.nonfinite_policy,
        )
        check_field(self.max_consecutive_skips >= 1, "train.max_consecutive_skips", ">= 1", self.max_consecutive_skips)
        check_field(0 < self.rollback_lr_factor < 1, "train.rollback_lr_factor", "in (0, 1)", self.rollback_lr_factor)
        check_field(self.max_rollbacks >= 1, "train.max_rollbacks", ">= 1", self.max_rollbacks)
        if self.profile_start >= 0 or self.profile_stop >= 0:
            check_field(
                0 <= self.profile_start < self.profile_stop,
                "train.profile_start/profile_stop",
                "0 <= profile_start < profile_stop (or both -1)",
                (self.profile_start, self.profile_stop),
            )
        check_field(self.num_steps >= 1, "train.num_steps", ">= 1", self.num_steps)
        check_field(self.max_minutes >= 0, "train.max_minutes", ">= 0 (0 = no budget)", self.max_minutes)
        check_field(self.global_batch_size >= 1, "train.global_batch_size", ">= 1", self.global_batch_size)
        check_field(self.log_every >= 1, "train.log_every", ">= 1", self.log_every)
        check_field(self.eval_every >= 0, "train.eval_every", ">= 0", self.eval_every)
        check_field(self.mean_loops_ramp_steps >= 0, "train.mean_loops_ramp_steps", ">= 0", self.mean_loops_ramp_steps)
        check_field(self.mean_loops_ramp_start >= 1, "train.mean_loops_ramp_start", ">= 1", self.mean_loops_ramp_start)


# Regression losses of the latent-prediction objective.
LATENT_LOSSES = ("smooth_l1", "cosine")


@dataclasses.dataclass(frozen=True)
class LatentConfig:
    """Latent prediction (data2vec / JEPA style) added to the family's loss (`looped_jax.train.latent`).

    ``weight`` = 0 turns it off (the default); the family must implement ``hidden_states``."""

    weight: float = 0.0  # lambda: loss = loss_family + weight * loss_latent
    mask_ratio: float = 0.3  # about this fraction of each row's tokens is masked for the student
    mask_span: int = 3  # masked spans are this many tokens long
    mask_token: int = 0  # input id written at masked positions (PAD = 0 in every builder)
    top_k: int = 2  # targets average the instance-normalised last K layer / loop states
    teacher_extra_loops: int = 0  # looped families: the teacher runs this many more loops than the student
    tau_start: float = 0.999  # EMA decay of the teacher, linear from tau_start ...
    tau_end: float = 0.9999  # ... to tau_end over tau_steps
    tau_steps: int = 0  # 0 = over train.num_steps
    loss: str = "smooth_l1"  # or "cosine" (1 - cos)
    beta: float = 1.0  # smooth-L1 transition point
    predictor_hidden: int = 0  # predictor MLP width; 0 = 2 * d_model

    def __post_init__(self):
        check_finite(self, "latent")
        check_field(self.weight >= 0, "latent.weight", ">= 0 (0 = off)", self.weight)
        check_field(0 < self.mask_ratio < 1, "latent.mask_ratio", "in (0, 1)", self.mask_ratio)
        check_field(self.mask_span >= 1, "latent.mask_span", ">= 1", self.mask_span)
        check_field(self.mask_token >= 0, "latent.mask_token", ">= 0 (a token id)", self.mask_token)
        check_field(self.top_k >= 1, "latent.top_k", ">= 1", self.top_k)
        check_field(self.teacher_extra_loops >= 0, "latent.teacher_extra_loops", ">= 0", self.teacher_extra_loops)
        check_field(0 <= self.tau_start <= 1, "latent.tau_start", "in [0, 1]", self.tau_start)
        check_field(0 <= self.tau_end <= 1, "latent.tau_end", "in [0, 1]", self.tau_end)
        check_field(self.tau_steps >= 0, "latent.tau_steps", ">= 0 (0 = the whole run)", self.tau_steps)
        check_field(self.loss in LATENT_LOSSES, "latent.loss", f"one of {list(LATENT_LOSSES)}", self.loss)
        check_field(self.beta > 0, "latent.beta", "> 0", self.beta)
        check_field(
            self.predictor_hidden >= 0, "latent.predictor_hidden", ">= 0 (0 = 2 * d_model)", self.predictor_hidden
        )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 on one axis means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        check_field(sum(s == -1 for s in sizes) <= 1, "mesh", "at most one axis set to -1", sizes)
        check_field(all(s == -1 or s >= 1 for s in sizes), "mesh", "sizes >= 1 or -1", sizes)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = 0  # 0 disables periodic saves (a final save still happens if enabled)
    keep: int = 3
    async_save: bool = True
    resume: bool = True
    enabled: bool = True

    def __post_init__(self):
        check_field(self.save_every >= 0, "checkpoint.save_every", ">= 0", self.save_every)
        check_field(self.keep >= 1, "checkpoint.keep", ">= 1", self.keep)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: Any
    data: Any
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    latent: LatentConfig = LatentConfig()


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def load_config(path: str | Path, overrides: dict[str, str] | None = None) -> ExperimentConfig:
    """Imports ``path`` (a Python file with ``get_config()``) and applies ``overrides``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"looped_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {str(path)!r} must define get_config()")
    cfg = module.get_config()
    return apply_overrides(cfg, overrides or {})


def apply_overrides(cfg: Any, overrides: dict[str, str | Any]) -> Any:
    """Returns ``cfg`` with dotted-path fields replaced; strings are parsed by the field's type.

    All overrides of one section are applied in a single ``dataclasses.replace``, so fields that
    are validated together (``num_heads`` and ``num_kv_heads``) can be changed together.
    """
    tree: dict = {}
    for dotted, value in overrides.items():
        node = tree
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"config field {dotted!r} conflicts with another override")
        node[parts[-1]] = value
    return _replace_fields(cfg, tree, prefix="")


def _replace_fields(obj: Any, tree: dict, prefix: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ValueError(f"config field {prefix.rstrip('.')!r}: {type(obj).__name__} has no sub-fields")
    names = [f.name for f in dataclasses.fields(obj)]
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for key, value in tree.items():
        full = prefix + key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config field {full!r}: {type(obj).__name__} has fields {names}{hint}")
        current = getattr(obj, key)
        if isinstance(value, dict):
            changes[key] = _replace_fields(current, value, full + ".")
            continue
        if key == "name" and full == "model.name" and current != value:
            # The model config's class is the family; a name alone cannot turn one into another.
            raise ValueError(
                f"config field 'model.name' selects the model family ({type(obj).__name__}, name {current!r}) "
                f"and cannot be overridden to {value!r}; use a config file of that family"
            )
        changes[key] = parse_value(value, hints[key], full)
    return dataclasses.replace(obj, **changes)


def parse_value(value: Any, hint: Any, field: str) -> Any:
    """Parses a command-line string into ``hint`` (int, float, bool, str, tuple[...] or Optional)."""
    if not isinstance(value, str) or hint is Any or hint is str:
        return value
    if dataclasses.is_dataclass(hint):
        raise ValueError(f"config field {field!r} is a section; set its sub-fields instead")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null"):
            return None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return parse_value(value, args[0], field)
    if origin is tuple:
        elem = (typing.get_args(hint) or (str,))[0]
        items = [v.strip() for v in value.strip("()[] ").split(",") if v.strip()]
        return tuple(parse_value(v, elem, field) for v in items)
    parsers = {int: int, float: float, bool: _parse_bool}
    if hint in parsers:
        try:
            parsed = parsers[hint](value)
        except ValueError:
            pass
        else:
            if hint is float and not math.isfinite(parsed):
                raise ValueError(f"config field {field!r} must be a finite number, got {value!r}")
            return parsed
    raise ValueError(f"config field {field!r} expects {getattr(hint, '__name__', hint)}, got {value!r}")


def _parse_bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(value)


def parse_override_groups(argv: Sequence[str], prefixes: Sequence[str]) -> dict[str, dict[str, str]]:
    """Splits ``--{prefix}.a.b=v`` (or ``--{prefix}.a.b v``) arguments into one overrides dict per prefix.

    A script with one config uses the prefix ``config``; one that trains two configs side by side (the
    LTM and its AR baseline) gives each its own prefix, named like the flag of its config file. Any
    other argument is an error naming it, so a misspelt flag never passes silently.
    """
    groups: dict[str, dict[str, str]] = {p: {} for p in prefixes}
    expected = " or ".join(f"--{p}.field=value" if "." in p else f"--{p}.section.field=value" for p in prefixes)
    i = 0
    while i < len(argv):
        arg = argv[i]
        prefix = next((p for p in prefixes if arg.startswith(f"--{p}.")), None)
        if prefix is None:
            raise ValueError(f"unexpected argument {arg!r}; config overrides look like {expected}")
        key = arg[len(prefix) + 3 :]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            i += 1
            if i >= len(argv) or argv[i].startswith("--"):
                raise ValueError(f"override --{prefix}.{key} has no value; write --{prefix}.{key}=value")
            value = argv[i]
        if value.startswith("--"):
            raise ValueError(f"override --{prefix}.{key} has the flag {value!r} as its value; give it a value")
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {arg!r} must name a field, as in --{prefix}.model.num_loops=8")
        if key in groups[prefix]:
            raise ValueError(f"override --{prefix}.{key} is given twice")
        groups[prefix][key] = value
        i += 1
    return groups


def parse_overrides(argv: Sequence[str], prefix: str = "config") -> dict[str, str]:
    """``--config.a.b=v`` arguments -> ``{"a.b": "v"}`` (for `apply_overrides`); anything else is an error.

    Scripts parse their own flags with ``argparse``'s ``parse_known_args`` and hand the rest here.
    """
    return parse_override_groups(argv, (prefix,))[prefix]


def parse_cli_overrides(argv: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """Splits ``--config PATH --config.a.b=v [--config.c.d v]`` into (path, overrides)."""
    path, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ValueError("--config needs a config file path, as in --config configs/<name>.py")
                value, i = argv[i + 1], i + 2
            else:
                value, i = arg.split("=", 1)[1], i + 1
            if not value:
                raise ValueError("--config needs a config file path, as in --config configs/<name>.py")
            if path is not None:
                raise ValueError(f"--config is given twice ({path!r} and {value!r}); give one config file")
            path = value
            continue
        rest.append(arg)
        i += 1
    return path, parse_overrides(rest)


def to_dict(cfg: Any) -> dict:
    """JSON-compatible nested dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Human-readable list of fields that differ between two config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, name + ".")
        elif va != vb:
            out.append(f"{name}: checkpoint has {va!r}, config has {vb!r}")
    return out
