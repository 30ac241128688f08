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


#: a few lines of Python: the corpus of the text-run tests (every character is in the vocabulary)
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 1\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory of ten small ``.py`` files for ``jaxnet train --dataset text``."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(10):
        (root / f"module_{i}.py").write_text(TEXT * 6)
    return root
