"""Device mesh, logical-axis rules and shardings for parameters and batches.

Parameters carry ``logical_axes`` metadata (see ``looped_jax.nn.init.param``). A small rule
table maps each logical name to mesh axes (MaxText-style): FSDP shards the ``embed`` dim of
weights over ``fsdp``, tensor parallelism shards heads / MLP / vocab over ``tensor``, and the
batch is split over ``data`` x ``fsdp``. A mesh axis that does not divide a dimension is
dropped for that parameter (it is replicated instead), so odd shapes never fail to shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from looped_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("kv", ()),
    ("vocab", ("tensor",)),
    ("layers", ()),
    ("seq", ()),
)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves the -1 axis and checks that the mesh uses exactly ``num_devices`` devices."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices "
            f"but {num_devices} are available"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) over ``devices`` (default: all devices).

    Axes are ``Auto``: the train step is jitted with in/out shardings and XLA propagates the rest.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, tuple[str, ...]]] = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for one array; mesh axes that don't divide the dim or are already used are dropped."""
    if logical_axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape, strict=True):
        axes = []
        size = 1
        for axis in table.get(name, ()) if name is not None else ():
            n = mesh.shape[axis]
            if n > 1 and axis not in used and dim % (size * n) == 0:
                axes.append(axis)
                size *= n
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def param_specs(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """PartitionSpecs for an ``nnx.State`` of parameters, read from their ``logical_axes``."""

    def spec(v):
        if isinstance(v, nnx.Variable):
            return logical_to_spec(v.get_metadata().get("logical_axes"), v.shape, mesh, rules)
        return PartitionSpec()

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_spec(mesh: Mesh, ndim: int = 2) -> PartitionSpec:
    """Batch arrays are split over (data, fsdp) on their leading axis."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    lead = axes if len(axes) > 1 else (axes[0] if axes else None)
    return PartitionSpec(lead, *([None] * (ndim - 1)))


def named(mesh: Mesh, specs):
    """Maps a pytree of PartitionSpecs to NamedShardings."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def pure_param_specs(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """Like ``param_specs`` but as a pure nested dict, matching ``nnx.to_pure_dict(state)``."""
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        node[path[-1]] = logical_to_spec(axes, var.shape, mesh, rules)
    return out
