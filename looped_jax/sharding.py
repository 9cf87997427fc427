"""Device mesh, logical-axis rules and shardings for parameters and batches.

Parameters carry ``logical_axes`` metadata (see ``looped_jax.nn.init.param``). A small rule
table maps each logical name to mesh axes (MaxText-style): FSDP shards the ``embed`` dim of
weights over ``fsdp``, tensor parallelism shards heads / MLP / vocab over ``tensor``, and the
batch is split over ``data`` x ``fsdp``. A mesh axis that does not divide a dimension is
dropped for that parameter; ``fsdp`` then moves to the largest other dimension it divides, and
whatever still stays replicated is logged (``replicated_params``).

Activations: ``constrain(x, names)`` pins an activation to ``ACTIVATION_RULES`` (batch over
data x fsdp, heads / mlp / vocab over tensor, seq over a ``context`` axis when the mesh has one)
so XLA keeps the batch split instead of gathering it to the weights' fsdp layout; it is a no-op
outside a mesh context (``jax.set_mesh``) and inside ``shard_map``. ``shard_kernel`` runs a
Pallas kernel (which the SPMD partitioner cannot split) under ``jax.shard_map`` over batch and heads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

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

# Activations: the batch stays split over (data, fsdp); model dims are never sharded over fsdp (that is the
# weights' axis); sequence over a "context" axis only when the mesh has one.
ACTIVATION_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", ("context",)),
    ("embed", ()),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("kv", ()),
    ("vocab", ("tensor",)),
)

log = logging.getLogger(__name__)


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
            n = mesh.shape.get(axis, 1)
            if n > 1 and axis not in used and dim % (size * n) == 0:
                axes.append(axis)
                size *= n
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def _wanted_axes(logical_axes, rules) -> set[str]:
    table = dict(rules)
    return {a for name in (logical_axes or ()) if name is not None for a in table.get(name, ())}


def param_spec(
    logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES
) -> PartitionSpec:
    """``logical_to_spec``, then ``fsdp`` (when the rules wanted it but the named dim does not divide) goes to
    the largest still-unsharded dimension it divides: FSDP only has to split storage, any dim will do."""
    spec = list(logical_to_spec(logical_axes, shape, mesh, rules))
    n = mesh.shape.get("fsdp", 1)
    used = {a for s in spec if s is not None for a in (s if isinstance(s, tuple) else (s,))}
    if n > 1 and "fsdp" not in used and "fsdp" in _wanted_axes(logical_axes, rules):
        free = [i for i, s in enumerate(spec) if s is None and shape[i] % n == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "fsdp"
    return PartitionSpec(*spec)


def replicated_params(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> list[tuple[str, tuple, str]]:
    """``(path, shape, axis)`` for each parameter a rule wanted split over a mesh axis > 1 that stays replicated
    over it (no dimension divides), e.g. 55 heads on tensor=2."""
    out = []
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, nnx.Variable):
            continue
        axes = var.get_metadata().get("logical_axes")
        spec = param_spec(axes, var.shape, mesh, rules)
        used = {a for s in spec if s is not None for a in (s if isinstance(s, tuple) else (s,))}
        for axis in sorted(_wanted_axes(axes, rules)):
            if mesh.shape.get(axis, 1) > 1 and axis not in used:
                out.append(("/".join(map(str, path)), tuple(var.shape), axis))
    return out


def _log_replicated(state: nnx.State, mesh: Mesh, rules) -> None:
    rep = replicated_params(state, mesh, rules)
    if rep:
        by_axis: dict[str, list] = {}
        for path, shape, axis in rep:
            by_axis.setdefault(axis, []).append((path, shape))
        for axis, items in by_axis.items():
            numel = sum(math.prod(s) for _, s in items)
            shown = ", ".join(f"{p} {list(s)}" for p, s in items[:4]) + (" ..." if len(items) > 4 else "")
            log.warning(
                "sharding: %d parameters (%.3g M elements) stay replicated over %s=%d (no dim divides): %s",
                len(items), numel / 1e6, axis, mesh.shape[axis], shown,
            )  # fmt: skip


def param_specs(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """PartitionSpecs for an ``nnx.State`` of parameters, read from their ``logical_axes`` (see ``param_spec``)."""

    def spec(v):
        if isinstance(v, nnx.Variable):
            return param_spec(v.get_metadata().get("logical_axes"), v.shape, mesh, rules)
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
    """Like ``param_specs`` but as a pure nested dict, matching ``nnx.to_pure_dict(state)``; logs parameters that
    stay replicated over an axis their rules wanted."""
    _log_replicated(state, mesh, rules)
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        node[path[-1]] = param_spec(axes, var.shape, mesh, rules) if isinstance(var, nnx.Variable) else PartitionSpec()
    return out


# ------------------------------------------------------------------------------------------ activations, kernels
def context_mesh():
    """The mesh being traced under (``jax.set_mesh``) when it splits anything and we are not inside
    ``shard_map`` (manual axes); else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1 or mesh.manual_axes:
        return None
    return mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules=ACTIVATION_RULES) -> jax.Array:
    """``with_sharding_constraint`` of activation ``x`` to its logical axes (``ACTIVATION_RULES``; a name of
    None leaves that dim to the partitioner). Axes that do not divide a dim are dropped; no-op without a mesh."""
    mesh = context_mesh()
    if mesh is None:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} for shape {x.shape}")
    spec = logical_to_spec([n or "" for n in logical_axes], x.shape, mesh, rules)
    spec = PartitionSpec(
        *(PartitionSpec.UNCONSTRAINED if n is None else s for n, s in zip(logical_axes, spec, strict=True))
    )
    return jax.lax.with_sharding_constraint(x, spec)


