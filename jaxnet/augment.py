"""On-device data augmentation for channels-last image batches: pure functions of ``(key, x)``.

They run inside the compiled training step (``fit_streaming(..., augment=...)``), so augmenting
costs no host time and no transfer. Each example draws its own crop offset or flip from ``key``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxnet.nn.layer import ShapeError

Augment = Callable[[jax.Array, jax.Array], jax.Array]


def _require_images(x, name: str) -> None:
    if x.ndim != 4:
        raise ShapeError(f"{name}: expected images (batch, height, width, channels), got shape "
                         f"{tuple(x.shape)}")


def random_flip(key: jax.Array, x: jax.Array) -> jax.Array:
    """Mirrors each image left to right with probability 1/2.

    Args:
      key: a PRNG key; x: the batch.

    Shapes:
      x: ``(batch, height, width, channels)``, any dtype; the result: the same.
    """
    _require_images(x, "random_flip")
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1, :], x)


def random_crop(key: jax.Array, x: jax.Array, padding: int) -> jax.Array:
    """Pads each image with ``padding`` zeros on every side and crops it back to its size at
    a random offset (the usual CIFAR augmentation): a shift by up to ``padding`` pixels.

    Args:
      key: a PRNG key; x: the batch; padding: pixels of zeros added on each side (>= 0).

    Shapes:
      x: ``(batch, height, width, channels)``, any dtype; the result: the same.
    """
    _require_images(x, "random_crop")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"random_crop: padding must be an int >= 0, got {padding!r}")
    if padding == 0:
        return x
    batch, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (batch, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, offsets)


def compose(*augments: Augment) -> Augment:
    """One augmentation applying ``augments`` in order, each with its own key."""
    def augment(key, x):
        for k, fn in zip(jax.random.split(key, len(augments)), augments):
            x = fn(k, x)
        return x
    return augment
