"""Classification metrics over logits (or probabilities) and integer labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxnet.losses import check_labels
from jaxnet.validate import positive_int


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of examples whose most probable class is the label.

    Args:
      logits: ``(batch, classes)``; labels: ``(batch,)`` integer.

    Returns:
      float32 scalar in ``[0, 1]``.
    """
    return top_k_accuracy(logits, labels, k=1)


def top_k_accuracy(logits: jax.Array, labels: jax.Array, k: int = 5) -> jax.Array:
    """Fraction of examples whose label is among the ``k`` most probable classes.

    Args:
      logits: ``(batch, classes)``; labels: ``(batch,)`` integer; k: in ``[1, classes]``.

    Returns:
      float32 scalar in ``[0, 1]``.
    """
    num_classes = logits.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"top_k_accuracy: k must be in [1, {num_classes}], got {k}")
    check_labels(labels, num_classes)
    return jnp.mean(correct(logits, labels, k).astype(jnp.float32))


def correct(logits: jax.Array, labels: jax.Array, k: int = 1) -> jax.Array:
    """``(batch,)`` bool: the label is among the top ``k`` classes (ties count against it).

    For ``k=1``, ``jnp.argmax(logits, -1) == labels``: the first of tied maxima (and the first
    NaN) is the prediction. Inside ``fit``'s scan XLA:CPU runs the argmax's two-output reduction
    faster than an elementwise formulation (docs/performance.md, finding 6).
    """
    if k == 1:
        return jnp.argmax(logits, axis=-1) == labels
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)
    return jnp.sum(logits > label_logit, axis=-1) < k


def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """Counts of (true class, predicted class) pairs.

    Args:
      predictions: ``(batch,)`` integer predicted classes (e.g. ``logits.argmax(-1)``).
      labels: ``(batch,)`` integer true classes.
      num_classes: number of classes.

    Returns:
      ``(num_classes, num_classes)`` int32; row = true class, column = predicted class.
    """
    check_labels(labels, num_classes)
    check_labels(predictions, num_classes, "predictions")
    pairs = labels.astype(jnp.int32) * num_classes + predictions.astype(jnp.int32)
    counts = jnp.bincount(pairs, length=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(jnp.int32)


# ---- per-example metrics for fit/evaluate: (outputs, targets) -> (batch,) -------------------

def absolute_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Each example's mean absolute error over its values: ``(batch, ...)`` -> ``(batch,)``."""
    error = jnp.abs(outputs.astype(jnp.float32) - targets.astype(jnp.float32))
    return jnp.mean(error.reshape(error.shape[0], -1), axis=-1)


def squared_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Each example's mean squared error over its values: ``(batch, ...)`` -> ``(batch,)``."""
    error = jnp.square(outputs.astype(jnp.float32) - targets.astype(jnp.float32))
    return jnp.mean(error.reshape(error.shape[0], -1), axis=-1)


def top_k(k: int):
    """A per-example metric: 1.0 where the label is among the ``k`` largest logits, else 0.0.

    Example:
      >>> jn.fit(..., metrics={"top5": jaxnet.metrics.top_k(5)})   # records train_top5, ...
    """
    positive_int("top_k", "k", k)

    def top_k_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
        if k > logits.shape[-1]:
            raise ValueError(f"top_k: k must be at most the number of classes "
                             f"({logits.shape[-1]}), got {k}")
        return correct(logits, labels, k).astype(jnp.float32)

    return top_k_correct


def label_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Multi-label: each example's fraction of labels (0/1 targets) predicted right by
    ``logits > 0``: ``(batch, labels)`` -> ``(batch,)``."""
    right = (logits > 0) == (labels.astype(jnp.float32) > 0.5)
    return jnp.mean(right.reshape(right.shape[0], -1).astype(jnp.float32), axis=-1)
