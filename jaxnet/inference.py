"""Batch inference over any number of inputs, in fixed-size chunks.

``predict`` runs a network over ``(n, *example)`` inputs ``batch_size`` at a time: a NumPy
array, a memory-mapped ``.npy`` file larger than memory, or a JAX array. Every chunk has the same
shape (the last one is padded), so **one compiled program** serves every chunk and every later
call with as many inputs or more. Only a chunk or two is on the host and the device at a time;
the outputs go into a preallocated array (``out=``) or straight into a ``.npy`` file
(``predict_to_file``, written atomically).

With a mesh (``predict(..., mesh=jaxnet.sharding.make_mesh(...))``) the params are laid out
over its devices by :func:`jaxnet.sharding.param_specs` (a model larger than one device) and
each chunk's rows are split over ``data`` and ``fsdp``; XLA inserts the collectives.

>>> import jax, numpy as np, jaxnet as jn
>>> net = jn.serial(jn.Flatten(), jn.Dense(32), jn.relu, jn.Dense(10))
>>> params = net.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
>>> jn.predict_proba(net, params, np.ones((1000, 8, 8, 1), np.float32), batch_size=256).shape
(1000, 10)
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxnet.data_parallel as data_parallel
import jaxnet.sharding as sharding
from jaxnet._xla import options as xla_options
from jaxnet.nn.layer import Layer, Params, State, shape_str, state_or_empty
from jaxnet.nn.shapes import describe_input, infer_batch_ndim
from jaxnet.validate import positive_int
from jaxnet.precision import Policy, apply_with_policy, check_params, get_policy
from jaxnet.tensorfile import current_umask, fsync_directory

Preprocess = Callable[[np.ndarray], np.ndarray]


def _forward(params, model_state, x, *, net: Layer, proba: bool, policy: Policy | None = None):
    y, _ = apply_with_policy(net, policy, params, model_state, x, batch_ndim=1)
    return jax.nn.softmax(y, axis=-1) if proba else y


@functools.cache
def _compiled_forward(large: bool = False):
    """The jitted :func:`_forward` for chunks of at least ``LARGE_FORWARD_ROWS`` rows or fewer
    (see :mod:`jaxnet._xla.options`); built at first use, when JAX's backend may start."""
    return xla_options.jit(_forward, static_argnames=("net", "proba", "policy"),
                           forward_rows=xla_options.LARGE_FORWARD_ROWS if large else None)


@functools.lru_cache(maxsize=16)
def _sharded_forward(large: bool, mesh: Mesh):
    """:func:`_compiled_forward` for params and chunks placed on ``mesh``: the inputs' layouts
    are theirs, the outputs' rows split as the chunks' are (:func:`jaxnet.sharding.batch_sharding`).
    ``large``: at least ``LARGE_FORWARD_ROWS`` rows per device."""
    return xla_options.jit(_forward, static_argnames=("net", "proba", "policy"),
                           forward_rows=xla_options.LARGE_FORWARD_ROWS if large else None,
                           out_shardings=sharding.batch_sharding(mesh))


@functools.lru_cache(maxsize=64)
def _output_spec(net: Layer, proba: bool, chunk: tuple, policy: Policy | None = None):
    """Shape and dtype of one chunk's outputs (params were already checked to fit); ``chunk``
    is a chunk's :func:`_spec_signature`."""
    spec = _as_specs(chunk)
    params, state = jax.eval_shape(lambda k: net.init_with_state(k, spec), jax.random.key(0))
    return jax.eval_shape(functools.partial(_forward, net=net, proba=proba, policy=policy),
                          params, state, spec)


