"""StableHLO serving artifacts: a serialized ``jax.export`` of the model's forward, with
symbolic batch and sequence length and the loop count as a runtime argument.

Directory: ``forward.jax_exported`` (``jax.export.Exported.serialize()``, lowered for the
requested platforms), ``weights.safetensors`` (the parameters, flat dotted names, passed as
the function's first argument so the artifact stays small and the weights auditable) and
``serving.json`` (signature, platforms, config). ``load_serving(path)`` rebuilds a callable
from these files alone: no model code is imported, only ``jax.export.deserialize``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from looped_jax.export.safetensors_io import ExportError, read_safetensors, write_safetensors

ARTIFACT = "forward.jax_exported"
WEIGHTS = "weights.safetensors"
SPEC = "serving.json"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def export_serving(
    out_dir: str | Path, model_cfg: Any, params: dict, *, platforms: tuple[str, ...] = DEFAULT_PLATFORMS
) -> Path:
    """Writes the serving artifact of ``forward(weights, tokens_BT, num_loops) -> logits_BTV``.

    Batch ``B`` and length ``T`` are symbolic; ``num_loops`` is an int32 scalar argument
    (recurrent depth: core iterations, zero initial state, as ``model(tokens, num_loops=n)``)."""
    from flax import nnx

    from looped_jax.config import to_dict
    from looped_jax.export.params import flatten_params, model_from_params

    if model_cfg.name != "recurrent_depth":
        raise ExportError(
            f"stablehlo export covers the recurrent_depth forward (loop count at run time); got {model_cfg.name!r}"
        )
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten_params(params).items()}
    names = list(flat)
    model = model_from_params(model_cfg, params)

    graphdef, _ = nnx.split(model)
    template = nnx.state(model)

    def forward(weights: dict, tokens_BT: jax.Array, num_loops: jax.Array) -> jax.Array:
        state = jax.tree.map(lambda x: x, template)
        nnx.replace_by_pure_dict(state, _nest(weights, names))
        return nnx.merge(graphdef, state)(tokens_BT, num_loops=num_loops)

    b, t = jax.export.symbolic_shape("B, T")
    args = (
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()},
        jax.ShapeDtypeStruct((b, t), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    exported = jax.export.export(jax.jit(forward), platforms=platforms)(*args)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ARTIFACT).write_bytes(exported.serialize())
    write_safetensors(out / WEIGHTS, flat, {"format": "np"})
    spec = {
        "format": "looped_jax.stablehlo",
        "function": "forward(weights, tokens_BT int32 [B, T], num_loops int32 []) -> logits_BTV float32",
        "platforms": list(exported.platforms),
        "family": model_cfg.name,
        "model_config": to_dict(model_cfg),
        "in_shapes": [str(a) for a in exported.in_avals],
        "out_shapes": [str(a) for a in exported.out_avals],
    }
    (out / SPEC).write_text(json.dumps(spec, indent=1))
    return out


def _nest(weights: dict, names: list[str]) -> dict:
    """Flat dotted names -> nested dict with int keys for list indices (nnx pure-dict layout)."""
    out: dict = {}
    for name in names:
        node = out
        parts = [int(p) if p.isdigit() else p for p in name.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = weights[name]
    return out


class Serving:
    """A deserialized serving artifact: ``serving(tokens_BT, num_loops) -> logits_BTV``."""

    def __init__(self, path: str | Path):
        path = Path(path)
        for name in (ARTIFACT, WEIGHTS, SPEC):
            if not (path / name).is_file():
                raise ExportError(f"{path} is not a serving artifact: {name} is missing")
        self.spec = json.loads((path / SPEC).read_text())
        self.exported = jax.export.deserialize(bytearray((path / ARTIFACT).read_bytes()))
        f = read_safetensors(path / WEIGHTS)
        self.weights = {k: jnp.asarray(np.array(f[k])) for k in f}

    def __call__(self, tokens_BT, num_loops: int) -> jax.Array:
        tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must be [batch, length] int32, got shape {tokens_BT.shape}")
        return self.exported.call(self.weights, tokens_BT, jnp.asarray(num_loops, jnp.int32))


def load_serving(path: str | Path) -> Serving:
    return Serving(path)
