"""Losses for ``fit``, ``evaluate`` and the train step, in two forms.

**Per-example losses** ``(outputs, y) -> (batch,)`` (the default form, and the fastest): thin
over optax, one value per example; ``fit`` takes their weighted mean so that padded examples
count zero, and computes accuracy and the metrics from the same outputs.

**Model losses** (:func:`model_loss`) ``(params, model_state, batch, key) -> (loss, aux)`` see
the parameters and apply the network themselves: weight penalties, auxiliary losses, KL terms
and networks with several outputs need no custom loop. ``loss`` is the batch's scalar mean
(padding masked with ``batch.weights``, see :class:`Batch`); ``aux`` is a dict of scalars,
reported as metrics (``train_<name>``, ``test_<name>``), that may also hold the network's new
state under ``"model_state"``.

Integer labels are checked: concrete labels outside ``[0, num_classes)`` raise at once; traced
labels (inside ``jit``) that are out of range give a NaN loss, never a silently wrong number.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax


def check_labels(labels, num_classes: int, what: str = "labels") -> None:
    """Raises if concrete integer ``labels`` are outside ``[0, num_classes)``; traced labels pass."""
    if isinstance(labels, jax.core.Tracer):
        return
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{what} must be integer class indices, got dtype {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{what} must be in [0, {num_classes}) for {num_classes} classes; "
                         f"found {labels.flat[i]} at index {i} ({bad.size} out of range)")


def check_per_example(losses, n: int, where: str) -> jax.Array:
    """``losses`` if its shape is ``(n,)``, one loss per example, else a ``ValueError``.

    A loss that returns the batch's mean (a scalar) or per-token values would otherwise be
    weighted and counted wrongly without any error.
    """
    if jnp.shape(losses) != (n,):
        raise ValueError(
            f"{where}: loss must return one value per example, shape ({n},); got shape "
            f"{tuple(jnp.shape(losses))} (use a per-example loss from jaxnet.losses, or reduce "
            "per-token values to one per example, not to the batch mean)")
    return losses


def _nan_where_out_of_range(losses, labels, num_classes):
    valid = (labels >= 0) & (labels < num_classes)
    return jnp.where(valid, losses, jnp.nan)


def _label_cross_entropy(logits, labels):
    """``logsumexp(logits) - logits[label]`` over the last axis. The label's logit is picked by
    comparing the labels with an iota: its gradient is elementwise and fuses with the softmax,
    where that of ``take_along_axis`` (optax's integer-label loss) is a scatter, three more
    kernels per step on XLA:CPU. A label out of range picks nothing."""
    classes = lax.broadcasted_iota(labels.dtype, logits.shape, logits.ndim - 1)
    picked = jnp.sum(jnp.where(labels[..., None] == classes, logits, 0), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - picked


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                          label_smoothing: float = 0.0) -> jax.Array:
    """Cross-entropy of ``softmax(logits)`` against integer class labels.

    Args:
      logits: ``(batch, classes)`` floating.
      labels: ``(batch,)`` integer, in ``[0, classes)``.
      label_smoothing: in ``[0, 1)``; the target puts ``1 - label_smoothing`` on the true
        class and spreads ``label_smoothing`` uniformly over all classes.

    Returns:
      ``(batch,)`` losses in the logits' dtype.
    """
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"softmax_cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing!r}")
    num_classes = logits.shape[-1]
    check_labels(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=logits.dtype),
                                      label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
    else:
        losses = _label_cross_entropy(logits, labels)
    return _nan_where_out_of_range(losses, labels, num_classes)


def token_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                        ignore_label: int = -1) -> jax.Array:
    """Per-token cross-entropy averaged over each sequence's real tokens: one loss per example.

    Args:
      logits: ``(batch, time, classes)`` floating (any number of token axes).
      labels: ``(batch, time)`` integer in ``[0, classes)``; tokens labelled ``ignore_label``
        (padding) count for nothing.

    Returns:
      ``(batch,)`` losses: each example's mean over its real tokens (0 for an example without
      any). A label outside ``[0, classes)`` other than ``ignore_label`` gives NaN.
    """
    num_classes = logits.shape[-1]
    real = labels != ignore_label
    losses = _label_cross_entropy(logits, jnp.where(real, labels, 0))
    losses = jnp.where(real, _nan_where_out_of_range(losses, labels, num_classes), 0.0)
    token_axes = tuple(range(1, labels.ndim))
    count = jnp.sum(real, axis=token_axes).astype(losses.dtype)
    return jnp.sum(losses, axis=token_axes) / jnp.maximum(count, 1)


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy of ``sigmoid(logits)``, averaged over the non-batch axes.

    Args:
      logits: ``(batch, ...)`` floating.
      labels: same shape, values in ``[0, 1]`` (any dtype; cast to the logits' dtype).

    Returns:
      ``(batch,)`` losses.
    """
    losses = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
    return losses.reshape(losses.shape[0], -1).mean(axis=-1)


