"""Argument validators shared by the library: messages name the function or layer and argument."""

from __future__ import annotations

import numpy as np


def positive_int(where: str, name: str, value) -> int:
    """``value`` as an ``int`` if it is a positive integer (``bool`` refused), else a ``ValueError``
    like ``"fit: epochs must be a positive integer, got 0"``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return int(value)


def probability(where: str, name: str, value) -> float:
    """``value`` as a ``float`` if it is a number in ``[0, 1)`` (``bool`` refused), else a
    ``ValueError`` like ``"Dropout: drop_rate must be in [0, 1), got 1.5"``."""
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer))
            or not 0 <= value < 1):
        raise ValueError(f"{where}: {name} must be in [0, 1), got {value!r}")
    return float(value)
