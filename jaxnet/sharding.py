"""Sharded parameters: a ``data x fsdp x model`` mesh, rules mapping params to ``PartitionSpec``.

Models larger than one device are trained by splitting their params and optimizer state over
the devices, with JAX's own engine: each array gets a :class:`~jax.sharding.NamedSharding` and
the step is compiled for those layouts; XLA's SPMD partitioner inserts every collective (the
all-gathers of FSDP params, the all-reduces of tensor-parallel products and of gradients).
Nothing here communicates by itself.

The mesh has three named axes (:func:`make_mesh`):

- ``data``: batch rows are split over it, params are replicated over it (data parallel);
- ``fsdp``: batch rows are split over it too, and every large weight is split along its largest
  divisible axis (fully sharded data parallel, ZeRO-3): each device stores ``1/fsdp`` of it and
  XLA all-gathers it where it is used;
- ``model``: Megatron-style tensor parallel. Dense pairs are column- then row-parallel (the
  first's output axis, the second's input axis: one all-reduce per pair), attention's
  query/key/value projections by their output (head) axis and its output projection by its
  input axis, embedding tables by their vocabulary axis.

:func:`param_specs` maps each param (by its dotted name from :mod:`jaxnet.trees`, e.g.
``block_1.mlp.in.w``, and its shape) to a ``PartitionSpec``; user rules
(:class:`ShardingRules`) override by name pattern. The optimizer state follows its params
(:func:`state_specs`). A rule of jaxnet's own that does not divide a dimension falls back
(tensor parallel to FSDP alone, FSDP to the next largest divisible axis, then to replication);
a user rule that does not divide raises, naming the param, the pattern and the sizes.

Training on such a mesh: ``fit(..., mesh=mesh, rules=rules)``,
``make_train_step(..., mesh=mesh, rules=rules)``, ``fit_population``, ``evaluate`` and
``predict`` take the same two arguments; ``jaxnet.train.init_sharded`` creates a state
already sharded.

>>> mesh = make_mesh(data=2, fsdp=4)
>>> state, history = fit(net, params, optax.adam(1e-3), (x, y), epochs=5, mesh=mesh)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

import jaxnet.data_parallel as data_parallel
from jaxnet.trees import named_leaves, shape_str
from jaxnet.validate import positive_int

if TYPE_CHECKING:
    from jaxnet.train.state import TrainState

DATA_AXIS, FSDP_AXIS, MODEL_AXIS = data_parallel.DATA_AXIS, "fsdp", "model"
AXES = (DATA_AXIS, FSDP_AXIS, MODEL_AXIS)
BATCH_AXES = data_parallel.BATCH_AXES  # FSDP is data parallel too: batch rows go over both

# Params whose Dense-like parent has one of these names are column-parallel (output axis over
# "model"), with "out" row-parallel (input axis): attention's projections, FeedForward's pair,
# the heads of TransformerLM / TransformerClassifier. Serial Dense layers ``dense_<k>`` pair
# up: odd k column-parallel, even k row-parallel.
_COLUMN_PARENTS = {"query", "key", "value", "in", "output", "head"}
_ROW_PARENTS = {"out"}
_DENSE = re.compile(r"dense_(\d+)")


# --- the mesh -----------------------------------------------------------------------------------


def make_mesh(data: int | None = None, fsdp: int = 1, model: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, model)`` mesh over every device of every process.

    Args:
      data, fsdp, model: the axes' sizes; their product must be the number of devices.
        ``data=None`` takes what is left: ``devices // (fsdp * model)``.
      devices: the devices to use (default: all of every process). They are ordered by
        process, then id, and laid out with ``model`` varying fastest, so that tensor-parallel
        groups (the most traffic) stay within a process and ``data`` spans processes.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(data, fsdp, model)`` with ``Auto`` axes named
      ``"data"``, ``"fsdp"``, ``"model"``.

    Raises:
      ValueError: a size that is not a positive integer, or sizes whose product is not the
        number of devices (the message gives both, and a hint for simulated CPU devices).
    """
    chosen = sorted(jax.devices() if devices is None else devices,
                    key=lambda d: (d.process_index, d.id))
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"make_mesh: devices must name each device once; got {list(chosen)}")
    fsdp, model = positive_int("make_mesh", "fsdp", fsdp), positive_int("make_mesh", "model", model)
    if data is None:
        if len(chosen) % (fsdp * model):
            raise ValueError(f"make_mesh: fsdp={fsdp} x model={model} = {fsdp * model} does not "
                             f"divide the {_devices_text(chosen)}")
        data = len(chosen) // (fsdp * model)
    data = positive_int("make_mesh", "data", data)
    if data * fsdp * model != len(chosen):
        hint = (f" (for simulated CPU devices set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={data * fsdp * model} or "
                f"jax_num_cpu_devices before JAX starts)"
                if chosen[0].platform == "cpu" and data * fsdp * model > len(chosen) else "")
        raise ValueError(f"make_mesh: data={data} x fsdp={fsdp} x model={model} = "
                         f"{data * fsdp * model} devices, but there are {_devices_text(chosen)}"
                         f"{hint}")
    return Mesh(np.array(chosen).reshape(data, fsdp, model), AXES,
                axis_types=(AxisType.Auto,) * len(AXES))