def mean_squared_error(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Squared error averaged over the non-batch axes.

    Args:
      predictions: ``(batch, ...)`` floating.
      targets: same shape.

    Returns:
      ``(batch,)`` losses.
    """
    if predictions.shape != targets.shape:
        raise ValueError(f"mean_squared_error: predictions {predictions.shape} and targets "
                         f"{targets.shape} must have the same shape")
    errors = optax.squared_error(predictions, targets.astype(predictions.dtype))
    return errors.reshape(errors.shape[0], -1).mean(axis=-1)


# ---- model losses: (params, model_state, batch, key) -> (loss, aux) --------------------------

MODEL_STATE = "model_state"  # the aux entry that carries the network's new state


class Batch(NamedTuple):
    """One batch as a model loss sees it.

    Attributes:
      x: the inputs, ``(batch, *example)``, or a pytree (dict, tuple) of such arrays.
      y: the targets, ``(batch, ...)``, or a pytree of such arrays.
      weights: ``(batch,)`` float32, 1 for real examples and 0 for the padding of a partial
        last batch; average per-example values with :func:`weighted_mean`.
      train: ``True`` in a train step (apply the network with ``train=True`` and the key),
        ``False`` in evaluation. A Python bool.
    """

    x: Any
    y: Any
    weights: jax.Array
    train: bool


@dataclasses.dataclass(frozen=True)
class ModelLoss:
    """A loss of the parameters, the network's state, a :class:`Batch` and a key (see
    :func:`model_loss`)."""

    fn: Callable[[Any, Any, Batch, jax.Array | None], tuple[jax.Array, Mapping[str, Any]]]

    def __call__(self, params, model_state, batch: Batch, key):
        return self.fn(params, model_state, batch, key)


def model_loss(fn: Callable) -> ModelLoss:
    """Marks ``fn(params, model_state, batch, key) -> (loss, aux)`` as a model loss for ``fit``,
    ``evaluate``, ``make_train_step`` and ``train_batch`` (``loss=``).

    Args:
      fn: called with the parameters (differentiated), the network's state (``{}`` when it has
        none), a :class:`Batch` and, in a train step, a PRNG key drawn from the run's key and the
        step (``None`` in evaluation). It applies the network itself, e.g.
        ``net.apply_with_state(params, model_state, batch.x, key=key, train=batch.train,
        batch_ndim=1)``. It returns ``loss``, a scalar: the batch's mean, weighted with
        ``batch.weights`` so that padding counts zero (:func:`weighted_mean`), plus any
        penalty; and ``aux``, a dict of scalars reported as metrics (``train_<name>``,
        ``test_<name>``; ``"loss"`` is taken), which for a network with state (BatchNorm) must
        also hold the new state under ``"model_state"`` in training.

    Returns:
      a :class:`ModelLoss` (callable like ``fn``). Both returns are checked when the step is
      traced: a non-scalar loss, a non-dict aux or a non-scalar aux value is an error.

    Example:
      >>> @jaxnet.losses.model_loss
      ... def l2_penalised(params, model_state, batch, key):
      ...     logits, _ = net.apply_with_state(params, model_state, batch.x, key=key,
      ...                                      train=batch.train, batch_ndim=1)
      ...     ce = weighted_mean(softmax_cross_entropy(logits, batch.y), batch.weights)
      ...     l2 = sum(jnp.sum(w ** 2) for w in jax.tree.leaves(params))
      ...     return ce + 1e-4 / 2 * l2, {"ce": ce, "l2": l2}

    Model losses give no outputs to ``fit``, so there is no accuracy nor output metrics
    (``metrics=``): report them in ``aux``. The precision policies and a population's traced
    dropout rates apply to the network only through the per-example form.
    """
    if isinstance(fn, ModelLoss):
        return fn
    if not callable(fn):
        raise TypeError(f"model_loss: expected a function (params, model_state, batch, key) -> "
                        f"(loss, aux), got {type(fn).__name__}")
    return ModelLoss(fn)


def is_model_loss(loss) -> bool:
    """Whether ``loss`` is a model loss (made by :func:`model_loss`)."""
    return isinstance(loss, ModelLoss)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum(weights * values) / max(sum(weights), 1)``: the mean over the real examples.

    Args:
      values: ``(batch,)`` per-example values; weights: ``(batch,)`` (``Batch.weights``).

    Returns:
      a float32 scalar (0 for a batch of padding only).
    """
    if jnp.shape(values) != jnp.shape(weights):
        raise ValueError(f"weighted_mean: values of shape {tuple(jnp.shape(values))} need one "
                         f"value per example, the weights' shape {tuple(jnp.shape(weights))}")
    weights = jnp.asarray(weights, jnp.float32)
    return jnp.sum(weights * jnp.asarray(values).astype(jnp.float32)) / jnp.maximum(
        jnp.sum(weights), 1.0)


