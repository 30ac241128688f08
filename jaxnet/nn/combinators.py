"""Composition: serial chains, parallel branches with fan-in, residual blocks, names, and the
combinators of networks with several inputs and outputs.

Children are named automatically by kind and position among their kind
(``dense_1``, ``dense_2``, ``relu_1``); :func:`named` overrides a child's name.
Parameters of children that have none are left out of the tree, so the params of
``serial(Flatten(), Dense(512), relu, Dense(10))`` are
``{"dense_1": {"w", "b"}, "dense_2": {"w", "b"}}``.

Several inputs and outputs: a network's input may be a tuple or dict of arrays and its output a
tuple. :func:`select` picks parts of such an input, :func:`route` sends each part through its
own branch, :func:`join` merges a tuple or dict of arrays into one, and
``parallel(..., fan_in="tuple")`` gives several outputs::

    net = serial(route(image=serial(Conv(16, (3, 3)), relu, Flatten()), meta=Dense(16)),
                 join("concat"), Dense(10))
    net.init(key, {"image": (8, 28, 28, 1), "meta": (8, 5)})
"""

from __future__ import annotations

import collections
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxnet.nn.calls import init_into
from jaxnet.nn.layer import (Layer, ShapeError, apply_child, init_child, shape_str,
                             split_keys)


def as_layer(layer) -> Layer:
    """A layer, or a plain function (``jax.nn.relu``) wrapped as an elementwise layer."""
    if isinstance(layer, Layer):
        return layer
    if callable(layer):
        from jaxnet.nn.activations import Activation
        return Activation(layer)
    raise TypeError(f"expected a jaxnet layer or a function; got {layer!r} of type {type(layer).__name__}")


