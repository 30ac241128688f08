"""Helpers shared by the training tests: a known classification problem and a compile counter."""

import contextlib

import jax
import numpy as np


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block (``count[0]``)."""
    count = [0]

    def listener(name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def blobs(rng, n=200, classes=3, features=5):
    """Linearly separable-ish clusters: a known problem an MLP must learn."""
    centers = rng.normal(size=(classes, features)) * 3
    labels = rng.integers(0, classes, size=n)
    x = centers[labels] + rng.normal(size=(n, features))
    return x.astype(np.float32), labels.astype(np.int32)
