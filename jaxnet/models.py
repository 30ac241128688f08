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


def transformer(vocab_size: int, *, num_blocks: int = 4, features: int = 256, num_heads: int = 4,
                max_length: int = 128, causal: bool | None = None, num_classes: int | None = None,
                tie_embeddings: bool = True, positional: str = "learned", drop_rate: float = 0.0,
                pad_id: int | None = None):
    """A transformer over token ids: a causal language model, or a sequence classifier.

    Args:
      vocab_size: number of token ids.
      num_blocks, features, num_heads: depth, width and attention heads of the pre-norm blocks
        (:class:`~jaxnet.nn.transformer.TransformerBlock`).
      max_length: the longest sequence.
      causal: causal attention; default True for a language model, False for a classifier.
      num_classes: ``None`` builds a language model (:class:`~jaxnet.nn.transformer.TransformerLM`,
        tokens ``(batch, time)`` to logits ``(batch, time, vocab_size)``); an integer builds a
        classifier (:class:`~jaxnet.nn.transformer.TransformerClassifier`, tokens to
        ``(batch, num_classes)`` logits from the mean over real tokens).
      tie_embeddings: (language model) the output projection is the embedding table.
      positional: ``"learned"``, ``"sinusoidal"`` or ``"rotary"``.
      drop_rate: dropout after the embedding and in every block.
      pad_id: tokens equal to it are padding (masked keys; left out of the classifier's mean).
    """
    from jaxnet.nn.transformer import TransformerClassifier, TransformerLM

    sizes = dict(num_blocks=num_blocks, features=features, num_heads=num_heads,
                 max_length=max_length, positional=positional, drop_rate=drop_rate, pad_id=pad_id)
    if num_classes is None:
        return TransformerLM(vocab_size, causal=True if causal is None else causal,
                             tie_embeddings=tie_embeddings, **sizes)
    return TransformerClassifier(vocab_size, causal=bool(causal), num_classes=num_classes, **sizes)
