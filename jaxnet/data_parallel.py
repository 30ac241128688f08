"""Data parallelism on JAX's own engine: a ``data`` mesh, sharded training rows, multi-host start.

Nothing here communicates by itself. Arrays are laid out with ``jax.sharding`` (a 1-D
:class:`~jax.sharding.Mesh` whose axis is named ``"data"``, :class:`~jax.sharding.NamedSharding`)
and the jitted epoch is compiled for that layout; XLA's SPMD partitioner then inserts every
collective (the gradient all-reduce, the all-gather behind the epoch's shuffle). Several hosts
join one JAX cluster with ``jax.distributed.initialize``.

The layout ``fit(..., mesh=mesh)`` uses:

- params, model state and optimizer state: replicated on every device (``P()``);
- training rows: padded to a multiple of the mesh's size and split into contiguous blocks over
  ``data`` (``P("data")``); process ``p`` supplies only its block
  (:func:`process_rows`), assembled with ``jax.make_array_from_process_local_data``. The padding
  rows are never drawn: the shuffle is a permutation of the ``n`` real rows;
- each step's batch: split over ``data`` (``P(None, "data")`` on the epoch's
  ``(batches, batch_size, ...)`` array), so ``batch_size`` must be a multiple of the mesh size.

The shuffle is one global permutation of all ``n`` examples, drawn identically on every device
from ``(key, epoch)``, exactly as on one device; the jitted gather of the shuffled epoch reads
the sharded rows, for which XLA all-gathers them once per epoch. So the batches, the loss (a
mean over the whole batch) and BatchNorm's statistics (over the whole batch) are those of a
one-device run, and results agree with it up to float rounding whatever the number of devices
or processes.

>>> mesh = data_mesh()                       # every device of every process
>>> state, history = fit(net, params, optimizer, (x, y), epochs=10, batch_size=256, mesh=mesh)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
BATCH_AXES = (DATA_AXIS, "fsdp")  # rows are split over these (where the mesh has them)
ENV_COORDINATOR = "JAXNET_COORDINATOR"
ENV_NUM_PROCESSES = "JAXNET_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXNET_PROCESS_ID"


# --- meshes -------------------------------------------------------------------------------------


def data_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` for data-parallel training.

    Args:
      devices: ``None``: every device of every process; an int ``N``: the first ``N`` local
        devices of each process (so ``N * jax.process_count()`` in all); or a sequence of
        devices. Devices are ordered by process, so that each process's devices hold one
        contiguous block of rows.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(devices,)`` with an ``Auto`` axis named ``"data"``.

    Raises:
      ValueError: ``devices`` is not a positive integer, asks for more local devices than there
        are, or names a device twice; processes with different numbers of devices.
    """
    if devices is None or isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        per_process = _local_device_count(devices)
        chosen = [d for p in range(jax.process_count())
                  for d in sorted(_devices_of(p), key=lambda d: d.id)[:per_process]]
    elif isinstance(devices, Sequence) and devices and all(isinstance(d, jax.Device)
                                                         for d in devices):
        chosen = sorted(devices, key=lambda d: (d.process_index, d.id))
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"data_mesh: devices names a device twice: {list(devices)}")
        counts = {p: sum(d.process_index == p for d in chosen) for p in range(jax.process_count())}
        if len(set(counts.values())) != 1:
            raise ValueError(f"data_mesh: every process needs the same number of devices; got "
                             f"{counts} (process: devices)")
    else:
        raise ValueError(f"data_mesh: devices must be None, a positive integer or a sequence of "
                         f"jax devices; got {devices!r}")
    return Mesh(np.array(chosen), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def _local_device_count(devices: int | None) -> int:
    available = jax.local_device_count()
    if devices is None:
        return available
    if devices < 1:
        raise ValueError(f"devices must be a positive integer, got {devices}")
    if devices > available:
        kind = jax.local_devices()[0].platform
        hint = (" (for simulated CPU devices set XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{devices} before starting)" if kind == "cpu" else "")
        raise ValueError(f"devices: asked for {devices} devices but this process has only "
                         f"{available} {kind} device{'s' if available > 1 else ''}{hint}")
    return int(devices)


def _devices_of(process: int) -> list[jax.Device]:
    return [d for d in jax.devices() if d.process_index == process]


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array held whole on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def row_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that batch rows are split over: ``data``, and ``fsdp`` where the mesh has
    it (:mod:`jaxnet.sharding`: FSDP is data parallel too); never ``model``."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def row_devices(mesh: Mesh) -> int:
    """How many parts the rows are split into: the product of the :func:`row_axes` sizes."""
    sizes = dict(mesh.shape)
    return int(np.prod([sizes[a] for a in row_axes(mesh)]))


def row_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Axis ``leading`` split over the mesh's :func:`row_axes`; the other axes are not split.

    ``row_sharding(mesh)`` splits rows ``(n, ...)``; ``row_sharding(mesh, 1)`` splits each batch
    of an epoch ``(batches, batch_size, ...)``.
    """
    axes = row_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), axes[0] if len(axes) == 1
                                             else axes))


def check_batch_size(mesh: Mesh, batch_size: int, what: str = "batch_size") -> None:
    """Raises ValueError unless ``batch_size`` splits evenly over the :func:`row_devices`."""
    devices = row_devices(mesh)
    if batch_size % devices:
        below, above = batch_size // devices * devices, -(-batch_size // devices) * devices
        options = f"{below} or {above}" if below else f"{above}"
        split = "" if devices == mesh.size else f" ({' x '.join(row_axes(mesh))})"
        raise ValueError(f"{what} {batch_size} does not split evenly over {devices} "
                         f"devices{split}; use a multiple of {devices}, e.g. {options}")


def round_up_to_devices(mesh: Mesh, size: int) -> int:
    """``size`` rounded up to a multiple of :func:`row_devices` (for masked evaluation batches)."""
    return -(-size // row_devices(mesh)) * row_devices(mesh)


# --- placing arrays -----------------------------------------------------------------------------


def padded_rows(n: int, mesh: Mesh) -> int:
    """The number of rows of the placed training arrays: ``n`` rounded up to a multiple of
    :func:`row_devices`."""
    return round_up_to_devices(mesh, max(n, 1))


def process_rows(n: int, mesh: Mesh, process: int | None = None) -> slice:
    """The contiguous rows of ``n`` that ``process`` (default: this one) supplies to the mesh.

    Process ``p`` holds block ``p`` of the padded rows; the slice is clipped to ``n`` (the last
    blocks may hold padding only).
    """
    process = jax.process_index() if process is None else process
    _check_process_blocks(mesh)
    per_process = padded_rows(n, mesh) // _process_count(mesh)
    return slice(min(process * per_process, n), min((process + 1) * per_process, n))


def _check_process_blocks(mesh: Mesh) -> None:
    """Raises ValueError when a block of rows belongs to devices of several processes (a
    ``model`` axis spanning processes): no process could then supply its rows alone."""
    axes = [mesh.axis_names.index(a) for a in row_axes(mesh)]
    blocks = np.moveaxis(mesh.devices, axes, range(len(axes))).reshape(row_devices(mesh), -1)
    for i, block in enumerate(blocks):
        owners = sorted({d.process_index for d in block})
        if len(owners) > 1:
            raise ValueError(f"row block {i} of {len(blocks)} is split over processes {owners}: "
                             f"each process supplies only its rows when every block of "
                             f"{' x '.join(row_axes(mesh))} lies in one process; make the "
                             f"mesh's model axis at most {len(jax.local_devices())} (the devices "
                             "per process), or have every process load all rows")


def _process_count(mesh: Mesh) -> int:
    return len({d.process_index for d in mesh.devices.flat})


def shard_rows(mesh: Mesh, local: np.ndarray, n: int) -> jax.Array:
    """A global ``(padded_rows(n, mesh), ...)`` array split by rows over the mesh's
    :func:`row_axes` (replicated over ``model``).

    Args:
      mesh: from :func:`data_mesh` or :func:`jaxnet.sharding.make_mesh`.
      local: this process's rows only, ``local = all_rows[process_rows(n, mesh)]``; a host array.
      n: the number of real rows over all processes.

    Returns:
      A ``jax.Array`` sharded by :func:`row_sharding`, assembled from every process's ``local`` with
      ``jax.make_array_from_process_local_data``; rows ``n`` and beyond are zeros.
    """
    local = np.asarray(local)
    rows = process_rows(n, mesh)
    if local.shape[0] != rows.stop - rows.start:
        raise ValueError(f"shard_rows: this process (index {jax.process_index()}) supplies rows "
                         f"{rows.start}:{rows.stop} of {n}, that is {rows.stop - rows.start}, "
                         f"but local has {local.shape[0]}")
    total = padded_rows(n, mesh)
    per_process = total // _process_count(mesh)
    padding = np.zeros((per_process - local.shape[0], *local.shape[1:]), local.dtype)
    return jax.make_array_from_process_local_data(
        row_sharding(mesh), np.concatenate([local, padding]), (total, *local.shape[1:]))


def place_rows(mesh: Mesh, rows: np.ndarray) -> jax.Array:
    """:func:`shard_rows` of an array every process holds whole; each uses only its block."""
    rows = np.asarray(rows)
    return shard_rows(mesh, rows[process_rows(rows.shape[0], mesh)], rows.shape[0])


def replicate(mesh: Mesh, tree):
    """Every leaf of ``tree`` held whole on every device of ``mesh`` (new buffers).

    Leaves go through the host, so single-device arrays (a restored checkpoint, a fresh
    ``TrainState``) and arrays of another mesh (a checkpoint saved on N devices, restored on M)
    are placed alike; every process must pass the same values. PRNG keys keep their
    implementation.
    """
    sharding = replicated(mesh)

    def place(leaf):
        if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
            data = place(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        # a host copy: on CPU, device_put may keep using the host array's memory
        return jax.device_put(np.array(leaf), sharding)

    return jax.tree.map(place, tree)


# --- several processes --------------------------------------------------------------------------


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, environ: Mapping[str, str] | None = None,
               timeout_seconds: int = 300) -> bool:
    """Joins this process to a JAX cluster with ``jax.distributed.initialize``, when asked to.

    Each setting comes from its argument or else from the environment: ``JAXNET_COORDINATOR``
    (``HOST:PORT`` of process 0), ``JAXNET_NUM_PROCESSES``, ``JAXNET_PROCESS_ID``. With none of
    them set, and JAX's own ``JAX_COORDINATOR_ADDRESS`` unset too, this is a one-process run and
    nothing happens. With ``JAX_COORDINATOR_ADDRESS`` set, JAX fills in what is missing itself
    (from Slurm, Open MPI, Kubernetes or TPU environments). Call it before anything else uses
    JAX (before ``jax.devices()`` or any computation).

    Args:
      coordinator: ``HOST:PORT`` where process 0 serves the cluster's coordinator; the same on
        every process.
      num_processes: the number of processes in the cluster.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      environ: where to read the ``JAXNET_*`` variables (default ``os.environ``).
      timeout_seconds: how long to wait for the other processes to connect.

    Returns:
      True when a cluster was joined, False for a one-process run.

    Raises:
      ValueError: some settings given but not all, or malformed ones (named, with the value).
      RuntimeError: JAX was already used in this process.
    """
    environ = os.environ if environ is None else environ
    coordinator = coordinator if coordinator is not None else environ.get(ENV_COORDINATOR)
    num_processes = _int_setting(num_processes, environ, ENV_NUM_PROCESSES, "num_processes")
    process_id = _int_setting(process_id, environ, ENV_PROCESS_ID, "process_id")
    settings = {"coordinator": coordinator, "num_processes": num_processes,
                "process_id": process_id}
    given = {name for name, value in settings.items() if value is not None}
    jax_own = bool(environ.get("JAX_COORDINATOR_ADDRESS"))
    if not given and not jax_own:
        return False
    if given and given != set(settings) and not jax_own:
        missing = ", ".join(f"`{name}`" for name in settings if name not in given)
        raise ValueError(f"a multi-process run needs `coordinator`, `num_processes` and "
                         f"`process_id` (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
                         f"{ENV_PROCESS_ID}); missing {missing}")
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"coordinator must be HOST:PORT (e.g. 10.0.0.1:1234), got "
                             f"{coordinator!r}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes}")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise ValueError(f"process_id must be in [0, {num_processes}) for {num_processes} "
                         f"processes, got {process_id}")
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=timeout_seconds)
    return True


def _int_setting(value: int | None, environ: Mapping[str, str], variable: str,
                 name: str) -> int | None:
    if value is not None:
        return value
    text = environ.get(variable)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{variable} ({name}) must be an integer, got {text!r}") from None


def is_main_process() -> bool:
    """True in process 0, the one that writes files (always True in a one-process run)."""
    return jax.process_index() == 0


def describe(mesh: Mesh) -> dict:
    """What a run recorded about where it ran: devices, processes, platform, device kind, and
    the axes of a mesh that is not a 1-D ``data`` mesh."""
    first = mesh.devices.flat[0]
    axes = {} if mesh.axis_names == (DATA_AXIS,) else {
        "axes": {name: int(size) for name, size in mesh.shape.items()}}
    return {"devices": int(mesh.size), "processes": _process_count(mesh),
            "platform": first.platform, "device_kind": first.device_kind, **axes}