def _devices_text(devices: Sequence[jax.Device]) -> str:
    kind = devices[0].platform
    return f"{len(devices)} {kind} device{'s' if len(devices) != 1 else ''}"


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` as ``{"data": 2, "fsdp": 4}``, for :func:`make_mesh` (``--mesh``).

    Raises:
      ValueError: an unknown axis, an axis given twice, or a size that is not a positive
        integer (the message quotes the text).
    """
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        if name not in AXES or name in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh must be AXIS=SIZE pairs joined by commas, axes among "
                             f"{', '.join(AXES)} (each once), sizes positive integers, e.g. "
                             f"data=2,fsdp=4; got {text!r}")
        sizes[name] = int(value)
    return sizes


def axis_size(mesh: Mesh | AbstractMesh, axis: str) -> int:
    """The size of ``axis`` in ``mesh``; 1 when the mesh has no such axis (a ``data_mesh``)."""
    return dict(mesh.shape).get(axis, 1)


batch_sharding = data_parallel.row_sharding  # rows split over data and fsdp
batch_devices = data_parallel.row_devices  # how many parts each batch is split into


# --- rules --------------------------------------------------------------------------------------

Pattern = str | re.Pattern


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """How :func:`param_specs` lays out params.

    Attributes:
      overrides: ``(pattern, spec)`` pairs, the first match wins over jaxnet's own rules. A
        ``str`` pattern is a glob (``fnmatch``: ``*`` matches across ``.`` too) on the param's
        dotted name (``block_1.mlp.in.w``), with ``/`` accepted for ``.``
        (``block_*/mlp/in/w``); a compiled ``re.Pattern`` must match the whole dotted name. A
        spec is a ``PartitionSpec`` (or a tuple of axis names / ``None`` per dimension);
        ``PartitionSpec()`` replicates.
      fsdp_min_size: params with fewer elements stay replicated on ``fsdp`` (biases, norm
        scales: splitting them saves little and adds collectives).
      tensor_parallel: apply jaxnet's tensor-parallel rules over ``model``.
    """

    overrides: tuple[tuple[Pattern, PartitionSpec], ...] = ()
    fsdp_min_size: int = 1024
    tensor_parallel: bool = True

    def __post_init__(self):
        if isinstance(self.overrides, Mapping):
            object.__setattr__(self, "overrides", tuple(self.overrides.items()))
        overrides = []
        for entry in self.overrides:
            if not (isinstance(entry, tuple) and len(entry) == 2
                    and isinstance(entry[0], (str, re.Pattern))):
                raise ValueError(f"ShardingRules: overrides must be (pattern, spec) pairs with a "
                                 f"str or re.Pattern pattern; got {entry!r}")
            pattern, spec = entry
            overrides.append((pattern, _as_spec(spec, f"ShardingRules: the spec of {pattern!r}")))
        object.__setattr__(self, "overrides", tuple(overrides))
        if isinstance(self.fsdp_min_size, bool) or not isinstance(self.fsdp_min_size, int) \
                or self.fsdp_min_size < 0:
            raise ValueError(f"ShardingRules: fsdp_min_size must be a non-negative integer, got "
                             f"{self.fsdp_min_size!r}")

    def override_for(self, name: str) -> tuple[Pattern, PartitionSpec] | None:
        """The first ``(pattern, spec)`` whose pattern matches the dotted ``name``, or None."""
        for pattern, spec in self.overrides:
            if isinstance(pattern, re.Pattern):
                if pattern.fullmatch(name):
                    return pattern, spec
            elif fnmatch.fnmatchcase(name, pattern.replace("/", ".")):
                return pattern, spec
        return None


def _as_spec(spec, what: str) -> PartitionSpec:
    if spec is None:
        return PartitionSpec()
    if isinstance(spec, PartitionSpec):
        return spec
    if isinstance(spec, (tuple, list)):
        return PartitionSpec(*spec)
    raise ValueError(f"{what} must be a PartitionSpec, a tuple of axis names or None; got "
                     f"{spec!r}")


def as_rules(rules: ShardingRules | Mapping[Pattern, Any] | None) -> ShardingRules:
    """``rules`` as :class:`ShardingRules`: ``None`` gives the defaults, a mapping
    ``{pattern: spec}`` gives those overrides with the default rules underneath."""
    if rules is None:
        return ShardingRules()
    if isinstance(rules, ShardingRules):
        return rules
    if isinstance(rules, Mapping):
        return ShardingRules(overrides=tuple(rules.items()))
    raise ValueError(f"rules must be None, a ShardingRules or a mapping of name patterns to "
                     f"PartitionSpecs; got {type(rules).__name__}")


def param_specs(params, mesh: Mesh | AbstractMesh,
                rules: ShardingRules | Mapping[Pattern, Any] | None = None):
    """A ``PartitionSpec`` for every param: the tree of ``params`` with specs as leaves.

    Args:
      params: the network's params (arrays or ``jax.ShapeDtypeStruct``: shapes are enough).
      mesh: a mesh from :func:`make_mesh` (an ``AbstractMesh`` of the same axes will do); axes
        it lacks count as size 1, so a 1-D ``data_mesh`` gives every param ``P()``.
      rules: :class:`ShardingRules`, or a mapping ``{pattern: spec}`` of overrides.

    Returns:
      A pytree like ``params`` whose leaves are ``PartitionSpec`` (``P()``: replicated).

    Raises:
      ValueError: an override names an axis the mesh lacks, has more entries than the param
        has dimensions, uses an axis twice, or splits a dimension that the axis' size does not
        divide (each message names the param, its shape, the pattern and the sizes).
    """
    rules = as_rules(rules)
    roles = _dense_roles(params)

    def spec(name: str, shape: tuple[int, ...]) -> PartitionSpec:
        found = rules.override_for(name)
        if found is not None:
            return _checked_override(name, shape, *found, mesh)
        return _default_spec(name, shape, roles, mesh, rules)

    return jax.tree.unflatten(jax.tree.structure(params), [
        spec(name, tuple(np.shape(leaf))) for name, leaf in named_leaves(params)])


def _checked_override(name: str, shape: tuple[int, ...], pattern: Pattern, spec: PartitionSpec,
                      mesh) -> PartitionSpec:
    where = f"sharding rule '{getattr(pattern, 'pattern', pattern)}' for {name} {shape_str(shape)}"
    if len(spec) > len(shape):
        raise ValueError(f"{where}: {spec} has {len(spec)} entries, the param has "
                         f"{len(shape)} dimension{'s' if len(shape) != 1 else ''}")
    used = []
    for dim, entry in zip(shape, spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        for axis in axes:
            if axis not in mesh.axis_names:
                raise ValueError(f"{where}: the mesh has no axis {axis!r} (its axes: "
                                 f"{', '.join(mesh.axis_names)})")
        used += axes
        parts = math.prod(axis_size(mesh, a) for a in axes)
        if dim % parts:
            raise ValueError(f"{where}: dimension {dim} does not split over "
                             f"{' x '.join(f'{a}={axis_size(mesh, a)}' for a in axes)} "
                             f"({parts} parts)")
    if len(set(used)) != len(used):
        raise ValueError(f"{where}: {spec} uses a mesh axis twice")
    return spec


def _dense_roles(params) -> dict[str, str]:
    """``{dotted name of a Dense-like dict: "column" | "row"}`` by jaxnet's naming.

    A Dense-like dict holds a 2-D ``w`` (and maybe a 1-D ``b``). Attention's ``query``/
    ``key``/``value``, FeedForward's ``in`` and a model's ``output``/``head`` are column-parallel,
    ``out`` row-parallel; ``dense_<k>`` siblings pair up, odd ``k`` column, even ``k`` row.
    """
    roles = {}

    def visit(node, path):
        if not isinstance(node, Mapping):
            return
        for key, child in node.items():
            name = ".".join((*path, str(key)))
            if isinstance(child, Mapping) and _is_dense_like(child):
                role = _role_of(str(key))
                if role:
                    roles[name] = role
            visit(child, (*path, str(key)))

    visit(params, ())
    return roles


def _is_dense_like(node: Mapping) -> bool:
    w = node.get("w")
    return (w is not None and len(np.shape(w)) == 2 and set(node) <= {"w", "b"}
            and ("b" not in node or len(np.shape(node["b"])) == 1))


def _role_of(key: str) -> str | None:
    if key in _COLUMN_PARENTS:
        return "column"
    if key in _ROW_PARENTS:
        return "row"
    if match := _DENSE.fullmatch(key):
        return "column" if int(match.group(1)) % 2 else "row"
    return None


def _default_spec(name: str, shape: tuple[int, ...], roles: Mapping[str, str], mesh,
                  rules: ShardingRules) -> PartitionSpec:
    """jaxnet's own layout of one param: tensor parallel first, then FSDP on another axis."""
    axes: list[str | None] = [None] * len(shape)
    model = axis_size(mesh, MODEL_AXIS)
    if rules.tensor_parallel and model > 1:
        dim = _tensor_parallel_dim(name, shape, roles)
        if dim is not None and shape[dim] % model == 0:
            axes[dim] = MODEL_AXIS
    fsdp = axis_size(mesh, FSDP_AXIS)
    if fsdp > 1 and math.prod(shape) >= max(rules.fsdp_min_size, 1):
        free = [d for d in range(len(shape)) if axes[d] is None and shape[d] % fsdp == 0]
        if free:  # the largest divisible axis; the first of equal ones
            axes[max(free, key=lambda d: (shape[d], -d))] = FSDP_AXIS
    while axes and axes[-1] is None:  # P("fsdp") rather than P("fsdp", None)
        axes.pop()
    return PartitionSpec(*axes)


def _tensor_parallel_dim(name: str, shape: tuple[int, ...], roles: Mapping[str, str]) -> int | None:
    """The dimension of a param that jaxnet's rules split over ``model``, or None."""
    parent, _, leaf = name.rpartition(".")
    role = roles.get(parent)
    if role is not None and leaf == "w":
        return 1 if role == "column" else 0
    if role == "column" and leaf == "b":  # the bias of a column-parallel layer goes with its outputs
        return 0
    if leaf == "table" and parent.rpartition(".")[2] == "embedding" and len(shape) == 2:
        return 0  # the vocabulary axis: the tied output projection's logits split alike
    return None


# --- the training state -------------------------------------------------------------------------


_STATE_FIELDS = ("params", "model_state", "opt_state", "step", "key")  # TrainState's


def state_specs(state: TrainState, specs) -> TrainState:
    """A ``TrainState`` of ``PartitionSpec``: params by ``specs``, optimizer state following.

    An optimizer-state subtree with the structure and shapes of the params (Adam's ``mu`` and
    ``nu``, momentum's ``trace``) takes the params' specs; every other leaf (step counts,
    factored second moments, injected hyperparameters) is replicated, as are the model state
    (BatchNorm statistics), the step and the key.
    """
    shapes = jax.tree.map(np.shape, state.params)
    structure = jax.tree.structure(state.params)

    def like_params(node) -> bool:
        return (jax.tree.structure(node) == structure
                and jax.tree.map(np.shape, node) == shapes)

    opt = jax.tree.map(lambda node: specs if like_params(node) else PartitionSpec(),
                       state.opt_state, is_leaf=like_params)
    replicated = lambda tree: jax.tree.map(lambda _: PartitionSpec(), tree)  # noqa: E731
    # a state with more fields (the CLI's RunState: ``best``, a TrainState) lays them out alike
    extra = {name: state_specs(value, specs) if hasattr(value, "opt_state") else replicated(value)
             for name, value in zip(state._fields, state) if name not in _STATE_FIELDS}
    return state._replace(params=specs, model_state=replicated(state.model_state),
                          opt_state=opt, step=PartitionSpec(), key=PartitionSpec(), **extra)


def state_shardings(state: TrainState, mesh: Mesh, specs) -> TrainState:
    """:func:`state_specs` as ``NamedSharding`` on ``mesh``: the ``in``/``out_shardings`` of a
    compiled step or epoch whose state is sharded."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(state, specs),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def place(tree, shardings):
    """Every leaf of ``tree`` placed with its sharding from ``shardings`` (a matching tree).

    Host arrays and arrays on one device are cut on the host: each device gets only its shard
    (every process must pass the same values). Arrays already spread over several devices (a
    state on another mesh) are resharded device to device by ``jax.device_put``, never whole on
    one host. PRNG keys keep their implementation.
    """
    def place_leaf(leaf, sharding):
        if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) > 1:
            return jax.device_put(leaf, sharding)
        if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(place_leaf(jax.random.key_data(leaf), sharding),
                                            impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place_leaf, tree, shardings)


def placed_on(tree, mesh: Mesh) -> bool:
    """Whether every leaf of ``tree`` is a ``jax.Array`` placed on ``mesh`` (by any specs)."""
    return all(isinstance(a, jax.Array) and isinstance(a.sharding, NamedSharding)
               and a.sharding.mesh == mesh for a in jax.tree.leaves(tree))


def is_sharded(tree) -> bool:
    """Whether some array of ``tree`` is split over devices (not held whole on each of them):
    such a state is checkpointed shard by shard (:mod:`jaxnet.sharded_checkpoint`)."""
    return any(isinstance(a, jax.Array) and not a.sharding.is_fully_replicated
               for a in jax.tree.leaves(tree))


def shard_params(params, mesh: Mesh, rules: ShardingRules | Mapping[Pattern, Any] | None = None):
    """``params`` on ``mesh``: as they are when every array is placed there already, else
    laid out by :func:`param_specs` with ``rules`` (see :func:`place`)."""
    if placed_on(params, mesh):
        return params
    specs = param_specs(params, mesh, rules)
    return place(params, jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                                      is_leaf=lambda x: isinstance(x, PartitionSpec)))


def shard_state(state: TrainState, mesh: Mesh, specs) -> TrainState:
    """``state`` placed on ``mesh``: params by ``specs``, the optimizer state following them
    (:func:`state_specs`), the rest replicated. See :func:`place` for where values come from."""
    return place(state, state_shardings(state, mesh, specs))


# --- batches -------------------------------------------------------------------------------------


def shard_batch(mesh: Mesh, batch):
    """A batch (a host array or pytree of them, whole on every process) split by rows over
    ``data`` and ``fsdp``; each process transfers only the rows of its own devices."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda a: place(a, sharding), batch)


# --- measuring ----------------------------------------------------------------------------------


def memory_per_device(tree) -> dict[jax.Device, int]:
    """Bytes each device holds of ``tree``'s arrays, summed from their addressable shards.

    Args:
      tree: a pytree of ``jax.Array`` (placed arrays: their shards' buffers are counted) or
        ``jax.ShapeDtypeStruct`` with a sharding (their shard shapes are counted, nothing is
        allocated). Leaves of other kinds count nothing.

    Returns:
      ``{device: bytes}`` over the devices of this process that hold part of ``tree``.
    """
    totals: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            parts = [(s.device, s.data.nbytes) for s in leaf.addressable_shards]
        elif isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None:
            itemsize = np.dtype(leaf.dtype).itemsize
            shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize
            parts = [(d, shard) for d in leaf.sharding.addressable_devices]
        else:
            continue
        for device, nbytes in parts:
            totals[device] = totals.get(device, 0) + int(nbytes)
    return totals
