"""Which leading axes of an input are batch axes, and whether params fit the architecture.

A network's input is an array or a pytree of arrays (a tuple or dict: tokens and a mask, a
query and a context) whose leaves share their leading batch axes. :func:`infer_batch_ndim`
finds how many there are from the params and state, at trace time, and never guesses: when
several readings fit and a layer of the network has not declared how its examples are shaped
(``example_ndim`` or ``pointwise``), it raises an error naming that layer.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.nn.calls import Array, Params, ShapeError, State, init_child, join_path
from jaxnet.trees import compare_trees, leaves_by_name, shape_str

if TYPE_CHECKING:
    from jaxnet.nn.layer import Layer


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


def input_spec(x):
    """An input (array, ``ShapeDtypeStruct``, shape tuple, or a pytree of those) as specs."""
    try:
        return jax.tree.map(as_spec, x, is_leaf=_is_input_leaf)
    except TypeError:
        raise TypeError("expected an array, a jax.ShapeDtypeStruct, a shape tuple or a pytree "
                        f"(tuple, dict) of arrays; got {type(x).__name__}") from None


def _is_input_leaf(x) -> bool:
    return (isinstance(x, jax.ShapeDtypeStruct) or hasattr(x, "shape")
            or (isinstance(x, tuple) and all(isinstance(d, (int, np.integer)) for d in x)))


def describe_input(x) -> str:
    """``(32, 28, 28)``, or ``{"tokens": (32, 16), "mask": (32, 16)}`` for a pytree."""
    if hasattr(x, "shape"):
        return shape_str(x.shape)
    return str(jax.tree.map(lambda leaf: shape_str(leaf.shape), x))


@functools.lru_cache(maxsize=256)
def _expected_trees_cached(layer: Layer, treedef, leaves: tuple) -> tuple[Any, Any]:
    spec = treedef.unflatten([jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves])
    return jax.eval_shape(lambda k: init_child(layer, layer._top_path(), k, spec)[:2],
                          jax.random.key(0))


def expected_trees(layer: Layer, shape_or_spec, dtype=None) -> tuple[Any, Any]:
    """Shapes and dtypes of ``layer.init_with_state`` for inputs like the given spec (cached).

    Args:
      shape_or_spec: a shape tuple (with ``dtype``) or a pytree of ``ShapeDtypeStruct``.
    """
    spec = jax.ShapeDtypeStruct(shape_or_spec, dtype) if dtype is not None else shape_or_spec
    leaves, treedef = jax.tree.flatten(spec)
    return _expected_trees_cached(layer, treedef,
                                  tuple((tuple(leaf.shape), leaf.dtype) for leaf in leaves))


def undeclared_layers(layer: Layer, path: str = "") -> list[str]:
    """Paths of leaf layers that declare neither ``example_ndim`` nor ``pointwise``."""
    children = layer.children()
    if not children:
        declared = layer.pointwise or layer.example_ndim is not None
        return [] if declared else [path or layer.kind]
    return [p for name, child in children for p in undeclared_layers(child, join_path(path, name))]


def infer_batch_ndim(layer: Layer, params: Params, state: State, x,
                     batch_ndim: int | None = None) -> int:
    """The number of leading axes of ``x`` (of every leaf of it) that are batch axes.

    A reading fits when ``init`` accepts the example and would produce exactly the shapes and
    dtypes of ``params`` and ``state``; that covers one example, a batch, several batch axes
    and ``vmap``. When several readings fit, they give the same outputs if every leaf layer
    declares its example rank or is pointwise, or if they differ only by axes of size 1, and
    the one with the most batch axes is used; otherwise the reading is ambiguous and this raises. A network without any parameters or
    state has nothing to go by, so it reads ``x`` as a batch ``(batch, *example)`` when it can.
    Costs nothing at run time: it only compares shapes, cached per input shape. A given
    ``batch_ndim`` is checked the same way (the trees must fit that reading) and returned.

    Raises:
      ValueError: the trees do not belong to this architecture (lists missing and
        unexpected entries), or fit no reading of ``x`` (the message is the one for the
        conventional reading, naming the layer or the mis-shaped entries).
      ShapeError: several readings fit and a layer does not declare its example rank.
    """
    top = layer._top_path() or "network"
    actual_params, actual_state = leaves_by_name(params), leaves_by_name(state)
    leaves = jax.tree.leaves(x)
    if not leaves:
        raise ShapeError(f"{top}: the input {x!r} holds no arrays")
    most = min(leaf.ndim for leaf in leaves)
    conventional = 1 if most >= 2 else 0  # x read as (batch, *example), or one vector
    readings = list(range(most, -1, -1))
    param_free = not actual_params and not actual_state
    if batch_ndim is not None:
        if not 0 <= batch_ndim <= most:
            raise ShapeError(f"{top}: batch_ndim={batch_ndim} leading axes, but the input has "
                             f"shape {describe_input(x)}")
        readings, conventional = [batch_ndim], batch_ndim
    elif param_free:  # by convention a batch, else the first reading that fits
        readings = [conventional] + [r for r in readings if r != conventional]
    errors, fits = {}, []
    for reading in readings:
        spec = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
            (1,) + tuple(leaf.shape[reading:]), leaf.dtype), x)
        try:
            expected_params, expected_state = expected_trees(layer, spec)
        except ShapeError as error:
            errors[reading] = error
            continue
        except Exception as error:  # e.g. an empty axis read as features: not this reading
            if reading == conventional:
                raise
            errors[reading] = error
            continue
        params_diff = compare_trees(expected_params, actual_params)
        state_diff = compare_trees(expected_state, actual_state)
        structure = [f"{problem} {what} {', '.join(names)}"
                     for what, diff in (("params", params_diff), ("state", state_diff))
                     for problem, names in (("missing", diff.missing), ("unexpected", diff.unexpected))
                     if names]
        if structure:
            raise ValueError(f"{top}: params/state do not match this network: {'; '.join(structure)}")
        problems = params_diff.mismatched + state_diff.mismatched
        if not problems:
            fits.append(reading)
            if param_free:
                break
            continue
        errors[reading] = ShapeError(
            f"{top}: params do not fit an input of shape {describe_input(x)}: "
            + "; ".join(problems) + " (made for another input shape or architecture?)")
    if not fits:
        raise errors[conventional]
    most_batch_axes = max(fits)
    # Readings that differ only by axes of size 1 compute the same values: nothing to mix.
    rivals = [b for b in fits if b < most_batch_axes
              and any(math.prod(leaf.shape[b:most_batch_axes]) > 1 for leaf in leaves)]
    if rivals:
        undeclared = undeclared_layers(layer)
        if undeclared:
            raise ShapeError(
                f"{top}: an input of shape {describe_input(x)} fits these params with "
                f"{' or '.join(map(str, sorted(rivals + [most_batch_axes])))} leading batch axes, and "
                f"{', '.join(undeclared)} {'does' if len(undeclared) == 1 else 'do'} not declare "
                "how many axes form one example: set example_ndim (or pointwise = True) on the "
                "layer class, or pass batch_ndim= to apply")
    return most_batch_axes


def infer_example_ndim(layer: Layer, params: Params, state: State, x: Array) -> int:
    """For an array ``x``: the number of trailing axes that form one example
    (``x.ndim - infer_batch_ndim(...)``)."""
    return x.ndim - infer_batch_ndim(layer, params, state, x)
