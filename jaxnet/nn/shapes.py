"""Which trailing axes of an input form one example, and whether params fit the architecture."""

from __future__ import annotations

import functools
from typing import Any

import jax

from jaxnet.nn.layer import Array, Layer, Params, ShapeError, State, init_child
from jaxnet.trees import compare_trees, leaves_by_name, shape_str


@functools.lru_cache(maxsize=256)
def expected_trees(layer: Layer, shape: tuple[int, ...], dtype) -> tuple[Any, Any]:
    """Shapes and dtypes of ``layer.init_with_state`` for inputs of ``shape`` (cached)."""
    spec = jax.ShapeDtypeStruct(shape, dtype)
    return jax.eval_shape(lambda k: init_child(layer, layer._top_path(), k, spec)[:2],
                          jax.random.key(0))


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
    actual_params, actual_state = leaves_by_name(params), leaves_by_name(state)
    conventional = max(x.ndim - 1, min(x.ndim, 1))  # x read as (batch, *example), or one vector
    errors = {}
    ranks = list(range(x.ndim + 1))
    if not actual_params and not actual_state:
        ranks = [conventional] + [r for r in ranks if r != conventional]
    for ndim in ranks:
        try:
            expected_params, expected_state = expected_trees(
                layer, (1,) + x.shape[x.ndim - ndim:], x.dtype)
        except ShapeError as error:
            errors[ndim] = error
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
            return ndim
        errors[ndim] = ShapeError(
            f"{top}: params do not fit an input of shape {shape_str(x.shape)}: "
            + "; ".join(problems) + " (made for another input shape or architecture?)")
    raise errors[conventional]