def _signature(tree) -> tuple:
    """A hashable stand-in for a tree of arrays (params, state, inputs): its structure, shapes
    and dtypes."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(np.shape(leaf)), jnp.dtype(leaf.dtype)) for leaf in leaves)


def _as_specs(signature: tuple):
    """The tree of ``ShapeDtypeStruct`` a :func:`_signature` stands for."""
    treedef, leaves = signature
    return treedef.unflatten([jax.ShapeDtypeStruct(*leaf) for leaf in leaves])


@functools.lru_cache(maxsize=256)
def _batch_ndim(net: Layer, x: tuple, params: tuple, state: tuple) -> int:
    """``infer_batch_ndim`` on the trees' signatures, cached: a repeated call costs nothing.

    Raises its errors, which name the layer and the shapes."""
    return infer_batch_ndim(net, _as_specs(params), _as_specs(state), _as_specs(x))


def chunk_size(n: int, batch_size: int) -> int:
    """Rows per compiled call: ``batch_size``, or for fewer inputs the next power of two >= n.

    Rounding small ``n`` up keeps calls with different small counts to a handful of programs
    (at most ``log2(batch_size)``) while padding at most twice the work.
    """
    return batch_size if n >= batch_size else min(batch_size, 1 << max(n - 1, 0).bit_length())


class _Plan:
    """What ``predict`` checked before any work: sizes, example shape and dtype, output spec."""

    def __init__(self, net, params, x, model_state, batch_size, proba, preprocess, precision=None,
                 mesh=None, rules=None):
        _check_mesh(params, mesh, rules)
        policy = get_policy(precision)
        check_params(policy, params, "predict")
        x = jax.tree.map(lambda leaf: leaf if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
                         else np.asarray(leaf), x)
        self.n = _num_rows(x)
        positive_int("predict", "batch_size", batch_size)
        model_state = state_or_empty(net, model_state, "predict")
        self.x, self.preprocess = x, preprocess
        self.on_device = all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(x))
        self.chunk = chunk_size(self.n, int(batch_size))
        if mesh is not None:  # an equal share of each chunk for every row part
            parts = sharding.batch_devices(mesh)
            self.chunk = -(-self.chunk // parts) * parts
        # examples: a tree of ShapeDtypeStruct (no rows); float64 is float32 unless x64 is on
        self.examples = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
            tuple(leaf.shape[1:]), jax.dtypes.canonicalize_dtype(leaf.dtype)), self._example(x))
        spec = self._rows(self.n)
        try:
            batch_ndim = _batch_ndim(net, _signature(spec), _signature(params),
                                     _signature(model_state))
        except TypeError:
            # The rank search meets a dtype error first at rank 0, and would report the shape
            # of that probe; the conventional reading (n, *example) names the real one.
            net.output_shape(self._rows(1))
            raise
        if batch_ndim == 0:
            raise ValueError(
                f"predict: x must be (n, *example) inputs; the network reads all of x, shape "
                f"{describe_input(spec)}, as a single example (for one example, pass x[None])")
        y = _output_spec(net, proba, _signature(self._rows(self.chunk)), policy)
        self.output = jax.ShapeDtypeStruct((self.n,) + y.shape[1:], y.dtype)
        # on the device(s) once, not with every chunk
        if mesh is None:
            self.rows = None
            self.params, self.model_state = jax.device_put((params, model_state))
            forward = _compiled_forward(self.chunk >= xla_options.LARGE_FORWARD_ROWS)
        else:
            self.rows = sharding.batch_sharding(mesh)
            self.params, self.model_state = _placed_params(params, mesh, rules), sharding.place(
                model_state, jax.tree.map(lambda _: data_parallel.replicated(mesh), model_state))
            forward = _sharded_forward(self.chunk // sharding.batch_devices(mesh)
                                       >= xla_options.LARGE_FORWARD_ROWS, mesh)
        self.run = functools.partial(forward, net=net, proba=proba, policy=policy)

    def _rows(self, n: int):
        """The spec of ``n`` inputs: ``(n, *example)`` for every leaf."""
        return jax.tree.map(lambda e: jax.ShapeDtypeStruct((n,) + e.shape, e.dtype), self.examples)

    def _example(self, x):
        if self.preprocess is None:
            return x
        return self._preprocessed(0, min(self.n, 1))  # to see what the chunks will become

    def _preprocessed(self, start: int, stop: int):
        part = jax.tree.map(lambda leaf: leaf[start:stop], self.x)
        if self.preprocess is not None:
            part = self.preprocess(part)
            rows = {getattr(leaf, "shape", (None,))[:1] for leaf in jax.tree.leaves(part)}
            if rows != {(stop - start,)}:
                raise ValueError(f"predict: preprocess must return one row per input row; given "
                                 f"{stop - start} rows it returned shape {describe_input(part)}")
        return part

    def device_chunks(self) -> Iterator[tuple[int, int, jax.Array]]:
        """``(start, stop, chunk)`` with every chunk ``(self.chunk, *example)`` on the device."""
        for start in range(0, self.n, self.chunk):
            stop = min(start + self.chunk, self.n)
            part = self._preprocessed(start, stop)
            shapes = jax.tree.map(lambda leaf: tuple(leaf.shape[1:]), part)
            if shapes != jax.tree.map(lambda e: e.shape, self.examples):
                got = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), part)
                raise ValueError(f"predict: rows {start}:{stop} have examples of shape "
                                 f"{describe_input(got)}, the first ones "
                                 f"{describe_input(self.examples)}")
            if self.on_device:
                part = jax.tree.map(lambda leaf, e: _pad(jnp.asarray(leaf, e.dtype), self.chunk,
                                                         jnp), part, self.examples)
                yield start, stop, part if self.rows is None else jax.device_put(part, self.rows)
            else:  # device_put returns at once; the copy runs while earlier chunks compute
                yield start, stop, jax.device_put(jax.tree.map(
                    lambda leaf: _pad(np.asarray(leaf), self.chunk, np), part), self.rows)

    def outputs(self) -> Iterator[tuple[int, int, jax.Array]]:
        """``(start, stop, y)``, each yielded only after the next chunk has been dispatched,
        so that the device computes chunk k+1 while the host reads chunk k's result."""
        pending = None
        for start, stop, part in self.device_chunks():
            y = self.run(self.params, self.model_state, part)  # asynchronous
            if pending is not None:
                yield pending
            pending = (start, stop, y)
        if pending is not None:
            yield pending


