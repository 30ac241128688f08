"""Positional encodings for sequences: a learned table, the sinusoidal table, and rotary (RoPE).

Learned and sinusoidal encodings are layers added to token embeddings. Rotary embeddings rotate
queries and keys inside attention (``MultiHeadAttention(..., rotary=True)``), so here they are
the pure function :func:`apply_rotary`.

Sequence layers take ``x`` of shape ``(batch, time, features)`` or the pair ``(x, mask)`` with
``mask`` ``(batch, time)`` bool, True at real tokens; :func:`sequence_and_mask` splits and
checks both forms.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.nn.basic import check_positive
from jaxnet.nn.layer import (Layer, ShapeError, require_example_ndim, require_floating, shape_str)
from jaxnet.nn.norm import statistics_dtype

SEQUENCE = "(time, features)"


def check_mask(mask, expected_shape: tuple[int, ...], what: str = "mask") -> None:
    """Raises unless ``mask`` is a bool array (or spec) of ``expected_shape`` ``(batch, time)``."""
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        raise TypeError(f"{what} must be a bool array of shape (batch, time); got {type(mask).__name__}")
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{what} must be bool (True at real tokens, False at padding); got "
                        f"{mask.dtype} of shape {shape_str(mask.shape)}")
    if tuple(mask.shape) != tuple(expected_shape):
        raise ShapeError(f"{what} of shape {shape_str(mask.shape)} does not fit the sequence: "
                         f"expected (batch, time) = {shape_str(expected_shape)}")


def sequence_and_mask(x):
    """``(x, mask)`` from an input ``x`` or ``(x, mask)``, checked; ``mask`` is ``None`` for a bare ``x``.

    ``x`` must be ``(batch, time, features)``, ``mask`` ``(batch, time)`` bool. Works on arrays and
    on ``jax.ShapeDtypeStruct`` specs alike.
    """
    mask = None
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise TypeError(f"expected an array (batch, time, features) or the pair (x, mask); got a "
                            f"{type(x).__name__} of {len(x)} entries")
        x, mask = x
    if not hasattr(x, "shape"):
        raise TypeError(f"expected an array (batch, time, features); got {type(x).__name__}")
    require_example_ndim(x, 2, SEQUENCE)
    if mask is not None:
        check_mask(mask, tuple(x.shape[:2]))
    return x, mask


def rejoin(like, y, mask):
    """``y`` in the structure of the input ``like``: bare, or the pair ``(y, mask)``."""
    return type(like)((y, mask)) if isinstance(like, (tuple, list)) else y


def apply_rotary(x, positions, base: float = 10000.0):
    """Rotary position embedding (RoPE): rotates pairs of features by position-dependent angles.

    Feature ``i`` of the first half pairs with feature ``i + dim/2`` (the "rotate half" layout
    of GPT-NeoX and LLaMA) and turns by ``position * base ** (-2 i / dim)``. Dot products of
    rotated queries and keys then depend on positions only through their difference.

    Args:
      x: floating array ``(..., dim)`` with ``dim`` even, e.g. ``(batch, time, heads, head_dim)``.
      positions: numbers (integer or floating) whose shape broadcasts against ``x.shape[:-1]``
        aligned on the right: ``(time,)`` for ``x`` ``(..., time, dim)``, ``(time, 1)`` for
        ``(batch, time, heads, head_dim)``.
      base: the wavelength base.

    Shapes:
      x: ``(..., dim)`` floating; positions: broadcastable to ``x.shape[:-1]``; returns ``x``'s
      shape and dtype. Angles and rotation are computed in float32 at least (float64 for
      float64 inputs) and rounded once.
    """
    x, positions = jnp.asarray(x), jnp.asarray(positions)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"apply_rotary: x must be floating, got {x.dtype}")
    dim = x.shape[-1] if x.ndim else 0
    if dim % 2 or dim == 0:
        raise ShapeError(f"apply_rotary: the last axis of x must have an even, nonzero size; "
                         f"got x of shape {shape_str(x.shape)}")
    if not (jnp.issubdtype(positions.dtype, jnp.integer) or jnp.issubdtype(positions.dtype, jnp.floating)):
        raise TypeError(f"apply_rotary: positions must be numbers, got {positions.dtype}")
    if positions.ndim > x.ndim - 1 or any(
            p not in (1, s) for p, s in zip(positions.shape[::-1], x.shape[-2::-1])):
        raise ShapeError(f"apply_rotary: positions of shape {shape_str(positions.shape)} do not "
                         f"broadcast against x.shape[:-1] = {shape_str(x.shape[:-1])}")
    dtype = statistics_dtype(x.dtype)
    half = dim // 2
    # the frequencies in float64 on the host, rounded once to the compute dtype
    inv_freq = jnp.asarray(base ** (-2.0 * np.arange(half) / dim), dtype)
    angles = positions.astype(dtype)[..., None] * jax.lax.broadcast_to_rank(inv_freq, positions.ndim + 1)
    angles = jnp.broadcast_to(angles, x.shape[:-1] + (half,))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xs = x.astype(dtype)
    x1, x2 = xs[..., :half], xs[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def sinusoidal_table(length: int, features: int) -> np.ndarray:
    """The float64 table of Vaswani et al.: ``[p, 2i] = sin(p / 10000**(2i/features))``, ``[p, 2i+1]`` cos."""
    positions = np.arange(length, dtype=np.float64)[:, None]
    rates = 10000.0 ** (-2.0 * (np.arange(features) // 2) / features)
    angles = positions * rates[None, :]
    return np.where(np.arange(features) % 2 == 0, np.sin(angles), np.cos(angles))


def _check_length(time: int, max_length: int | None) -> None:
    if max_length is not None and time > max_length:
        raise ShapeError(f"sequences of length {time} are longer than max_length={max_length}")


@dataclasses.dataclass(frozen=True, repr=False)
class LearnedPositionalEmbedding(Layer):
    """Adds a learned vector per position: ``y[:, t] = x[:, t] + table[t]``.

    Args:
      max_length: the longest sequence the table covers; longer inputs are an error.

    Shapes:
      x: ``(batch, time, features)`` floating with ``time <= max_length``, or ``(x, mask)`` with
      ``mask`` ``(batch, time)`` bool (passed through); params ``table: (max_length, features)``
      in x's dtype, initialised normal with standard deviation 0.02; y: like x.
    """

    max_length: int
    kind: ClassVar[str] = "positional_embedding"
    example_ndim: ClassVar[int] = 2

    def __post_init__(self):
        check_positive("LearnedPositionalEmbedding", "max_length", self.max_length)

    def init_params(self, key, x):
        x, _ = sequence_and_mask(x)
        require_floating(x)
        _check_length(x.shape[1], self.max_length)
        table = 0.02 * jax.random.normal(key, (self.max_length, x.shape[-1]), x.dtype)
        return {"table": table}, {}

    def forward(self, params, state, x, *, train, key):
        seq, mask = sequence_and_mask(x)
        _check_length(seq.shape[1], self.max_length)
        table = params["table"][:seq.shape[1]].astype(seq.dtype)
        return rejoin(x, seq + table[None], mask), state

    def flops(self, x_shape, y_shape, params):
        return int(np.prod(y_shape))


@dataclasses.dataclass(frozen=True, repr=False)
class SinusoidalPositionalEncoding(Layer):
    """Adds the fixed sin/cos table of "Attention is all you need"; no parameters.

    Args:
      max_length: when set, longer sequences are an error (the table itself has no limit).

    Shapes:
      x: ``(batch, time, features)`` floating, or ``(x, mask)`` (mask passed through); y: like x.
      The table is computed in float64 at trace time and rounded once to x's dtype.
    """

    max_length: int | None = None
    kind: ClassVar[str] = "sinusoidal"
    example_ndim: ClassVar[int] = 2

    def __post_init__(self):
        if self.max_length is not None:
            check_positive("SinusoidalPositionalEncoding", "max_length", self.max_length)

    def init_params(self, key, x):
        x, _ = sequence_and_mask(x)
        require_floating(x)
        _check_length(x.shape[1], self.max_length)
        return {}, {}

    def forward(self, params, state, x, *, train, key):
        seq, mask = sequence_and_mask(x)
        _check_length(seq.shape[1], self.max_length)
        table = jnp.asarray(sinusoidal_table(seq.shape[1], seq.shape[2]), seq.dtype)
        return rejoin(x, seq + table[None], mask), state
