"""The layer contract: a network is an immutable description plus pure functions.

A layer is a frozen, hashable dataclass deriving from :class:`Layer`. A layer author implements
two public methods, and both always see exactly one leading batch axis:

* ``init_params(key, x) -> (params, state)``: ``x`` is a ``jax.ShapeDtypeStruct`` of shape
  ``(batch, *example)``. Validate the input here (raise :class:`ShapeError` or ``TypeError``);
  the library prefixes the message with the layer's path (``encoder/glu_1: ...``).
* ``forward(params, state, x, *, train, key) -> (y, new_state)``: ``x`` is ``(batch, *example)``,
  ``train`` the training-mode flag, ``key`` a PRNG key in training mode when the layer says
  it :attr:`~Layer.needs_key`, else ``None``.

Optional: ``flops(x_shape, y_shape, params)`` for summaries, ``has_state`` / ``needs_key``
properties, and ``children()`` with :func:`init_child` / :func:`apply_child` for layers made
of other layers. ``docs/custom_layers.md`` walks through a complete example.

The public entry points (``init``, ``apply``, ...) add shape inference with
``jax.eval_shape``, validation of a params tree against the architecture and support for any
number of leading batch axes (one example, a batch, or under ``jax.vmap``), all at trace time.
What the library itself needs while tracing (the path for error messages, summary recording,
a population's traced dropout rates, reverse-mode-only kernels) lives in a trace-time context
(:func:`trace_options`), never in a layer's signature.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

# The protocol's helpers, importable from here by layer modules and layer authors alike.
from jaxnet.nn.calls import (Array, Params, ShapeError, State, TraceOptions, _tracing,  # noqa: F401
                             apply_child, init_child, join_path, recording, split_keys,
                             trace_options)
from jaxnet.nn.shapes import as_spec, describe_input, infer_batch_ndim, input_spec  # noqa: F401
from jaxnet.trees import shape_str


class Layer:
    """Base of all jaxnet layers.

    Subclasses are ``@dataclass(frozen=True)`` so that a network description is immutable,
    hashable (a valid static argument to ``jax.jit``), comparable and printable. ``kind`` is the
    prefix of automatic names (``dense`` gives ``dense_1``, ``dense_2``, ...).
    """

    kind: ClassVar[str] = "layer"
    #: The rank of one example the layer takes, e.g. 2 for ``(time, features)``; the library
    #: refuses inputs of other ranks. ``None``: any rank (then declare ``pointwise`` if it fits).
    example_ndim: ClassVar[int | None] = None
    #: True when the layer treats every position along the leading axes of an example
    #: independently (Dense, activations, LayerNorm), so any reading of the batch axes agrees.
    pointwise: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        old = [name for name in ("_init", "_apply", "_flops") if name in vars(cls)]
        if old:
            raise TypeError(
                f"{cls.__name__}: the layer protocol is now public: rename {', '.join(old)} to "
                "init_params(key, x), forward(params, state, x, *, train, key) and "
                "flops(x_shape, y_shape, params); see docs/custom_layers.md")

    # ---- what a layer author implements ---------------------------------------------
    def init_params(self, key: Array, x: jax.ShapeDtypeStruct) -> tuple[Params, State]:
        """Creates ``(params, state)`` for inputs like ``x``, a ``(batch, *example)`` spec.

        Raise :class:`ShapeError` (or ``TypeError`` for dtypes) for inputs the layer cannot take;
        the library adds the layer's path to the message. The default creates nothing.
        """
        del key, x
        return {}, {}

    def forward(self, params: Params, state: State, x: Array, *, train: bool,
                key: Array | None) -> tuple[Array, State]:
        """Computes ``(y, new_state)`` for ``x`` of shape ``(batch, *example)``.

        Args:
          params, state: this layer's own entries, as :meth:`init_params` made them.
          x: the input, with exactly one leading batch axis.
          train: training mode (dropout active, batch statistics used).
          key: a PRNG key in training mode when :attr:`needs_key`, else ``None``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def flops(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...], params: Params) -> int:
        """Estimated forward FLOPs for one call; one per output value by default."""
        del x_shape, params
        return math.prod(y_shape)

    def children(self) -> tuple[tuple[str, Layer], ...]:
        """Named sub-layers, for layers made of others; ``()`` for leaves."""
        return ()

    @property
    def has_state(self) -> bool:
        """True when the layer (or a sub-layer) keeps state such as running statistics."""
        return any(child.has_state for _, child in self.children())

    @property
    def needs_key(self) -> bool:
        """True when the layer (or a sub-layer) needs a PRNG key in training mode."""
        return any(child.needs_key for _, child in self.children())

    # ---- what users call -------------------------------------------------------------
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
        spec = input_spec(x)
        if any(leaf.ndim < 1 for leaf in jax.tree.leaves(spec)):
            raise ShapeError(
                f"{self._top_path() or 'network'}: init expects an example batch with a leading "
                "batch axis (e.g. x[:1]); got a scalar")
        leaves, treedef = jax.tree.flatten(spec)
        return _compiled_init(self, treedef, tuple((leaf.shape, leaf.dtype) for leaf in leaves))(
            check_key(key))

    def apply(self, params: Params, x: Array, *, key: Array | None = None,
              train: bool = False, batch_ndim: int | None = None) -> Array:
        """Runs the network.

        Args:
          params: the tree returned by :meth:`init`.
          x: one example ``(*example)`` or inputs with any leading batch axes
            ``(*batch, *example)``; the number of batch axes is inferred from ``params``
            (an ambiguous reading raises). A pytree of such arrays (tuple, dict) for networks
            with several inputs; its leaves share the batch axes.
          key: PRNG key, required in training mode by stochastic layers (Dropout).
          train: training mode.
          batch_ndim: the number of leading batch axes, when known (skips the inference).

        Returns:
          ``(*batch, *output)``: the output for each example.
        """
        if self.has_state:
            stateful = ", ".join(_stateful_paths(self, self._top_path()))
            raise ValueError(
                f"{self._top_path() or 'network'}: this network keeps state ({stateful}); use "
                f"init_with_state(key, x) and apply_with_state(params, state, x, ...)")
        return self.apply_with_state(params, {}, x, key=key, train=train, batch_ndim=batch_ndim)[0]

    def apply_with_state(self, params: Params, state: State, x: Array, *,
                         key: Array | None = None, train: bool = False,
                         drop_rate: Array | float | None = None, reverse_only: bool = False,
                         batch_ndim: int | None = None) -> tuple[Array, State]:
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
            (``jax.grad``, ``jax.vjp``), as ``fit`` does. ``Dense`` and ``Conv`` then compute
            their weight gradients in the forms XLA:CPU runs fastest (same values; see
            ``docs/performance.md``, finding 7); ``jax.jvp`` of the output raises an error.

        Returns:
          ``(y, new_state)`` with ``y`` of shape ``(*batch, *output)``.
        """
        x = jax.tree.map(jnp.asarray, x)
        batch_ndim = infer_batch_ndim(self, params, state, x, batch_ndim)
        batch_shapes = {tuple(leaf.shape[:batch_ndim]) for leaf in jax.tree.leaves(x)}
        if len(batch_shapes) != 1:
            raise ShapeError(f"{self._top_path() or 'network'}: the inputs' leading {batch_ndim} "
                             f"batch axes differ: {describe_input(x)}")
        batch_shape = batch_shapes.pop()
        batched = jax.tree.map(
            lambda leaf: leaf.reshape((math.prod(batch_shape),) + leaf.shape[batch_ndim:]), x)
        if key is not None:
            key = check_key(key)
        if drop_rate is not None:
            drop_rate = jnp.asarray(drop_rate, jnp.float32)
        with _tracing(drop_rate=drop_rate, reverse_only=reverse_only):
            y, new_state = apply_child(self, self._top_path(), params, state, batched,
                                       train=train, key=key)
        return jax.tree.map(lambda leaf: leaf.reshape(batch_shape + leaf.shape[1:]), y), new_state

    def output_shape(self, x) -> jax.ShapeDtypeStruct:
        """The output's shape and dtype for inputs like ``x`` (a batch or its shape), without computing."""
        spec = input_spec(x)
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


