"""The classic networks that ``jaxnet train`` builds: an MLP and a small CNN.

Both output logits; ``jax.nn.softmax`` of them is the probability per class and the argmax is
the prediction (``softmax_cross_entropy`` applies the softmax inside the loss).
"""

from __future__ import annotations

from jaxnet.nn.activations import ACTIVATIONS
from jaxnet.nn.combinators import Serial, serial
from jaxnet.nn.conv import Conv2D, MaxPool
from jaxnet.nn.basic import Dense, Dropout, Flatten


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def mlp(hidden: tuple[int, ...], num_classes: int, activation: str = "relu",
        drop_rate: float = 0.0) -> Serial:
    """``Flatten, [Dense(h), activation, Dropout]* , Dense(num_classes)``.

    Args:
      hidden: widths of the hidden layers (may be empty: a linear classifier).
      num_classes: output width.
      activation: a name in ``jaxnet.nn.activations.ACTIVATIONS``.
      drop_rate: dropout after each hidden activation (none when 0).
    """
    act = _activation(activation)
    layers = [Flatten()]
    for width in hidden:
        layers += [Dense(width), act] + ([Dropout(drop_rate)] if drop_rate else [])
    return serial(*layers, Dense(num_classes))


def cnn(num_classes: int, activation: str = "relu", drop_rate: float = 0.0,
        channels: tuple[int, int] = (32, 64), dense: int = 128) -> Serial:
    """``conv3x3(32)-act-maxpool2-conv3x3(64)-act-maxpool2-dense(128)-act-dense(classes)``.

    Takes ``(batch, height, width, channels)`` images.
    """
    act = _activation(activation)
    drop = [Dropout(drop_rate)] if drop_rate else []
    return serial(Conv2D(channels[0], 3), act, MaxPool((2, 2)),
                  Conv2D(channels[1], 3), act, MaxPool((2, 2)),
                  Flatten(), *drop, Dense(dense), act, *drop, Dense(num_classes))