def _child_names(layers: tuple[Layer, ...]) -> tuple[str, ...]:
    counts: collections.Counter = collections.Counter()
    names = []
    for layer in layers:
        if isinstance(layer, Named):
            names.append(layer.name)
        else:
            counts[layer.kind] += 1
            names.append(f"{layer.kind}_{counts[layer.kind]}")
    duplicates = sorted(name for name, n in collections.Counter(names).items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate layer names {duplicates}: give each named() layer a unique name")
    return tuple(names)


@dataclasses.dataclass(frozen=True, repr=False)
class Serial(Layer):
    """Layers applied one after another; see :func:`serial`."""

    layers: tuple[Layer, ...]
    kind: ClassVar[str] = "serial"

    def __post_init__(self):
        _child_names(self.layers)  # duplicate names fail when the network is built

    def children(self):
        return tuple(zip(_child_names(self.layers), self.layers))

    def init_params(self, key, x):
        params, state = {}, {}
        children = self.children()
        for (name, child), k in zip(children, jax.random.split(key, max(len(children), 1))):
            x = init_into(name, child, k, x, params, state)
        return params, state

    def forward(self, params, state, x, *, train, key):
        new_state = {}
        children = self.children()
        for (name, child), k in zip(children, split_keys(children, key, train)):
            x, s = apply_child(child, name, params.get(name, {}), state.get(name, {}), x,
                               train=train, key=k)
            if s:
                new_state[name] = s
        return x, new_state


@dataclasses.dataclass(frozen=True, repr=False)
class Parallel(Layer):
    """Branches that all see the same input, their outputs summed or concatenated; see :func:`parallel`."""

    branches: tuple[Layer, ...]
    fan_in: str = "concat"
    kind: ClassVar[str] = "parallel"

    def __post_init__(self):
        if self.fan_in not in FAN_INS:
            raise ValueError(f"parallel: fan_in must be one of {', '.join(FAN_INS)}; got {self.fan_in!r}")
        if not self.branches:
            raise ValueError("parallel: needs at least one branch")
        _child_names(self.branches)

    def children(self):
        return tuple(zip(_child_names(self.branches), self.branches))

    def init_params(self, key, x):
        params, state = {}, {}
        children = self.children()
        outputs = [init_into(name, child, k, x, params, state)
                   for (name, child), k in zip(children, jax.random.split(key, len(children)))]
        check_fan_in(self.fan_in, {name: y.shape for (name, _), y in zip(children, outputs)})
        return params, state

    def forward(self, params, state, x, *, train, key):
        new_state, outputs = {}, []
        children = self.children()
        for (name, child), k in zip(children, split_keys(children, key, train)):
            y, s = apply_child(child, name, params.get(name, {}), state.get(name, {}), x,
                               train=train, key=k)
            outputs.append(y)
            if s:
                new_state[name] = s
        return fan_in(self.fan_in, outputs), new_state


FAN_INS = ("concat", "sum", "tuple")


def check_fan_in(how: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raises ``ShapeError`` when outputs of these (batched) shapes cannot be joined ``how``."""
    listed = ", ".join(f"{n} {shape_str(s[1:])}" for n, s in shapes.items())
    if how == "sum" and len(set(shapes.values())) > 1:
        raise ShapeError(f"fan_in='sum' needs outputs of one shape; got {listed}")
    if how == "concat" and any(len(s) < 2 for s in shapes.values()):
        # without a feature axis the last axis is the batch axis: concat would join examples
        raise ShapeError("fan_in='concat' joins the last axis and needs outputs with a feature "
                         f"axis; got {listed}")
    if how == "concat" and len({s[:-1] for s in shapes.values()}) > 1:
        raise ShapeError(f"fan_in='concat' joins the last axis and needs the other axes equal; got {listed}")


def fan_in(how: str, outputs: list):
    """``outputs`` summed, concatenated on the last axis, or as a tuple."""
    if how == "sum":
        return sum(outputs[1:], outputs[0])
    if how == "concat":
        return jnp.concatenate(outputs, axis=-1)
    return tuple(outputs)


def _parts(x, keys: tuple, what: str) -> list:
    """The parts of a tuple or dict input ``x`` at ``keys`` (ints for tuples, strings for dicts)."""
    if isinstance(x, dict):
        have = sorted(x)
        missing = [k for k in keys if k not in x]
        if missing or not all(isinstance(k, str) for k in keys):
            raise ShapeError(f"{what} needs input entries {list(keys)}; the input dict has {have}")
        return [x[k] for k in keys]
    if isinstance(x, (tuple, list)):
        if not all(isinstance(k, int) and -len(x) <= k < len(x) for k in keys):
            raise ShapeError(f"{what} needs input parts {list(keys)}; the input is a tuple of {len(x)}")
        return [x[k] for k in keys]
    raise ShapeError(f"{what} needs a tuple or dict input; got one array of shape "
                     f"{shape_str(getattr(x, 'shape', ())[1:])}")


@dataclasses.dataclass(frozen=True, repr=False)
class Select(Layer):
    """Parts of a tuple or dict input; see :func:`select`."""

    keys: tuple
    kind: ClassVar[str] = "select"
    pointwise: ClassVar[bool] = True  # picks whole leaves: never mixes examples

    def init_params(self, key, x):
        _parts(x, self.keys, "select")
        return {}, {}

    def forward(self, params, state, x, *, train, key):
        parts = _parts(x, self.keys, "select")
        return (parts[0] if len(parts) == 1 else tuple(parts)), state


@dataclasses.dataclass(frozen=True, repr=False)
class Route(Layer):
    """One branch per part of a tuple or dict input; see :func:`route`."""

    branches: tuple[Layer, ...]
    keys: tuple[str, ...] | None = None  # the dict input's entries; None: a tuple input
    kind: ClassVar[str] = "route"

    def __post_init__(self):
        if not self.branches:
            raise ValueError("route: needs at least one branch")
        self.children()  # duplicate names fail when the network is built

    def children(self):
        if self.keys is None:
            return tuple(zip(_child_names(self.branches), self.branches))
        return tuple(zip(self.keys, self.branches))

    def _inputs(self, x) -> list:
        what = f"route with {len(self.branches)} branches"
        if self.keys is None and isinstance(x, (tuple, list)) and len(x) != len(self.branches):
            raise ShapeError(f"{what} needs a tuple of {len(self.branches)} inputs; got {len(x)}")
        if self.keys is not None and isinstance(x, dict) and set(x) != set(self.keys):
            raise ShapeError(f"{what} needs input entries {sorted(self.keys)}; the input dict has {sorted(x)}")
        keys = self.keys if self.keys is not None else tuple(range(len(self.branches)))
        return _parts(x, keys, what)

    def _outputs(self, outputs: list):
        return tuple(outputs) if self.keys is None else dict(zip(self.keys, outputs))

    def init_params(self, key, x):
        params, state = {}, {}
        children = self.children()
        for (name, child), part, k in zip(children, self._inputs(x),
                                          jax.random.split(key, len(children))):
            init_into(name, child, k, part, params, state)
        return params, state

    def forward(self, params, state, x, *, train, key):
        new_state, outputs = {}, []
        children = self.children()
        for (name, child), part, k in zip(children, self._inputs(x), split_keys(children, key, train)):
            y, s = apply_child(child, name, params.get(name, {}), state.get(name, {}), part,
                               train=train, key=k)
            outputs.append(y)
            if s:
                new_state[name] = s
        return self._outputs(outputs), new_state


@dataclasses.dataclass(frozen=True, repr=False)
class Join(Layer):
    """A tuple or dict of arrays merged into one; see :func:`join`."""

    fan_in: str = "concat"
    kind: ClassVar[str] = "join"
    pointwise: ClassVar[bool] = True  # joins per example: never mixes examples

    def __post_init__(self):
        if self.fan_in not in ("concat", "sum"):
            raise ValueError(f"join: fan_in must be 'concat' or 'sum', got {self.fan_in!r}")

    def _outputs(self, x) -> dict:
        if isinstance(x, dict):  # in JAX's order of a dict's leaves: sorted by name
            return {name: x[name] for name in sorted(x)}
        if isinstance(x, (tuple, list)):
            return {f"part {i}": part for i, part in enumerate(x)}
        raise ShapeError(f"join needs a tuple or dict of arrays; got one array of shape "
                         f"{shape_str(getattr(x, 'shape', ())[1:])}")

    def init_params(self, key, x):
        check_fan_in(self.fan_in, {n: part.shape for n, part in self._outputs(x).items()})
        return {}, {}

    def forward(self, params, state, x, *, train, key):
        return fan_in(self.fan_in, list(self._outputs(x).values())), state


@dataclasses.dataclass(frozen=True, repr=False)
class Residual(Layer):
    """``x + body(x)``; see :func:`residual`. The body's params sit in the residual's own slot."""

    body: Layer
    kind: ClassVar[str] = "residual"

    def children(self):
        return (("", self.body),)

    def init_params(self, key, x):
        params, state, y = init_child(self.body, "", key, x)
        if (y.shape, y.dtype) != (x.shape, x.dtype):
            raise ShapeError(f"a residual body must keep the input's shape and dtype: input "
                             f"{shape_str(x.shape[1:])} {x.dtype}, body output {shape_str(y.shape[1:])} {y.dtype}")
        return params, state

    def forward(self, params, state, x, *, train, key):
        y, new_state = apply_child(self.body, "", params, state, x, train=train, key=key)
        return x + y, new_state


@dataclasses.dataclass(frozen=True, repr=False)
class Named(Layer):
    """A layer with a chosen name in its parent's params tree; see :func:`named`."""

    name: str
    layer: Layer

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "/" in self.name or "." in self.name:
            raise ValueError(f"named: a name must be a non-empty string without '/' or '.'; got {self.name!r}")

    @property
    def kind(self):  # type: ignore[override]
        return self.layer.kind

    def children(self):
        return (("", self.layer),)

    def _top_path(self):
        return self.name

    def init_params(self, key, x):
        return init_child(self.layer, "", key, x)[:2]

    def forward(self, params, state, x, *, train, key):
        return apply_child(self.layer, "", params, state, x, train=train, key=key)


def serial(*layers) -> Serial:
    """Chains layers: the output of each is the input of the next.

    Args:
      *layers: jaxnet layers or plain functions such as ``jax.nn.relu``.

    Example:
      >>> net = serial(Flatten(), Dense(512), relu, Dense(10))
    """
    if not layers:
        raise ValueError("serial: needs at least one layer")
    return Serial(tuple(as_layer(layer) for layer in layers))


def parallel(*branches, fan_in: str = "concat") -> Parallel:
    """Applies every branch to the same input and joins the results.

    Args:
      *branches: layers (use :func:`serial` for multi-layer branches).
      fan_in: ``"concat"`` joins outputs on the last axis; ``"sum"`` adds
        outputs, which must then have one shape; ``"tuple"`` returns them as a tuple (a
        network with several outputs).
    """
    return Parallel(tuple(as_layer(branch) for branch in branches), fan_in)


def residual(*layers) -> Residual:
    """``x + f(x)`` where ``f`` is the layers in series; ``f`` must keep the input's shape."""
    body = as_layer(layers[0]) if len(layers) == 1 else serial(*layers)
    return Residual(body)


def named(name: str, layer) -> Named:
    """Gives ``layer`` the name ``name`` in its parent (``params[name]``) and in error messages."""
    return Named(name, as_layer(layer))


def select(*keys) -> Select:
    """Picks parts of a tuple input (by position) or a dict input (by name).

    ``select("tokens")`` maps ``{"tokens": (b, t), "mask": (b, t)}`` to the ``(b, t)`` tokens;
    with several keys the output is a tuple, ``select(1, 0)`` swaps a pair. A missing entry
    raises ``ShapeError`` naming the entries the input has.
    """
    if not keys:
        raise ValueError("select: name at least one input part")
    return Select(tuple(keys))


def route(*branches, **named_branches) -> Route:
    """Sends each part of a several-input network's input through its own branch.

    ``route(a, b)`` maps a tuple input ``(x0, x1)`` to ``(a(x0), b(x1))``;
    ``route(image=a, meta=b)`` maps a dict input ``{"image": ..., "meta": ...}`` to
    ``{"image": a(...), "meta": b(...)}``, the branches' params under the same names. Follow it
    with :func:`join` to merge the outputs. An input of another structure raises ``ShapeError``
    naming the parts expected and found.
    """
    if branches and named_branches:
        raise ValueError("route: give branches by position (a tuple input) or by name (a dict "
                         "input), not both")
    if named_branches:
        return Route(tuple(as_layer(b) for b in named_branches.values()), tuple(named_branches))
    return Route(tuple(as_layer(b) for b in branches))


def join(fan_in: str = "concat") -> Join:
    """Merges a tuple or dict of arrays (``route``'s output) into one: ``"concat"`` on the last
    axis, or ``"sum"`` of arrays of one shape. Dict entries are joined in sorted order of their names (the order
    of a dict's leaves in JAX)."""
    return Join(fan_in)