@functools.lru_cache(maxsize=128)
def _compiled_init(layer: Layer, treedef, leaves: tuple):
    """``key -> (params, state)`` for inputs of these shapes, compiled once: one program
    instead of an eager dispatch per weight."""
    spec = treedef.unflatten([jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves])
    def initialise(key):  # plain jax.jit: init may run inside another traced function
        return init_child(layer, layer._top_path(), key, spec)[:2]

    return jax.jit(initialise)


def state_or_empty(net: Layer, model_state: State | None, where: str) -> State:
    """``model_state``, or ``{}`` for a network without state; a ``ValueError`` naming
    ``where`` when a network that keeps state (BatchNorm statistics) is given none."""
    if model_state is not None:
        return model_state
    if net.has_state:
        raise ValueError(f"{where}: this network keeps state (e.g. BatchNorm statistics); pass "
                         "the trained model_state")
    return {}


def require_key(key: Array | None, layer: str = "this layer") -> Array:
    """``key``, or a ``ValueError`` saying that ``layer`` needs one in training mode."""
    if key is None:
        raise ValueError(f"{layer} in training mode needs a PRNG key: call "
                         "apply(params, x, key=jax.random.key(...), train=True)")
    return key


def broadcast_trailing(v: Array, like: Array) -> Array:
    """``v`` of shape ``(features,)`` raised to ``like``'s rank, so that layers never rely on
    implicit rank promotion (it is an error under ``jax_numpy_rank_promotion="raise"``)."""
    return jax.lax.broadcast_to_rank(v, like.ndim)


def param_dtype(x: jax.ShapeDtypeStruct):
    """Parameters take the input's floating dtype; integer inputs give float32 parameters."""
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.dtype(jnp.float32)


def require_floating(x: jax.ShapeDtypeStruct) -> None:
    """Raises ``TypeError`` unless ``x`` is floating."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"expected a floating-point input, got {x.dtype} of shape {shape_str(x.shape)}; "
            f"convert it first, e.g. x.astype(jnp.float32) / 255")


def require_example_ndim(x: jax.ShapeDtypeStruct, ndim: int, layout: str) -> None:
    """Raises unless ``x`` is ``(batch, *example)`` with ``example`` of rank ``ndim``."""
    if x.ndim - 1 != ndim:
        raise ShapeError(
            f"expected examples of shape {layout} (rank {ndim}); got examples of shape "
            f"{shape_str(x.shape[1:])} (rank {x.ndim - 1})")


def require_feature_axis(x: jax.ShapeDtypeStruct) -> None:
    """Raises unless each example has at least one axis (the feature axis)."""
    if x.ndim < 2:
        raise ShapeError(f"expected examples with a feature axis (..., features); got examples "
                         f"of shape {shape_str(x.shape[1:])}")


def check_key(key) -> Array:
    """``key`` if it is a PRNG key (typed, or legacy ``uint32[2]``), else a ``TypeError``."""
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
