"""How the library runs a layer: paths, located errors and the trace-time context.

:func:`init_child` and :func:`apply_child` run a sub-layer under its path, so that an error
raised inside is prefixed with the path once (``encoder/dense_2: ...``) and summaries see a row
for each leaf layer. What the library passes to layers while a network is traced lives in
:class:`TraceOptions`, set for the duration of a call, never in a layer's signature.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, NamedTuple

import jax

from jaxnet.trees import shape_str

Array = jax.Array
Params = dict[str, Any]
State = dict[str, Any]


class ShapeError(ValueError):
    """An input or a parameter tree has the wrong shape for a layer."""


class TraceOptions(NamedTuple):
    """What the library passes to layers while a network is traced (never at run time).

    Attributes:
      path: the path of the layer being run, e.g. ``"encoder/dense_2"``.
      record: when not ``None``, a list that :func:`apply_child` appends summary rows to.
      drop_rate: when not ``None``, a float32 scalar (possibly traced) that replaces every
        Dropout layer's own rate (population training).
      reverse_only: the caller differentiates this call in reverse mode only, so built-in
        layers may compute their gradients with custom VJPs (no forward mode).
      matmul_dtype: when not ``None`` (bfloat16 under the ``"bf16"`` precision policy), built-in
        layers round the operands of their matrix products and convolutions to it and
        accumulate them in float32, keeping their outputs in the compute dtype; with
        ``reverse_only``, their gradient products too.
    """

    path: str = ""
    record: list | None = None
    drop_rate: Array | None = None
    reverse_only: bool = False
    matmul_dtype: Any = None


_TRACE = contextvars.ContextVar("jaxnet_trace_options", default=TraceOptions())


def trace_options() -> TraceOptions:
    """The options of the network call being traced (library-internal; layers rarely need it)."""
    return _TRACE.get()


@contextlib.contextmanager
def _tracing(**changes):
    token = _TRACE.set(_TRACE.get()._replace(**changes))
    try:
        yield
    finally:
        _TRACE.reset(token)


def join_path(parent: str, name: str) -> str:
    """``"encoder"`` and ``"dense_1"`` give ``"encoder/dense_1"``; an empty name adds nothing."""
    if not name:
        return parent
    return f"{parent}/{name}" if parent else name


_LOCATED = (ShapeError, TypeError, ValueError)


@contextlib.contextmanager
def _located(path: str):
    """Prefixes a ``ShapeError``/``TypeError``/``ValueError`` raised inside with ``path``, once."""
    try:
        yield
    except _LOCATED as error:
        if type(error) not in _LOCATED or getattr(error, "jaxnet_path", None) is not None or not path:
            raise
        located = type(error)(f"{path}: {error}")
        located.jaxnet_path = path
        raise located from None


def init_child(child, name: str, key: Array,
               x: jax.ShapeDtypeStruct) -> tuple[Params, State, jax.ShapeDtypeStruct]:
    """Initialises ``child`` as the sub-layer ``name`` of the layer being initialised.

    For layers made of others (``children()``); errors raised inside name the child's path.

    Returns:
      ``(params, state, y)``: the child's trees and its output spec for inputs like ``x``.
    """
    path = join_path(_TRACE.get().path, name)
    with _tracing(path=path, record=None), _located(path or child.kind):
        params, state = child.init_params(key, x)
        if child.example_ndim is not None and hasattr(x, "shape") and x.ndim - 1 != child.example_ndim:
            raise ShapeError(f"expected examples of rank {child.example_ndim}; got examples of "
                             f"shape {shape_str(x.shape[1:])} (rank {x.ndim - 1})")
        y, _ = jax.eval_shape(lambda p, s, v: child.forward(p, s, v, train=False, key=None),
                              params, state, x)
    return params, state, y


def apply_child(child, name: str, params: Params, state: State, x: Array, *,
                train: bool, key: Array | None) -> tuple[Array, State]:
    """Runs ``child`` as the sub-layer ``name`` of the layer being run: ``(y, new_state)``.

    For layers made of others; errors raised inside name the child's path, and summaries see
    a row for each leaf layer.
    """
    options = _TRACE.get()
    path = join_path(options.path, name)
    with _tracing(path=path), _located(path or child.kind):
        y, new_state = child.forward(params, state, x, train=train, key=key)
    if options.record is not None and not child.children():
        options.record.append((path, child, jax.tree.map(lambda a: tuple(a.shape), x), y, params))
    return y, new_state


@contextlib.contextmanager
def recording(rows: list):
    """Within the block, every network call appends ``(path, layer, x_shape, y, params)`` rows
    for its leaf layers to ``rows`` (used by :func:`jaxnet.summarize`)."""
    with _tracing(record=rows):
        yield


@contextlib.contextmanager
def matmul_operands(dtype):
    """Within the block, built-in layers run their products on operands rounded to ``dtype``
    (``TraceOptions.matmul_dtype``; ``None``: unrounded). Used by ``jaxnet.precision``."""
    with _tracing(matmul_dtype=dtype):
        yield


def split_keys(children, key: Array | None, train: bool) -> list[Array | None]:
    """One key per child that needs one in training mode (``None`` for the others); no
    splitting work when none does."""
    keys: list[Array | None] = [None] * len(children)
    if key is None or not train:
        return keys
    needy = [i for i, (_, child) in enumerate(children) if child.needs_key]
    split = [key] if len(needy) == 1 else list(jax.random.split(key, len(needy)))
    for i, k in zip(needy, split):
        keys[i] = k
    return keys


def init_into(name: str, child, key: Array, x, params: Params, state: State):
    """Initialises ``child`` as the sub-layer ``name`` into the ``params``/``state`` dicts being
    built (children without params or state are left out); returns its output spec."""
    p, s, y = init_child(child, name, key, x)
    if p:
        params[name] = p
    if s:
        state[name] = s
    return y


class ChildRunner:
    """Runs a composite layer's children by name, for its ``forward``.

    ``run = ChildRunner(self, params, state, key, train)`` splits the key among the children that
    need one; ``run("dense", x)`` applies the child named ``dense`` to ``x`` with its own params,
    state and key, and ``run.new_state`` collects the children's new state (children without
    state left out), ready to return.
    """

    def __init__(self, layer, params, state, key, train):
        children = layer.children()
        self.layers = dict(children)
        self.keys = dict(zip(self.layers, split_keys(children, key, train)))
        self.params, self.state, self.train, self.new_state = params, state, train, {}

    def __contains__(self, name):
        return name in self.layers

    def __call__(self, name, x):
        y, s = apply_child(self.layers[name], name, self.params.get(name, {}),
                           self.state.get(name, {}), x, train=self.train, key=self.keys[name])
        if s:
            self.new_state[name] = s
        return y
