"""Strict numerics for every test: no implicit rank promotion, no silent dtype promotion."""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def rng():
    """A NumPy generator for random (never all-zero) test inputs."""
    return np.random.default_rng(0)
