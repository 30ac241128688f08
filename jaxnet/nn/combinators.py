"""Composition: serial chains, parallel branches with fan-in, residual blocks, names.

Children are named automatically by kind and position among their kind
(``dense_1``, ``dense_2``, ``relu_1``); :func:`named` overrides a child's name.
Parameters of children that have none are left out of the tree, so the params of
``serial(Flatten(), Dense(512), relu, Dense(10))`` are
``{"dense_1": {"w", "b"}, "dense_2": {"w", "b"}}``.
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
        if self.fan_in not in ("concat", "sum"):
            raise ValueError(f"parallel: fan_in must be 'concat' or 'sum', got {self.fan_in!r}")
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
        shapes = {name: y.shape for (name, _), y in zip(children, outputs)}
        if self.fan_in == "sum" and len(set(shapes.values())) > 1:
            raise ShapeError("fan_in='sum' needs branch outputs of one shape; got "
                             + ", ".join(f"{n} {shape_str(s[1:])}" for n, s in shapes.items()))
        if self.fan_in == "concat" and any(len(s) < 2 for s in shapes.values()):
            # without a feature axis the last axis is the batch axis: concat would join examples
            raise ShapeError("fan_in='concat' joins the last axis and needs branch "
                             "outputs with a feature axis; got " + ", ".join(
                                 f"{n} {shape_str(s[1:])}" for n, s in shapes.items()))
        if self.fan_in == "concat" and len({s[:-1] for s in shapes.values()}) > 1:
            raise ShapeError("fan_in='concat' joins the last axis and needs the other axes "
                             "equal; got " + ", ".join(f"{n} {shape_str(s[1:])}" for n, s in shapes.items()))
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
        if self.fan_in == "sum":
            return sum(outputs[1:], outputs[0]), new_state
        return jnp.concatenate(outputs, axis=-1), new_state


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
        outputs, which must then have one shape.
    """
    return Parallel(tuple(as_layer(branch) for branch in branches), fan_in)


def residual(*layers) -> Residual:
    """``x + f(x)`` where ``f`` is the layers in series; ``f`` must keep the input's shape."""
    body = as_layer(layers[0]) if len(layers) == 1 else serial(*layers)
    return Residual(body)


def named(name: str, layer) -> Named:
    """Gives ``layer`` the name ``name`` in its parent (``params[name]``) and in error messages."""
    return Named(name, as_layer(layer))
