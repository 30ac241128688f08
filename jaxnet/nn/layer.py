"""The layer contract: a network is an immutable description plus pure functions.

Every layer is a frozen, hashable dataclass deriving from :class:`Layer`. It
implements two private methods that always see exactly one leading batch axis:

* ``_init(key, x, path) -> (params, state)`` where ``x`` is a
  ``jax.ShapeDtypeStruct`` of shape ``(batch, *example)``. It validates the
  input (rank, width, dtype) and raises :class:`ShapeError` / ``TypeError``
  naming ``path``.
* ``_apply(params, state, x, ctx) -> (y, state)`` where ``ctx`` is a
  :class:`Context` carrying the layer's path, the train flag and the RNG key.

The public methods (``init``, ``apply``, ...) add what users rely on: shape
inference with ``jax.eval_shape``, validation of a params tree against the
architecture, and support for any number of leading batch axes (one example,
a batch, or under ``jax.vmap``). All of it happens at trace time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = dict[str, Any]
State = dict[str, Any]


class ShapeError(ValueError):
    """An input or a parameter tree has the wrong shape for a layer."""


class Context(NamedTuple):
    """What a layer's ``_apply`` needs besides params, state and input.

    Attributes:
      path: the layer's name in the network, e.g. ``"encoder/dense_2"``.
      train: training mode (dropout active, batch statistics used).
      key: a PRNG key for stochastic layers, or ``None``.
      record: when not ``None``, a list that leaf layers append summary rows to.
      drop_rate: when not ``None``, a float32 scalar (possibly traced) that replaces every
        Dropout layer's own rate.
      reverse_only: the caller differentiates this call in reverse mode only, so layers may
        compute their gradients with custom VJPs (faster on XLA:CPU; no forward mode).
    """

    path: str
    train: bool = False
    key: Array | None = None
    record: list | None = None
    drop_rate: Array | None = None
    reverse_only: bool = False

    def child(self, name: str, key: Array | None) -> Context:
        return self._replace(path=join_path(self.path, name), key=key)


def join_path(parent: str, name: str) -> str:
    """``"encoder"`` and ``"dense_1"`` give ``"encoder/dense_1"``; an empty name adds nothing."""
    if not name:
        return parent
    return f"{parent}/{name}" if parent else name


def shape_str(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


class Layer:
    """Base of all jaxnet layers.

    Subclasses are ``@dataclass(frozen=True)`` so that a network description is
    immutable, hashable (a valid static argument to ``jax.jit``), comparable and
    printable. ``kind`` is the prefix of automatic names (``dense`` gives
    ``dense_1``, ``dense_2``, ...).
    """

    kind: ClassVar[str] = "layer"

    # ---- protocol for subclasses -------------------------------------------------
    def children(self) -> tuple[tuple[str, Layer], ...]:
        """Named sub-layers, for composite layers; ``()`` for leaves."""
        return ()

    @property
    def has_state(self) -> bool:
        """True when the layer (or a sub-layer) keeps state such as running statistics."""
        return any(child.has_state for _, child in self.children())

    @property
    def needs_key(self) -> bool:
        """True when the layer (or a sub-layer) needs a PRNG key in training mode."""
        return any(child.needs_key for _, child in self.children())

    def _init(self, key: Array, x: jax.ShapeDtypeStruct, path: str) -> tuple[Params, State]:
        return {}, {}

    def _apply(self, params: Params, state: State, x: Array, ctx: Context) -> tuple[Array, State]:
        raise NotImplementedError

    def _flops(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...], params: Params) -> int:
        """Estimated forward FLOPs; elementwise by default."""
        return math.prod(y_shape)

    # ---- public API ----------------------------------------------------------------
    def init(self, key: Array, x) -> Params:
        """Creates the parameters for inputs like ``x``.

        Args:
          key: a PRNG key (``jax.random.key(0)``).
          x: an example batch with a leading batch axis, e.g. ``x_train[:1]`` of
            shape ``(1, 28, 28)``; or its shape as a tuple (float32 assumed), or a
            ``jax.ShapeDtypeStruct``.

        Returns:
          Nested dict of arrays, e.g. ``params["dense_1"]["w"]`` of shape
          ``(in_features, out_features)``, in the input's floating dtype (float32
          for integer inputs).
        """
        return self.init_with_state(key, x)[0]

    def init_with_state(self, key: Array, x) -> tuple[Params, State]:
        """Like :meth:`init`, also returning the initial state (e.g. BatchNorm running statistics).

        Returns:
          ``(params, state)``; ``state`` is ``{}`` for networks without stateful layers.
        """
        spec = as_spec(x)
        if spec.ndim < 1:
            raise ShapeError(
                f"{self._top_path() or 'network'}: init expects an example batch with a leading batch axis "
                f"(e.g. x[:1]); got a scalar")
        return self._init(_check_key(key), spec, self._top_path())

    def apply(self, params: Params, x: Array, *, key: Array | None = None,
              train: bool = False) -> Array:
        """Runs the network.

        Args:
          params: the tree returned by :meth:`init`.
          x: one example ``(*example)`` or inputs with any leading batch axes
            ``(*batch, *example)``; the example rank is inferred from ``params``.
          key: PRNG key, required in training mode by stochastic layers (Dropout).
          train: training mode.

        Returns:
          ``(*batch, *output)``: the output for each example.
        """
        if self.has_state:
            stateful = ", ".join(_stateful_paths(self, self._top_path()))
            raise ValueError(
                f"{self._top_path() or 'network'}: this network keeps state ({stateful}); use "
                f"init_with_state(key, x) and apply_with_state(params, state, x, ...)")
        return self.apply_with_state(params, {}, x, key=key, train=train)[0]

    def apply_with_state(self, params: Params, state: State, x: Array, *,
                         key: Array | None = None, train: bool = False,
                         drop_rate: Array | float | None = None, reverse_only: bool = False,
                         _record: list | None = None) -> tuple[Array, State]:
        """Runs the network with explicit state.

        Args:
          params: the tree returned by :meth:`init_with_state`.
          state: the state tree (returned by :meth:`init_with_state` or a previous call).
          x: ``(*batch, *example)`` inputs, as in :meth:`apply`.
          key: PRNG key for stochastic layers in training mode.
          train: training mode; stateful layers update their state only then.
          drop_rate: a float32 scalar in ``[0, 1)``, possibly traced, that replaces the rate of
            every Dropout layer built with a nonzero rate (a rate of 0 builds no dropout at all),
            so that a schedule or a population of rates needs no recompilation.
          reverse_only: promise that this call is differentiated in reverse mode only
            (``jax.grad``, ``jax.vjp``), as ``train_batch`` and ``fit`` do. ``Dense`` and ``Conv``
            then compute their weight gradients in the forms XLA:CPU runs fastest (same values;
            ``docs/performance.md``); ``jax.jvp`` of the output raises an error.

        Returns:
          ``(y, new_state)`` with ``y`` of shape ``(*batch, *output)``.
        """
        x = jnp.asarray(x)
        example_ndim = infer_example_ndim(self, params, state, x)
        batch_shape = x.shape[:x.ndim - example_ndim]
        batched = x.reshape((math.prod(batch_shape),) + x.shape[len(batch_shape):])
        if key is not None:
            key = _check_key(key)
        if drop_rate is not None:
            drop_rate = jnp.asarray(drop_rate, jnp.float32)
        ctx = Context(self._top_path(), train=train, key=key, record=_record, drop_rate=drop_rate,
                      reverse_only=reverse_only)
        y, new_state = call_layer(self, params, state, batched, ctx)
        return y.reshape(batch_shape + y.shape[1:]), new_state

    def output_shape(self, x) -> jax.ShapeDtypeStruct:
        """The output's shape and dtype for inputs like ``x`` (a batch or its shape), without computing."""
        spec = as_spec(x)
        params, state = jax.eval_shape(lambda k: self.init_with_state(k, spec), jax.random.key(0))
        y, _ = jax.eval_shape(lambda p, s, v: self.apply_with_state(p, s, v), params, state, spec)
        return y

    def __repr__(self) -> str:
        """Required fields bare, others only when not default: ``Dense(512)``, ``Conv(32, (3, 3))``."""
        parts = []
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if field.default is dataclasses.MISSING:
                parts.append(repr(value))
            elif value != field.default and not (
                    isinstance(value, tuple) and value and set(value) == {field.default}):
                parts.append(f"{field.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _top_path(self) -> str:
        """The path of this layer when it is the whole network: its kind for a leaf;
        empty for a composite, so that its children are named ``dense_1``, not ``serial/dense_1``."""
        return "" if self.children() else self.kind


def call_layer(layer: Layer, params: Params, state: State, x: Array,
               ctx: Context) -> tuple[Array, State]:
    """Applies ``layer`` and, when summarising, records a row for each leaf layer."""
    y, new_state = layer._apply(params, state, x, ctx)
    if ctx.record is not None and not layer.children():
        ctx.record.append((ctx.path, layer, tuple(x.shape), y, params))
    return y, new_state


def broadcast_trailing(v: Array, like: Array) -> Array:
    """``v`` of shape ``(features,)`` raised to ``like``'s rank, so that layers never rely on
    implicit rank promotion (it is an error under ``jax_numpy_rank_promotion="raise"``)."""
    return jax.lax.broadcast_to_rank(v, like.ndim)


def as_spec(x) -> jax.ShapeDtypeStruct:
    """An array, a ``ShapeDtypeStruct`` or a shape tuple (float32) as a ``ShapeDtypeStruct``."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, tuple) and all(isinstance(d, (int, np.integer)) for d in x):
        if any(d < 0 for d in x):
            raise ShapeError(f"input shape {shape_str(x)} has a negative size")
        return jax.ShapeDtypeStruct(tuple(int(d) for d in x), jnp.float32)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    raise TypeError(f"expected an array, a jax.ShapeDtypeStruct or a shape tuple; got {type(x).__name__}")


def param_dtype(x: jax.ShapeDtypeStruct):
    """Parameters take the input's floating dtype; integer inputs give float32 parameters."""
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.dtype(jnp.float32)


def require_floating(x: jax.ShapeDtypeStruct, path: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{path}: expected a floating-point input, got {x.dtype} of shape {shape_str(x.shape)}; "
            f"convert it first, e.g. x.astype(jnp.float32) / 255")


def require_example_ndim(x: jax.ShapeDtypeStruct, ndim: int, path: str, layout: str) -> None:
    """Raises unless ``x`` is ``(batch, *example)`` with ``example`` of rank ``ndim``."""
    if x.ndim - 1 != ndim:
        raise ShapeError(
            f"{path}: expected examples of shape {layout} (rank {ndim}); got examples of shape "
            f"{shape_str(x.shape[1:])} (rank {x.ndim - 1})")


def _check_key(key) -> Array:
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if isinstance(key, (jax.Array, np.ndarray)) and key.dtype == jnp.uint32 and key.shape == (2,):
        return key
    raise TypeError(
        f"expected a PRNG key such as jax.random.key(0); got {type(key).__name__}"
        + (f" of shape {shape_str(key.shape)} and dtype {key.dtype}" if hasattr(key, "dtype") else ""))


def _stateful_paths(layer: Layer, path: str) -> list[str]:
    if not layer.children():
        return [path] if layer.has_state else []
    return [p for name, child in layer.children()
            for p in _stateful_paths(child, join_path(path, name))]


# ---- validation of params/state trees and inference of the example rank -------------

@functools.lru_cache(maxsize=256)
def _expected_trees(layer: Layer, shape: tuple[int, ...], dtype) -> tuple[Any, Any]:
    """Shapes and dtypes of ``layer.init_with_state`` for inputs of ``shape`` (cached)."""
    spec = jax.ShapeDtypeStruct(shape, dtype)
    return jax.eval_shape(lambda k: layer._init(k, spec, layer._top_path()), jax.random.key(0))


def _leaves_by_path(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path): leaf
            for path, leaf in leaves}


