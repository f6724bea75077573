"""Device mesh and logical-axis sharding rules.

Every parameter declares *logical* axis names (``("embed", "mlp")``); a rules table maps each
logical axis to zero or more *mesh* axes. The same model code therefore runs on one CPU, on 8
simulated CPU devices and on a TPU pod: only the mesh shape changes.

Mesh axes, outermost first:
- ``data``   pure data parallelism (parameters replicated),
- ``fsdp``   data parallelism with parameters and optimizer state sharded (ZeRO-3 style),
- ``tensor`` tensor (model) parallelism over heads / MLP width / vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def sampling_rules(rules: Rules = DEFAULT_RULES) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The decode layout of ``rules``: no weight axis maps to ``fsdp`` (the ``batch`` axis still does).

    Training splits every weight over ``fsdp`` (ZeRO-3), so each decode step would all-gather every
    weight to produce one token per row. Under these rules the weights are whole on every
    data-parallel shard and split only over ``tensor`` (tunix's sampling layout does the same).
    """

    def without_fsdp(target):
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        kept = tuple(axis for axis in axes if axis != "fsdp")
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return tuple((name, target if name == "batch" else without_fsdp(target)) for name, target in rules)


def decode_mesh(mesh: Mesh, tensor_parallel: int | None) -> Mesh:
    """The mesh the sampler decodes on: ``mesh``'s devices with ``tensor_parallel`` devices on its ``tensor`` axis.

    A pure reshape of ``mesh.devices``: ``(data, fsdp, tensor)`` -> ``(data, fsdp / k, k, tensor)`` ->
    ``(data, fsdp / k, k x tensor)`` with ``k = tensor_parallel / tensor``, so the devices keep their flat
    order (one jit can take arrays on ``mesh`` and return them on the decode mesh) and each new tensor group
    is ``k`` neighbouring fsdp positions of ``tensor`` devices each. None (or ``mesh``'s tensor size): ``mesh``.
    """
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    if tensor_parallel is None or tensor_parallel == tensor:
        return mesh
    if tensor_parallel < 1 or tensor_parallel % tensor:
        raise ValueError(f"sampling.tensor_parallel ({tensor_parallel}): must be a multiple of the mesh's tensor "
                         f"size ({tensor})")
    k = tensor_parallel // tensor
    if fsdp % k:
        raise ValueError(f"sampling.tensor_parallel ({tensor_parallel}): folds {k} fsdp positions into each tensor "
                         f"group, so the mesh's fsdp size ({fsdp}) must be a multiple of {k}")
    devices = mesh.devices.reshape(mesh.shape["data"], fsdp // k, k, tensor).reshape(mesh.shape["data"], fsdp // k,
                                                                                     k * tensor)
    return Mesh(devices, mesh.axis_names, axis_types=mesh.axis_types)


def make_mesh(spec: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a mesh from e.g. ``{"data": 1, "fsdp": -1, "tensor": 1}``.

    One axis may be ``-1``: it takes all devices left over. Missing axes have size 1.
    """
    spec = dict(spec or {"fsdp": -1})
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axis {unknown[0]!r}; mesh axes are {list(MESH_AXES)}")
    devices = list(devices if devices is not None else jax.devices())
    sizes = {axis: int(spec.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {free}")
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{axis}: size must be a positive integer or -1, got {size}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh: {len(devices)} devices cannot be split with fixed axes {sizes} (product {fixed})"
            )
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(f"mesh: axis sizes {sizes} multiply to {total}, but there are {len(devices)} devices")
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # pragma: no cover - topologies mesh_utils does not know
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def single_device_mesh() -> Mesh:
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def logical_to_pspec(
    logical_axes: Sequence[str | None],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec on ``mesh``.

    A dimension whose size is not divisible by the mesh axes it maps to is replicated instead
    (tiny test models, odd vocabularies), and a mesh axis is never used twice in one spec.
    """
    table = dict(rules)
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for dim, name in enumerate(logical_axes):
        target = table.get(name) if name is not None else None
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        if axes and shape is not None and shape[dim] % math.prod(mesh.shape[a] for a in axes):
            axes = ()
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*out)


def named_sharding(
    logical_axes: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES, shape: Sequence[int] | None = None
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_pspec(logical_axes, mesh, rules, shape))


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many data-parallel shards a batch is split into: the size of the mesh axes ``batch`` maps to."""
    target = dict(rules).get("batch")
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    return math.prod(mesh.shape.get(axis, 1) for axis in axes)


def micro_batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """A ``[micro_steps, rows, ...]`` training batch: rows split over the data-parallel shards."""
    return named_sharding((None, "batch") + (None,) * (ndim - 2), mesh, rules)


def rows_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """A ``[rows, ...]`` batch (evaluation, generation): rows split over the data-parallel shards."""
    return named_sharding(("batch",) + (None,) * (ndim - 1), mesh, rules)


def place(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Put a host array on devices with ``sharding``; each process supplies only its own shards."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def local_batch_shards(mesh: Mesh, shards: int, rules: Rules = DEFAULT_RULES) -> list[int]:
    """Which of the ``shards`` equal blocks of a ``"batch"``-sharded axis this process's devices hold.

    Sorted block ids; all of ``range(shards)`` in a single-process run. A process builds only these
    rows of a global batch and assembles the global array with :func:`place_local`.
    """
    sharding = named_sharding(("batch",), mesh, rules)
    blocks: set[int] = set()
    for index in sharding.addressable_devices_indices_map((shards,)).values():
        start, stop, _ = index[0].indices(shards)
        blocks.update(range(start, stop))
    return sorted(blocks)


def place_local(local: np.ndarray, sharding: NamedSharding, global_shape) -> jax.Array:
    """The global array of ``global_shape`` from this process's part of it.

    ``local`` holds, along each sharded axis, the blocks this process's devices address, in
    increasing order (for the batch axis: the blocks :func:`local_batch_shards` names, concatenated);
    along unsharded axes it is complete. With one process ``local`` is the whole array.
    """
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def to_host(array) -> np.ndarray:
    """The full value of a jax.Array as numpy, on every process.

    An array spread over several processes' devices is gathered (a collective: every process must
    call this); fully replicated or process-local arrays are simply fetched.
    """
    if isinstance(array, jax.Array) and not array.is_fully_addressable and not array.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


def shardings_on(tree, mesh: Mesh):
    """Each leaf's own NamedSharding on ``mesh``, or replicated for leaves placed elsewhere (scalars)."""

    def pick(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return sharding
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(pick, tree)