def _check_mesh(params, mesh, rules) -> None:
    """Raises ValueError for a ``mesh`` that is not a ``Mesh``, or ``rules`` that would go
    unused: without a mesh, or with params already placed on it (their layout is kept)."""
    if mesh is None:
        if rules is not None:
            raise ValueError("predict: rules lay params out over a mesh; pass mesh too "
                             "(jaxnet.sharding.make_mesh), or leave rules out")
        return
    if not isinstance(mesh, Mesh):
        raise ValueError(f"predict: mesh must be a jax.sharding.Mesh (from "
                         f"jaxnet.sharding.make_mesh), got {type(mesh).__name__}")
    if rules is not None and sharding.placed_on(params, mesh):
        raise ValueError("predict: params are already placed on mesh, and keep their layout; "
                         "rules would be ignored: leave them out, or pass params from the host "
                         "to lay them out by rules")


def _placed_params(params, mesh: Mesh, rules):
    """``params`` as placed on ``mesh``: as given when already there, else laid out by
    :func:`jaxnet.sharding.param_specs` (host values cut, arrays elsewhere moved)."""
    if sharding.placed_on(params, mesh):
        return params
    layout = jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                          sharding.param_specs(params, mesh, rules),
                          is_leaf=lambda node: isinstance(node, PartitionSpec))
    return sharding.place(params, layout)


def _num_rows(x) -> int:
    """The number of inputs of ``x``: the leading size every leaf shares."""
    leaves = jax.tree_util.tree_leaves_with_path(x)
    if not leaves:
        raise ValueError(f"predict: x holds no arrays, got {x!r}")
    if any(len(leaf.shape) == 0 for _, leaf in leaves):
        raise ValueError("predict: x must be (n, *example) inputs, got a scalar")
    sizes = {int(leaf.shape[0]) for _, leaf in leaves}
    if len(sizes) > 1:
        listed = ", ".join(f"x{jax.tree_util.keystr(path)} {leaf.shape[0]}" for path, leaf in leaves)
        raise ValueError(f"predict: every input array needs the same number of rows; found {listed}")
    return sizes.pop()