def check_model_loss(result, where: str) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """A model loss's ``(loss, aux)`` checked: ``(loss, scalars by name, new state or None)``.

    Raises:
      TypeError: ``result`` is not a pair, ``aux`` not a dict, a name not a string.
      ValueError: ``loss`` or an aux value (other than ``"model_state"``) is not a scalar, or
        an aux value is named ``"loss"``.
    """
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"{where}: a model loss must return (loss, aux), got "
                        f"{_describe(result)}")
    loss, aux = result
    if not _is_scalar(loss, jnp.floating):
        raise ValueError(f"{where}: a model loss must return a floating scalar loss (the "
                         f"batch's mean), got {_describe(loss)}")
    if not isinstance(aux, Mapping):
        raise TypeError(f"{where}: a model loss's aux must be a dict of scalars (metrics, and "
                        f"'{MODEL_STATE}'), got {_describe(aux)}")
    scalars = {}
    for name, value in aux.items():
        if name == MODEL_STATE:
            continue
        if not isinstance(name, str):
            raise TypeError(f"{where}: a model loss's aux names must be strings, got {name!r}")
        if name == "loss":
            raise ValueError(f"{where}: a model loss's aux cannot name a metric 'loss' (the "
                             "loss itself is reported as loss); rename it")
        if not _is_scalar(value, jnp.number):
            raise ValueError(f"{where}: a model loss's aux[{name!r}] must be a number (a scalar "
                             f"metric), got {_describe(value)}")
        scalars[name] = jnp.asarray(value).astype(jnp.float32)
    return jnp.asarray(loss).astype(jnp.float32), scalars, aux.get(MODEL_STATE)


def _is_scalar(value, kind) -> bool:
    try:
        value = jnp.asarray(value)
    except (TypeError, ValueError):  # a dict, a tuple of arrays, None
        return False
    return value.shape == () and jnp.issubdtype(value.dtype, kind)


def _describe(value) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"shape {tuple(value.shape)} of {value.dtype}"
    return type(value).__name__