def _kernel_axes(mesh, batch: int, heads: Sequence[int], batch_axes, head_axis):
    """(batch mesh axes, head mesh axis) that divide ``batch`` and every entry of ``heads``."""
    axes = tuple(a for a in batch_axes if mesh.shape.get(a, 1) > 1)
    while axes and batch % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]  # keep the outer (data) split when fsdp does not divide what is left
    h = head_axis if mesh.shape.get(head_axis, 1) > 1 else None
    if h is not None and any(n % mesh.shape[h] for n in heads):
        h = None
    return axes, h


def shard_kernel(
    fn: Callable,
    args: tuple,
    in_axes: tuple,
    out_axes,
    *,
    batch: int,
    heads: Sequence[int],
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
    head_axis: str = "tensor",
):
    """``fn(*args)`` under ``jax.shard_map`` over the context mesh: every leaf of ``args[i]`` is laid out by
    ``in_axes[i]`` (a tuple of "batch" / "heads" / None per dim, shared by all leaves of that arg), outputs by
    ``out_axes`` (a pytree prefix of such tuples). Batch goes over ``batch_axes`` and heads over ``head_axis``
    where they divide ``batch`` / all of ``heads`` (else that dim is whole on every chip). Pallas kernels cannot be
    partitioned automatically, so every kernel call in the models goes through here; without a mesh (or inside
    ``shard_map`` already) it is a plain call."""
    mesh = context_mesh()
    if mesh is None:
        return fn(*args)
    b_axes, h_axis = _kernel_axes(mesh, batch, heads, batch_axes, head_axis)
    if not b_axes and h_axis is None:
        return fn(*args)
    b = b_axes if len(b_axes) > 1 else (b_axes[0] if b_axes else None)
    table = {"batch": b, "heads": h_axis, None: None}

    def to_spec(names):
        return PartitionSpec(*(table[n] for n in names))

    is_names = lambda t: isinstance(t, tuple) and all(n is None or isinstance(n, str) for n in t)  # noqa: E731
    in_specs = tuple(to_spec(a) for a in in_axes)
    out_specs = jax.tree.map(to_spec, out_axes, is_leaf=is_names)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