def _pad(part, rows: int, xp):
    """``part`` topped up with zero rows to ``rows`` (the compiled chunk size)."""
    missing = rows - part.shape[0]
    if not missing:
        return part
    return xp.concatenate([part, xp.zeros((missing,) + tuple(part.shape[1:]), part.dtype)])


@contextlib.contextmanager
def _progress_bar(show: bool, total: int):
    """A rich bar in the style of ``fit``'s, counting inputs; yields ``advance(rows)``."""
    if not show:
        yield lambda rows: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    bar = Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("inputs"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True))
    task = bar.add_task("predict", total=total)
    with bar:
        yield lambda rows: bar.advance(task, rows)


def _check_out(out, spec: jax.ShapeDtypeStruct) -> None:
    if not isinstance(out, np.ndarray) or not out.flags.writeable:
        raise TypeError(f"predict: out must be a writable NumPy array (or np.memmap) of shape "
                        f"{shape_str(spec.shape)}, got {type(out).__name__}")
    if out.shape != spec.shape:
        raise ValueError(f"predict: out has shape {shape_str(out.shape)}, expected "
                         f"{shape_str(spec.shape)} (n inputs, then the output of one)")
    if not np.can_cast(spec.dtype, out.dtype, "same_kind"):
        raise TypeError(f"predict: out has dtype {out.dtype}; the outputs are {spec.dtype}, which "
                        f"cannot be stored in it without changing kind")


def predict(net: Layer, params: Params, x, *, model_state: State | None = None,
            batch_size: int = 8192, proba: bool = False, progress: bool = False,
            out: np.ndarray | None = None, preprocess: Preprocess | None = None,
            precision: str | Policy | None = None, mesh: Mesh | None = None,
            rules: sharding.ShardingRules | Mapping | None = None):
    """The network's outputs for every input, computed ``batch_size`` inputs at a time.

    Equal to ``net.apply(params, x)`` in one go (evaluation mode), without ever holding more
    than a chunk or two of ``x`` on the host or the device.

    Args:
      net: the network (run in evaluation mode).
      params: its parameters.
      x: ``(n, *example)`` inputs: a NumPy array, a memory-mapped ``.npy`` file
        (``np.load(path, mmap_mode="r")``; only the chunk being read is in memory), anything
        else with ``shape``, ``dtype`` and row slicing, or a JAX array (chunks are sliced on
        the device); or a tuple or dict of such arrays sharing the leading ``n`` (a network
        with several inputs).
      model_state: the trained state, for networks with state (BatchNorm).
      batch_size: inputs per compiled call. The last chunk is padded to it, so one program
        serves every chunk, and later calls with at least ``batch_size`` inputs reuse it.
        Fewer than ``batch_size`` inputs run as one chunk padded to the next power of two.
      proba: return ``softmax`` of the outputs over the last axis (one probability per class)
        instead of logits.
      progress: show a progress bar (on stderr) counting inputs.
      out: a writable array (``np.memmap`` works) of shape ``(n, *output)`` to write the
        outputs into; its dtype must hold them (same kind). Returned.
      preprocess: applied to each chunk of ``x`` before it goes to the device, e.g. to scale
        raw ``uint8`` pixels without making a float copy of all of ``x``; maps ``(rows, ...)``
        to ``(rows, *example)`` row by row (a NumPy array for host inputs, a JAX array for
        JAX inputs).
      precision: the forward pass's policy (see :mod:`jaxnet.precision`): ``None`` (no casts),
        ``"f32"``, ``"bf16"``, ``"f16"`` or a ``Policy``; its outputs are float32.
      mesh: a ``jax.sharding.Mesh`` (:func:`jaxnet.sharding.make_mesh`) to run on, in one
        process: params already placed on it keep their layout, any others are laid out by
        :func:`jaxnet.sharding.param_specs` with ``rules``; ``model_state`` is whole on every
        device; each chunk's rows are split over ``data`` and ``fsdp`` (chunks are padded to
        a multiple of ``data * fsdp`` rows). ``None``: the default device.
      rules: with ``mesh`` and params not yet on it: how the params are laid out
        (:class:`jaxnet.sharding.ShardingRules` or ``{pattern: spec}`` overrides).

    Returns:
      ``(n, *output)``: ``out`` when given; else a NumPy array, or a JAX array when ``x`` is
      one (with ``mesh``, on the mesh's devices). The dtype is the network's output dtype
      (float32 for a float32 network).

    Raises:
      ValueError: bad ``batch_size``, a stateful network without ``model_state``, params that
        do not fit examples of ``x``'s shape (naming the shapes), ``x`` without a leading
        input axis, ``out`` of the wrong shape, ``mesh`` that is not a ``Mesh``, ``rules``
        without ``mesh`` or with params already placed on it, or ``rules`` that do not fit
        the params (see :func:`jaxnet.sharding.param_specs`).
      TypeError: inputs the network does not take (e.g. integers into ``Dense``), or ``out``
        that is not a writable NumPy array of a compatible dtype.
    """
    plan = _Plan(net, params, x, model_state, batch_size, proba, preprocess, precision, mesh,
                 rules)
    if out is not None:
        _check_out(out, plan.output)
    elif plan.on_device:
        return _predict_on_device(plan, progress)
    else:
        out = np.empty(plan.output.shape, plan.output.dtype)
    _fill(plan, out, progress)
    return out


