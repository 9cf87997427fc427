"""Params-only export for every family: flat dotted names <-> the model's parameter tree,
Orbax training checkpoints read without their optimizer state, and a manifest.

A model's parameters are the ``nnx.Param`` leaves of ``nnx.state(model, nnx.Param)``; their
flat name is the path joined by dots (``core.blocks.0.attn.q_DNH``), the same name the
safetensors file, the manifest and every error message use.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import types
import typing
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from looped_jax.config import to_dict
from looped_jax.export.safetensors_io import (
    ExportError,
    SafetensorsError,
    dtype_name,
    read_safetensors,
    tensor_sha256,
    write_safetensors,
)
from looped_jax.models import MODEL_CONFIGS, build_model

FORMAT_NAME = "looped_jax.safetensors"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


# ---------------------------------------------------------------------------------------------
# Names and trees.


def flatten_params(tree: Any) -> dict[str, Any]:
    """{dotted path: leaf} of a nested dict of arrays (``nnx.to_pure_dict`` layout), sorted by path."""
    out = {_dotted(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return dict(sorted(out.items()))


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def unflatten_like(flat: dict[str, Any], target: Any, *, where: str = "checkpoint") -> Any:
    """Fills ``target``'s tree (leaves: anything with shape / dtype) from ``flat`` by dotted name.

    Missing or unexpected names and shape mismatches are errors that list the names."""
    names = flatten_params(target)
    missing = sorted(set(names) - set(flat))
    extra = sorted(set(flat) - set(names))
    if missing or extra:
        raise ExportError(
            f"{where} does not match the model's parameters: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )
    for name, ref in names.items():
        if tuple(flat[name].shape) != tuple(ref.shape):
            raise ExportError(
                f"{where}: tensor {name!r} has shape {tuple(flat[name].shape)}, the model needs {ref.shape}"
            )
    paths = [_dotted(p) for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]]
    treedef = jax.tree.structure(target)
    return jax.tree.unflatten(treedef, [flat[name] for name in paths])


def _coerce(value: Any, hint: Any) -> Any:
    """Lists from JSON back to the tuple fields of a config dataclass."""
    origin = typing.get_origin(hint)
    if isinstance(value, list) and (hint is tuple or origin is tuple):
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner) for v in value)
    if origin in (typing.Union, types.UnionType) and isinstance(value, list):
        for arg in typing.get_args(hint):
            if arg is tuple or typing.get_origin(arg) is tuple:
                return _coerce(value, arg)
    return value


def model_config_from_dict(d: dict) -> Any:
    """The typed model config (``looped_jax.models.MODEL_CONFIGS[d['name']]``) of a config dict."""
    name = d.get("name")
    if name not in MODEL_CONFIGS:
        raise ExportError(f"model config has name={name!r}; expected one of {sorted(MODEL_CONFIGS)}")
    cls = MODEL_CONFIGS[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ExportError(f"model config for {name!r} has unknown fields {unknown}")
    return cls(**{k: _coerce(v, hints.get(k, Any)) for k, v in d.items()})


def abstract_params(model_cfg: Any) -> dict:
    """ShapeDtypeStructs of the model's parameters (pure nested dict), without allocating them."""
    model = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_from_params(model_cfg: Any, params: dict) -> nnx.Module:
    """An NNX model of ``model_cfg`` holding ``params`` (a pure nested dict as in TrainState)."""
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    flat = flatten_params(params)
    filled = unflatten_like(flat, nnx.to_pure_dict(state), where="parameters")
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, filled))
    return nnx.merge(graphdef, state)


def params_of(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# ---------------------------------------------------------------------------------------------
# Orbax training checkpoints (looped_jax.checkpoint.Checkpointer layout).


class TrainingCheckpoint(NamedTuple):
    config: dict  # the experiment config dict saved with the checkpoint
    model_cfg: Any  # typed model config
    params: dict  # pure nested dict of jax arrays (EMA weights when asked for)
    step: int
    weights: str  # "params" or "ema_params"
    path: str


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accepts a run's output dir (with a ``checkpoints/`` child) or the checkpoints dir itself."""
    path = Path(path).expanduser().absolute()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not path.is_dir():
        raise ExportError(f"checkpoint_dir {str(path)!r} is not a directory")
    return path


def _steps(path: Path) -> list[int]:
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit() and (p / "state").is_dir())


