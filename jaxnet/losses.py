"""Per-example losses, thin over optax. Each returns shape ``(batch,)``; average them yourself
(``fit`` takes a weighted mean so that padded examples count zero).

Integer labels are checked: concrete labels outside ``[0, num_classes)`` raise at once; traced
labels (inside ``jit``) that are out of range give a NaN loss, never a silently wrong number.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
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
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.where(real, labels, 0))
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
