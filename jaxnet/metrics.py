"""Classification metrics over logits (or probabilities) and integer labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxnet.losses import check_labels


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
    """``(batch,)`` bool: the label is among the top ``k`` classes (ties count against it)."""
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