def read_training_checkpoint(
    checkpoint_dir: str | Path,
    *,
    step: int | None = None,
    ema: bool = False,
    shardings: Any = None,
) -> TrainingCheckpoint:
    """Restores only the parameters (or their EMA) of a training checkpoint; optimizer state,
    carry and data position are never read. ``shardings``: a pytree of ``jax.sharding.Sharding``
    matching the params (or a single one for all leaves) to restore onto a different mesh;
    default: every array on the first device."""
    import orbax.checkpoint as ocp
    from etils import epath

    root = resolve_checkpoint_dir(checkpoint_dir)
    steps = _steps(root)
    if not steps:
        raise ExportError(f"no checkpoint steps found in {root}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ExportError(f"no checkpoint for step {step} in {root}; have {steps}")
    meta_path = root / str(step) / "meta" / "metadata"
    if not meta_path.is_file():
        raise ExportError(f"{root / str(step)} has no meta item (not a looped_jax checkpoint?)")
    meta = json.loads(meta_path.read_text())
    config = meta.get("config") or {}
    if "model" not in config:
        raise ExportError(f"{meta_path} holds no model config")
    model_cfg = model_config_from_dict(config["model"])
    handler = ocp.PyTreeCheckpointHandler()
    state_dir = epath.Path(root / str(step) / "state")
    tree = handler.metadata(state_dir).tree
    key = "ema_params" if ema else "params"
    if not isinstance(tree.get(key), dict):
        have = "no EMA (train with optim.ema_decay > 0)" if ema else "no params"
        raise ExportError(f"checkpoint step {step} in {root} has {have}")
    target = abstract_params(model_cfg)
    saved_flat = flatten_params(tree[key])
    unflatten_like(saved_flat, target, where=f"checkpoint {root} step {step}")  # validates names/shapes
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        shard_tree = jax.tree.map(lambda _: shardings or default, tree[key])
    else:
        shard_tree = unflatten_like(
            {k: _Shaped(v, saved_flat[k].shape) for k, v in flatten_params(_sharding_leaves(shardings)).items()},
            tree[key],
            where="shardings",
        )
        shard_tree = jax.tree.map(lambda s: s.sharding, shard_tree, is_leaf=lambda x: isinstance(x, _Shaped))
    item = {key: jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree[key], shard_tree)}
    restored = handler.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
        ),
    )
    params = unflatten_like(flatten_params(restored[key]), target, where=f"checkpoint {root} step {step}")
    return TrainingCheckpoint(config, model_cfg, params, int(step), key, str(root / str(step)))


class _Shaped(NamedTuple):
    sharding: Any
    shape: tuple


def _sharding_leaves(tree):
    return jax.tree.map(lambda s: s, tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


# ---------------------------------------------------------------------------------------------
# Manifest and the params-only safetensors format.


def manifest(
    model_cfg: Any,
    tensors: dict[str, np.ndarray],
    *,
    fmt: str,
    step: int | None,
    source: str | None,
    weights: str = "params",
    files: dict[str, str] | None = None,
    extra: dict | None = None,
) -> dict:
    """What an exported directory holds: config, parameter count, per-tensor shape/dtype/sha256
    (of the tensors as written, under the names of that format) and where they came from."""
    return {
        "format": fmt,
        "family": model_cfg.name,
        "model_config": to_dict(model_cfg),
        "num_params": int(sum(int(np.prod(t.shape)) for t in tensors.values())),
        "source_step": step,
        "source_checkpoint": source,
        "weights": weights,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tensors": {
            k: {
                "shape": list(t.shape),
                "dtype": dtype_name(t.dtype),
                "sha256": tensor_sha256(np.asarray(t)),
                **({"file": files[k]} if files else {}),
            }
            for k, t in tensors.items()
        },
        **(extra or {}),
    }


def write_manifest(out_dir: str | Path, data: dict) -> Path:
    path = Path(out_dir) / MANIFEST_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def save_params_safetensors(
    out_dir: str | Path,
    model_cfg: Any,
    params: dict,
    *,
    step: int | None = None,
    source: str | None = None,
    weights: str = "params",
) -> Path:
    """``out_dir/model.safetensors`` (flat dotted names, dtypes as trained) + ``manifest.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten_params(params).items()}
    meta = {"format": "np", "looped_jax_format": FORMAT_NAME, "model_config": json.dumps(to_dict(model_cfg))}
    write_safetensors(out / WEIGHTS_FILE, flat, meta)
    write_manifest(out, manifest(model_cfg, flat, fmt=FORMAT_NAME, step=step, source=source, weights=weights))
    return out


def load_params_safetensors(path: str | Path, *, verify: bool = True) -> tuple[Any, dict]:
    """(model_cfg, params) from a directory written by ``save_params_safetensors``.

    ``verify`` checks every tensor's sha256 against the manifest."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise ExportError(f"{path} has no {WEIGHTS_FILE}")
    f = read_safetensors(path / WEIGHTS_FILE)
    if f.metadata.get("looped_jax_format") != FORMAT_NAME:
        raise ExportError(f"{path / WEIGHTS_FILE} was not written by looped_jax (metadata {f.metadata})")
    model_cfg = model_config_from_dict(json.loads(f.metadata["model_config"]))
    flat = {k: np.array(f[k]) for k in f}
    if verify and (path / MANIFEST_FILE).is_file():
        recorded = json.loads((path / MANIFEST_FILE).read_text())["tensors"]
        for k, t in flat.items():
            if k not in recorded or recorded[k]["sha256"] != tensor_sha256(t):
                raise ExportError(f"{path}: tensor {k!r} does not match the sha256 in {MANIFEST_FILE}")
    try:
        params = unflatten_like(flat, abstract_params(model_cfg), where=str(path))
    except SafetensorsError as e:
        raise ExportError(str(e)) from e
    return model_cfg, params
