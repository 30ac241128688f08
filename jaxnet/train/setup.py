"""What ``fit`` and its streaming variant share to set a run up: the starting state, the
output's shape, the task's default metrics and each epoch's train record."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxnet.metrics import absolute_error
from jaxnet.nn.layer import Layer, Params, State
from jaxnet.train.engine import Metric, Sums
from jaxnet.train.state import TrainState, init_train_state


def default_metrics(output: jax.ShapeDtypeStruct, y) -> dict[str, Metric]:
    """The metrics reported when none are given, by task: none beyond accuracy for
    classification (integer labels); the mean absolute error for regression (floating targets
    shaped like the outputs); none otherwise (multi-label: the loss says it)."""
    if not jnp.issubdtype(y.dtype, jnp.integer) and tuple(y.shape[1:]) == tuple(output.shape[1:]):
        return {"mae": absolute_error}
    return {}


def output_spec(net: Layer, params: Params, x) -> jax.ShapeDtypeStruct:
    """The network's output shape and dtype for a batch like ``x`` (nothing computed)."""
    return jax.eval_shape(
        lambda p, v: net.apply_with_state(p, zero_state(net, p, v), v, batch_ndim=1)[0],
        params, jax.ShapeDtypeStruct(x.shape, x.dtype))


def zero_state(net: Layer, params: Params, x) -> State:
    """A state tree of the right shapes, for shape checks only."""
    if not net.has_state:
        return {}
    return net.init_with_state(jax.random.key(0), jax.ShapeDtypeStruct(x.shape, x.dtype))[1]


def initial_state(net: Layer, optimizer, params, model_state, key, x) -> TrainState:
    """The state ``fit`` starts from, in arrays of its own (the epochs donate them)."""
    if isinstance(params, TrainState):
        return jax.tree.map(jnp.copy, params)
    if model_state is None and net.has_state:
        model_state = net.init_with_state(
            jax.random.key(0), jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))[1]
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