def _structure_problems(what: str, expected: dict, actual: dict) -> list[str]:
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {what} {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {what} {', '.join(unexpected)}")
    return problems


def _shape_problems(expected: dict, actual: dict) -> list[str]:
    problems = []
    for name, spec in expected.items():
        leaf = actual[name]
        shape, dtype = tuple(np.shape(leaf)), getattr(leaf, "dtype", None)
        if shape != spec.shape:
            problems.append(f"{name} has shape {shape_str(shape)}, expected {shape_str(spec.shape)}")
        elif dtype is not None and jnp.dtype(dtype) != spec.dtype:
            problems.append(f"{name} has dtype {dtype}, expected {spec.dtype}")
    return problems


def infer_example_ndim(layer: Layer, params: Params, state: State, x: Array) -> int:
    """The number of trailing axes of ``x`` that form one example.

    It is the smallest rank that fits: ``init`` accepts the example and would produce exactly
    the shapes and dtypes of ``params`` and ``state``. That covers one example, a batch, several
    batch axes and ``vmap``. A network without any parameters or state has nothing to go
    by, so it reads ``x`` as a batch ``(batch, *example)`` when it can. Costs nothing at run
    time: it only compares shapes, cached per input shape.

    Raises:
      ValueError: the trees do not belong to this architecture (lists missing and
        unexpected entries), or fit no reading of ``x`` (the message is the one for the
        conventional reading, naming the layer or the mis-shaped entries).
    """
    top = layer._top_path() or "network"
    actual_params, actual_state = _leaves_by_path(params), _leaves_by_path(state)
    conventional = max(x.ndim - 1, min(x.ndim, 1))  # x read as (batch, *example), or one vector
    errors = {}
    ranks = list(range(x.ndim + 1))
    if not actual_params and not actual_state:
        ranks = [conventional] + [r for r in ranks if r != conventional]
    for ndim in ranks:
        try:
            trees = _expected_trees(layer, (1,) + x.shape[x.ndim - ndim:], x.dtype)
        except ShapeError as error:
            errors[ndim] = error
            continue
        expected_params, expected_state = map(_leaves_by_path, trees)
        structure = (_structure_problems("params", expected_params, actual_params)
                     + _structure_problems("state", expected_state, actual_state))
        if structure:
            raise ValueError(f"{top}: params/state do not match this network: {'; '.join(structure)}")
        problems = (_shape_problems(expected_params, actual_params)
                    + _shape_problems(expected_state, actual_state))
        if not problems:
            return ndim
        errors[ndim] = ShapeError(
            f"{top}: params do not fit an input of shape {shape_str(x.shape)}: "
            + "; ".join(problems) + " (made for another input shape or architecture?)")
    raise errors[conventional]