def _fill(plan: _Plan, out: np.ndarray, progress: bool) -> None:
    with _progress_bar(progress, plan.n) as advance:
        for start, stop, y in plan.outputs():
            out[start:stop] = np.asarray(y)[:stop - start]  # waits for this chunk only
            advance(stop - start)


def _predict_on_device(plan: _Plan, progress: bool) -> jax.Array:
    if plan.n == 0:
        return jnp.zeros(plan.output.shape, plan.output.dtype)
    pieces = []
    with _progress_bar(progress, plan.n) as advance:
        for start, stop, y in plan.outputs():
            pieces.append(y if stop - start == plan.chunk else y[:stop - start])
            if progress:
                y.block_until_ready()
            advance(stop - start)
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)


def predict_proba(net: Layer, params: Params, x, **kwargs):
    """``predict(net, params, x, proba=True, ...)``: ``(n, classes)`` probabilities that sum to 1
    over the last axis. Takes the keyword arguments of :func:`predict`."""
    return predict(net, params, x, proba=True, **kwargs)


def predict_to_file(net: Layer, params: Params, x, path, *, model_state: State | None = None,
                    batch_size: int = 8192, proba: bool = False, progress: bool = False,
                    preprocess: Preprocess | None = None,
                    precision: str | Policy | None = None, mesh: Mesh | None = None,
                    rules: sharding.ShardingRules | Mapping | None = None) -> Path:
    """Writes ``predict(net, params, x, ...)`` to the ``.npy`` file ``path``, all or nothing.

    The outputs go chunk by chunk into a memory-mapped temporary file next to ``path`` (so
    neither the inputs nor the outputs need to fit in memory), which is flushed, fsynced and
    renamed to ``path`` only when every chunk is written. On any error (a bad input chunk, a full
    disk, Ctrl-C) the temporary file is removed and an existing ``path`` is left untouched.

    Args:
      net, params, x: as for :func:`predict`, and its keyword arguments except ``out``.
      path: the ``.npy`` file to write; read it back with ``np.load(path)``, or
        ``np.load(path, mmap_mode="r")`` when it is large.

    Returns:
      ``path`` as a ``Path``.
    """
    path = Path(path)
    plan = _Plan(net, params, x, model_state, batch_size, proba, preprocess, precision, mesh,
                 rules)  # checks first
    spec = plan.output
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # an ordinary file, not mkstemp's 0600
        if plan.n == 0:  # an empty array cannot be memory-mapped
            with open(tmp, "wb") as f:
                np.save(f, np.zeros(spec.shape, spec.dtype), allow_pickle=False)
        else:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=spec.dtype, shape=spec.shape)
            _fill(plan, out, progress)
            out.flush()
            del out
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)
    return path
