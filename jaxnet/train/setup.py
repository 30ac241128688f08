"""What ``fit`` and its streaming variant share to set a run up: the data's size, the starting
state, the output's shape, the task's metrics and each epoch's train record.

Inputs and targets may be pytrees (a dict or tuple of arrays, e.g. ``{"tokens": (n, t) int32,
"mask": (n, t) bool}``) whose leaves share the leading ``(n,)`` examples axis.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.losses import is_model_loss
from jaxnet.metrics import absolute_error, label_accuracy
from jaxnet.nn.layer import Layer, Params, State
from jaxnet.train.engine import Metric, Sums, is_classification
from jaxnet.train.state import LossFn, TrainState, check_model_loss_options, init_train_state


def as_arrays(tree, convert: Callable = np.asarray):
    """``tree`` (an array, or a dict/tuple of arrays) with ``convert`` applied to every array.

    A list counts as one array (``[0, 1, 2]`` labels), not as a container."""
    return jax.tree.map(convert, tree, is_leaf=lambda a: isinstance(a, list))


def leaf_names(data) -> list[tuple[str, Any]]:
    """``[(name, leaf)]`` of ``data = (x, y)`` with names such as ``x['tokens']`` and ``y``."""
    return [(part + jax.tree_util.keystr(path), leaf)
            for part, tree in zip(("x", "y"), data)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def count_examples(data, what: str) -> int:
    """The number of examples in ``data = (x, y)``: the leading size every array shares.

    Raises:
      ValueError: an array without a leading axis, arrays of different lengths (naming them),
        or no examples.
    """
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(f"{what}: expected an (x, y) pair, got {type(data).__name__}")
    leaves = leaf_names(data)
    for part in ("x", "y"):
        if not any(name.startswith(part) for name, _ in leaves):
            raise ValueError(f"{what}: {part} holds no arrays")
    sizes = {}
    for name, leaf in leaves:
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(f"{what}: {name} is a scalar; every array needs a leading examples "
                             "axis")
        sizes[name] = shape[0]
    if len(set(sizes.values())) > 1:
        if list(sizes) == ["x", "y"]:
            raise ValueError(f"{what}: x has {sizes['x']} examples but y has {sizes['y']}")
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(f"{what}: every array must have the same number of examples (its "
                         f"leading axis); found {listed}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"{what}: no examples")
    return n


def rows_spec(tree, rows: int | None = 1):
    """``jax.ShapeDtypeStruct``s like ``tree``'s arrays with ``rows`` examples (``None``: as
    many as they have)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        (np.shape(a)[0] if rows is None else rows, *np.shape(a)[1:]),
        jax.dtypes.canonicalize_dtype(a.dtype)), tree)


def default_metrics(output: jax.ShapeDtypeStruct, y) -> dict[str, Metric]:
    """The metrics reported when none are given, by task: none beyond accuracy for
    classification (integer labels, one axis fewer than the outputs); the fraction of labels
    right for multi-label targets (integer or bool 0/1, shaped like the outputs: train with
    ``sigmoid_binary_cross_entropy``); the mean absolute error for regression (floating
    targets shaped like the outputs); none otherwise (pytrees)."""
    if not all(hasattr(a, "shape") and hasattr(a, "dtype") for a in (output, y)):
        return {}
    if tuple(y.shape[1:]) != tuple(output.shape[1:]):
        return {}
    if jnp.issubdtype(y.dtype, jnp.integer) or y.dtype == jnp.bool_:
        return {"label_accuracy": label_accuracy}
    return {"mae": absolute_error}


def task_metrics(net: Layer, loss: LossFn, metrics: Mapping[str, Metric] | None, params: Params,
                 x, y, where: str) -> tuple[Mapping[str, Metric], bool]:
    """``(metrics, classification)``: the metrics to compute (the given ones, else the task's
    defaults) and whether accuracy is reported. A model loss returns no outputs: no metrics
    of them (its aux are its metrics) and no accuracy."""
    if is_model_loss(loss):
        check_model_loss_options(None, None, metrics, where)
        return {}, False
    output = output_spec(net, params, x)
    return (default_metrics(output, y) if metrics is None else metrics,
            is_classification(output, y))


def output_spec(net: Layer, params: Params, x) -> jax.ShapeDtypeStruct:
    """The network's output shape and dtype for a batch like ``x`` (nothing computed)."""
    return jax.eval_shape(
        lambda p, v: net.apply_with_state(p, zero_state(net, p, v), v, batch_ndim=1)[0],
        params, rows_spec(x, None))


def zero_state(net: Layer, params: Params, x) -> State:
    """A state tree of the right shapes, for shape checks only."""
    if not net.has_state:
        return {}
    return net.init_with_state(jax.random.key(0), rows_spec(x, None))[1]


def initial_state(net: Layer, optimizer, params, model_state, key, x) -> TrainState:
    """The state ``fit`` starts from, in arrays of its own (the epochs donate them)."""
    if isinstance(params, TrainState):
        return jax.tree.map(jnp.copy, params)
    if model_state is None and net.has_state:
        model_state = net.init_with_state(jax.random.key(0), rows_spec(x))[1]
    return init_train_state(net, optimizer, params, model_state=model_state, key=key)


def train_record(sums: Sums, epoch: int, num_batches: int, on_nan: str,
                 classification: bool) -> dict:
    """The epoch's train metrics; raises ``FloatingPointError`` for a non-finite loss."""
    train = sums.means(classification)  # waits for the epoch to finish
    steps = f"steps {epoch * num_batches + 1}-{(epoch + 1) * num_batches}"
    if not math.isfinite(train["loss"]):
        raise FloatingPointError(f"fit: the training loss became {train['loss']} in epoch "
                                 f"{epoch + 1} ({steps}); lower the learning rate?")
    record = {f"train_{name}": value for name, value in train.items()}
    if on_nan == "skip":
        record["skipped_batches"] = int(sums.skipped)
        if record["skipped_batches"] == num_batches:
            raise FloatingPointError(f"fit: the training loss was NaN or infinite in every "
                                     f"batch of epoch {epoch + 1} ({steps}); all skipped")
    return record
