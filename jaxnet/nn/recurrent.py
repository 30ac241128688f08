"""Recurrent layers: SimpleRNN, LSTM and GRU cells run over time by :class:`Recurrent`.

The cells compute exactly PyTorch's ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (gate order LSTM
``i, f, g, o``, GRU ``r, z, n`` with ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``), with
both of PyTorch's biases, so weights map 1:1: ``params["input"]["w"] = weight_ih_l0.T``,
``params["input"]["b"] = bias_ih_l0``, ``params["hidden"]["w"] = weight_hh_l0.T``,
``params["hidden"]["b"] = bias_hh_l0``. Initialisation is PyTorch's too: every entry uniform in
``±1/sqrt(hidden)``.

The input projection of all time steps is one ``(batch * time, in) @ (in, G * hidden)`` matmul
before the scan, so that ``lax.scan`` only runs the small hidden matmul per step. Under the
``"bf16"`` precision policy both run on bfloat16 operands with float32 accumulation, forward and
backward (:func:`jaxnet.nn.basic.matmul`); the state and gates stay float32.

When the caller promises reverse mode only (``apply_with_state(..., reverse_only=True)``, as
``fit`` does), the scan runs through ``jaxnet._xla.recurrence_ops.scan``, whose gradient computes
the hidden weight's gradient in one product after the reverse loop and reuses the gate
activations the forward loop saved (each cell's ``combine_fwd``/``combine_bwd``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from jaxnet._xla import recurrence_ops
from jaxnet.nn.activations import ACTIVATIONS, tanh
from jaxnet.nn.basic import check_positive, matmul
from jaxnet.nn.layer import (Layer, ShapeError, broadcast_trailing, require_example_ndim,
                             require_floating, shape_str, trace_options)


# ---- cells ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Cell:
    """One step of a recurrence, as plain functions that :class:`Recurrent` scans.

    ``init`` makes the params, ``zero_state`` the default state, ``project`` maps inputs to the
    ``G * hidden`` input terms ``x @ W_input`` (it runs once over all time steps),
    ``step(params, state, xp) -> state`` adds the biases (:meth:`biases`) to ``xp`` and to the
    hidden term ``hp = output(state) @ W_hidden`` and computes ``combine(state, xp, hp)``, and
    ``output(state)`` is the ``h`` of a state. ``combine_fwd`` also returns what
    ``combine_bwd(residuals, d_new) -> (d_state, d_xp, d_hp)`` needs (by default its inputs, and
    the gradient by ``jax.vjp``; LSTM and GRU save their gate activations and need no
    transcendental function in the backward pass). ``project`` and ``step`` take the product to
    use as ``matmul`` (``jnp.matmul`` by default).
    """

    hidden: int
    gates: ClassVar[int] = 1
    kind: ClassVar[str] = "recurrent"
    folds_hidden_bias: ClassVar[bool] = True

    def __post_init__(self):
        check_positive(type(self).__name__, "hidden", self.hidden)

    def init(self, key, in_features: int, dtype) -> dict:
        """PyTorch's initialisation: ``{"input": {"w": (in, G*hidden), "b"}, "hidden": {...}}``."""
        bound, width = 1 / math.sqrt(self.hidden), self.gates * self.hidden
        shapes = {"input": {"w": (in_features, width), "b": (width,)},
                  "hidden": {"w": (self.hidden, width), "b": (width,)}}
        leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(tree, [jax.random.uniform(k, s, dtype, -bound, bound)
                                         for k, s in zip(keys, leaves)])

    def zero_state(self, batch: int, dtype):
        """The default initial state: zeros of shape ``(batch, hidden)``."""
        return jnp.zeros((batch, self.hidden), dtype)

    def project(self, params, x, matmul=jnp.matmul):
        """``(n, in) -> (n, G*hidden)``: ``x @ W_input``, the biases left to every step (added
        to the step's gates, they cost no pass over all steps' projections)."""
        return matmul(x, params["input"]["w"])

    def biases(self, params):
        """``(b_x, b_h)``, added every step to ``xp`` and to ``hp``: ``(None, b_input +
        b_hidden)`` where ``folds_hidden_bias``, else ``(b_input, b_hidden)``."""
        b_input, b_hidden = params["input"]["b"], params["hidden"]["b"]
        return (None, b_input + b_hidden) if self.folds_hidden_bias else (b_input, b_hidden)

    def step(self, params, state, xp, matmul=jnp.matmul):
        """The state after one step; ``xp`` is this step's ``project`` output."""
        hp = matmul(self.output(state), params["hidden"]["w"])
        b_x, b_h = self.biases(params)
        xp = xp if b_x is None else xp + broadcast_trailing(b_x, xp)
        return self.combine(state, xp, hp + broadcast_trailing(b_h, hp))

    def combine(self, state, xp, hp):
        """The new state from the state, the input term ``xp`` and the hidden term ``hp``."""
        return self.combine_fwd(state, xp, hp)[0]

    def combine_fwd(self, state, xp, hp):
        """``(new_state, residuals)``: :meth:`combine` and what :meth:`combine_bwd` needs."""
        raise NotImplementedError

    def combine_bwd(self, residuals, d_new):
        """``(d_state, d_xp, d_hp)`` for the cotangent ``d_new`` of the new state; ``d_xp`` is
        ``d_hp`` itself (the same object) where the two are equal."""
        _, pullback = jax.vjp(self.combine, *residuals)
        return pullback(d_new)

    def output(self, state):
        """The cell's output ``h`` of ``state``."""
        return state


@dataclasses.dataclass(frozen=True)
class SimpleRNNCell(_Cell):
    """Elman RNN, ``h' = activation(x W_input + b_input + h W_hidden + b_hidden)`` (``nn.RNN``).

    Args:
      hidden: state width.
      activation: a function such as ``jaxnet.tanh`` (default) or ``jaxnet.relu``, or its name.

    Shapes:
      state ``h: (batch, hidden)``; params ``input.w: (in, hidden)``, ``hidden.w: (hidden, hidden)``,
      both ``b: (hidden,)``.
    """

    activation: Callable[[jax.Array], jax.Array] = tanh
    kind: ClassVar[str] = "simple_rnn"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.activation, str) and self.activation in ACTIVATIONS:
            object.__setattr__(self, "activation", ACTIVATIONS[self.activation])
        if not callable(self.activation):
            raise TypeError(f"SimpleRNNCell: activation must be a function or one of "
                            f"{sorted(ACTIVATIONS)}, got {self.activation!r}")

    def combine(self, h, xp, hp):
        return self.activation(xp + hp)

    def combine_fwd(self, h, xp, hp):
        return self.combine(h, xp, hp), (h, xp, hp)


@dataclasses.dataclass(frozen=True)
class LSTMCell(_Cell):
    """Long short-term memory (``nn.LSTM``), gates ``i, f, g, o`` in that order.

    ``c' = f * c + i * g``, ``h' = o * tanh(c')`` with ``i, f, o`` sigmoid and ``g`` tanh gates.

    Shapes:
      state ``(h, c)``, each ``(batch, hidden)``; params ``input.w: (in, 4*hidden)``,
      ``hidden.w: (hidden, 4*hidden)``, both ``b: (4*hidden,)``.
    """

    gates: ClassVar[int] = 4
    kind: ClassVar[str] = "lstm"

    def zero_state(self, batch, dtype):
        return (jnp.zeros((batch, self.hidden), dtype), jnp.zeros((batch, self.hidden), dtype))

    def output(self, state):
        return state[0]

    def combine_fwd(self, state, xp, hp):
        _, c = state
        i, f, g, o = jnp.split(xp + hp, 4, axis=-1)
        i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
        c = f * c + i * g
        tanh_c = jnp.tanh(c)
        return (o * tanh_c, c), (i, f, g, o, state[1], tanh_c)

    def combine_bwd(self, residuals, d_new):
        i, f, g, o, c, tanh_c = residuals
        dh, dc = d_new
        dc = dc + dh * o * (1 - tanh_c * tanh_c)
        d_gates = jnp.concatenate([dc * g * i * (1 - i), dc * c * f * (1 - f),
                                   dc * i * (1 - g * g), dh * tanh_c * o * (1 - o)], axis=-1)
        return (jnp.zeros_like(dh), dc * f), d_gates, d_gates


@dataclasses.dataclass(frozen=True)
class GRUCell(_Cell):
    """Gated recurrent unit as PyTorch's ``nn.GRU``, gates ``r, z, n`` in that order.

    ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h' = (1 - z) * n + z * h``.

    Shapes:
      state ``h: (batch, hidden)``; params ``input.w: (in, 3*hidden)``,
      ``hidden.w: (hidden, 3*hidden)``, both ``b: (3*hidden,)``.
    """

    gates: ClassVar[int] = 3
    kind: ClassVar[str] = "gru"
    folds_hidden_bias: ClassVar[bool] = False  # b_hn sits inside r * (...)

    def combine_fwd(self, h, xp, hp):
        width = 2 * self.hidden
        r, z = jnp.split(jax.nn.sigmoid(xp[..., :width] + hp[..., :width]), 2, axis=-1)
        hn = hp[..., width:]
        n = jnp.tanh(xp[..., width:] + r * hn)
        return (1 - z) * n + z * h, (h, r, z, n, hn)

    def combine_bwd(self, residuals, d_new):
        h, r, z, n, hn = residuals
        dn = d_new * (1 - z) * (1 - n * n)
        dr, dz = dn * hn * r * (1 - r), d_new * (h - n) * z * (1 - z)
        return (d_new * z, jnp.concatenate([dr, dz, dn], axis=-1),
                jnp.concatenate([dr, dz, dn * r], axis=-1))


# ---- inputs --------------------------------------------------------------------------

def split_inputs(inputs) -> tuple[Any, Any, Any]:
    """``x``, ``(x, mask)`` or ``{"x", "mask"?, "initial_state"?}`` as ``(x, mask, initial_state)``."""
    if isinstance(inputs, dict):
        unknown = sorted(set(inputs) - {"x", "mask", "initial_state"})
        if "x" not in inputs or unknown:
            raise ValueError(f"a dict input needs the key 'x' and may have 'mask' and 'initial_state'; "
                             f"got keys {sorted(inputs)}")
        return inputs["x"], inputs.get("mask"), inputs.get("initial_state")
    if isinstance(inputs, (tuple, list)):
        if len(inputs) != 2:
            raise ValueError(f"a tuple input must be (x, mask); got {len(inputs)} entries")
        return inputs[0], inputs[1], None
    return inputs, None, None


def _check_mask(x, mask) -> None:
    if mask is None:
        return
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ShapeError(f"mask must have shape (batch, time) = {shape_str(x.shape[:2])} like x "
                         f"{shape_str(x.shape)}; got {shape_str(mask.shape)}")
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be bool (True = real step), got {mask.dtype}; "
                        "use mask.astype(bool)")


# ---- layers --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, repr=False)
class Recurrent(Layer):
    """Runs ``cell`` over the time axis with ``jax.lax.scan``.

    Padded steps (``mask`` False) keep the state unchanged and output zeros, so padding
    never reaches the outputs at real steps, in either direction: with ``reverse=True`` a
    right-padded sequence starts from its last real step.

    Args:
      cell: a :class:`SimpleRNNCell`, :class:`LSTMCell` or :class:`GRUCell`.
      return_sequences: output every step ``(batch, time, hidden)``; else only the output
        of the last step processed ``(batch, hidden)`` (the last real step; the first real
        step when ``reverse``; the initial ``h`` for a sequence without real steps).
      reverse: run from the last step to the first; outputs stay aligned with the input.
      return_state: output ``(y, final_state)``, the state after the last real step.

    Shapes:
      x: ``(batch, time, features)`` floating, or ``(x, mask)`` with ``mask (batch, time)`` bool
      (True = real step), or ``{"x": x, "mask": mask, "initial_state": s}`` (each but ``x``
      optional); a state is ``(batch, hidden)``, for LSTM the pair ``(h, c)``, default zeros
      (a given one is cast to x's dtype).
      params: ``{"input": {"w": (features, G*hidden), "b": (G*hidden,)}, "hidden": {"w":
      (hidden, G*hidden), "b": (G*hidden,)}}`` in x's dtype (``G`` = 1, 4, 3 for RNN, LSTM, GRU).
      y: ``(batch, time, hidden)`` or ``(batch, hidden)`` in x's dtype.
    """

    cell: _Cell
    return_sequences: bool = True
    reverse: bool = False
    return_state: bool = False
    example_ndim: ClassVar[int] = 2

    def __post_init__(self):
        if not isinstance(self.cell, _Cell):
            raise TypeError(f"Recurrent: cell must be a SimpleRNNCell, LSTMCell or GRUCell, got {self.cell!r}")
        for name in ("return_sequences", "reverse", "return_state"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Recurrent: {name} must be True or False, got {getattr(self, name)!r}")

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.cell.kind

    def _check(self, inputs):
        x, mask, initial = split_inputs(inputs)
        require_example_ndim(x, 2, "(time, features)")
        require_floating(x)
        _check_mask(x, mask)
        if initial is not None:
            expected = jax.eval_shape(lambda: self.cell.zero_state(x.shape[0], x.dtype))
            shapes = jax.tree.map(lambda s: tuple(s.shape), initial)
            if jax.tree.structure(initial) != jax.tree.structure(expected) or shapes != jax.tree.map(
                    lambda s: tuple(s.shape), expected):
                want = "a pair (h, c), each" if isinstance(self.cell, LSTMCell) else "an array"
                raise ShapeError(f"initial_state must be {want} of shape (batch, hidden) = "
                                 f"{shape_str((x.shape[0], self.cell.hidden))}; got {shapes}")
        return x, mask, initial

    def init_params(self, key, x):
        x, _, _ = self._check(x)
        return self.cell.init(key, x.shape[-1], x.dtype), {}

    def forward(self, params, state, x, *, train, key):
        x, mask, carry = self._check(x)
        batch, time, features = x.shape
        cell = self.cell
        # one matmul for every step's input projection; the scan runs only the hidden one. The
        # scan wants time-major steps: transposing x costs less than transposing G*hidden gates.
        xs = jnp.swapaxes(x, 0, 1).reshape(time * batch, features)
        xs = cell.project(params, xs, matmul).reshape(time, batch, cell.gates * cell.hidden)
        if carry is None:
            carry = cell.zero_state(batch, x.dtype)
        carry = jax.tree.map(lambda s: jnp.asarray(s, x.dtype), carry)
        keep_ys, mask_t = self.return_sequences, None if mask is None else mask.T
        options = trace_options()
        if options.reverse_only:
            final, ys = recurrence_ops.scan(
                cell, self.reverse, keep_ys, options.matmul_dtype, params["hidden"]["w"],
                *cell.biases(params), xs, carry, mask_t)
        else:
            final, ys = self._scan(params, xs, carry, mask_t, options.matmul_dtype)
        y = jnp.swapaxes(ys, 0, 1) if keep_ys else cell.output(final)
        return ((y, final) if self.return_state else y), state

    def _scan(self, params, xs, carry, mask_t, matmul_dtype):
        """``(final_state, ys)`` by autodiff-able ``lax.scan`` (any differentiation mode)."""
        cell, keep_ys = self.cell, self.return_sequences
        # the per-step product rounds its operands under the "bf16" policy; otherwise it stays
        # the plain product
        step_matmul = jnp.matmul if matmul_dtype is None else matmul

        def body(carry, step_input):
            xp_t, real = step_input
            new = cell.step(params, carry, xp_t, step_matmul)
            h = cell.output(new)
            if real is not None:  # padded steps keep the state and output zeros
                real = real[:, None]
                new = jax.tree.map(lambda a, b: jnp.where(real, a, b), new, carry)
                h = jnp.where(real, h, jnp.zeros_like(h))
            return new, (h if keep_ys else None)

        return lax.scan(body, carry, (xs, mask_t), reverse=self.reverse)

    def flops(self, x_shape, y_shape, params):
        batch, time, features = x_shape[:3]
        width = self.cell.gates * self.cell.hidden
        return 2 * batch * time * (features + self.cell.hidden) * width + 4 * batch * time * width


def SimpleRNN(hidden: int, activation=tanh, **recurrent_kwargs) -> Recurrent:  # noqa: N802
    """``Recurrent(SimpleRNNCell(hidden, activation), **recurrent_kwargs)``.

    Args:
      hidden: state width. activation: as :class:`SimpleRNNCell`.
      **recurrent_kwargs: ``return_sequences``, ``reverse``, ``return_state`` of :class:`Recurrent`.
    """
    return Recurrent(SimpleRNNCell(hidden, activation), **recurrent_kwargs)


def LSTM(hidden: int, **recurrent_kwargs) -> Recurrent:  # noqa: N802
    """``Recurrent(LSTMCell(hidden), **recurrent_kwargs)``, e.g. ``LSTM(hidden=256)``.

    Args:
      hidden: state width (the output width).
      **recurrent_kwargs: ``return_sequences``, ``reverse``, ``return_state`` of :class:`Recurrent`.
    """
    return Recurrent(LSTMCell(hidden), **recurrent_kwargs)


def GRU(hidden: int, **recurrent_kwargs) -> Recurrent:  # noqa: N802
    """``Recurrent(GRUCell(hidden), **recurrent_kwargs)``.

    Args:
      hidden: state width (the output width).
      **recurrent_kwargs: ``return_sequences``, ``reverse``, ``return_state`` of :class:`Recurrent`.
    """
    return Recurrent(GRUCell(hidden), **recurrent_kwargs)


@dataclasses.dataclass(frozen=True, repr=False)
class Bidirectional(Layer):
    """A forward and a backward :class:`Recurrent` over the same input, merged on the last axis.

    Args:
      forward_layer: a :class:`Recurrent` with ``reverse=False``.
      backward_layer: a :class:`Recurrent` with ``reverse=True``; default a copy of
        ``forward_layer`` with ``reverse=True``. Both must agree on ``return_sequences`` and
        ``return_state``.
      merge: ``"concat"`` (forward first) or ``"sum"``.

    Shapes:
      x: as :class:`Recurrent`; a dict's ``initial_state`` is ``{"forward": s, "backward": s}``.
      params: ``{"forward": ..., "backward": ...}``. y: ``(batch, [time,] h_forward + h_backward)``
      for concat, ``(batch, [time,] hidden)`` for sum; with ``return_state``
      ``(y, {"forward": state, "backward": state})``.
    """

    forward_layer: Recurrent
    backward_layer: Recurrent | None = None
    merge: str = "concat"
    kind: ClassVar[str] = "bidirectional"
    example_ndim: ClassVar[int] = 2

    def __post_init__(self):
        if not isinstance(self.forward_layer, Recurrent) or self.forward_layer.reverse:
            raise TypeError(f"Bidirectional: forward_layer must be a Recurrent layer with "
                            f"reverse=False, got {self.forward_layer!r}")
        back = self.backward
        if not isinstance(back, Recurrent) or not back.reverse:
            raise TypeError(f"Bidirectional: backward_layer must be a Recurrent layer with "
                            f"reverse=True, got {back!r}")
        if (back.return_sequences, back.return_state) != (self.forward_layer.return_sequences,
                                                          self.forward_layer.return_state):
            raise ValueError("Bidirectional: forward_layer and backward_layer must agree on "
                             "return_sequences and return_state")
        if self.merge not in ("concat", "sum"):
            raise ValueError(f"Bidirectional: merge must be 'concat' or 'sum', got {self.merge!r}")
        if self.merge == "sum" and back.cell.hidden != self.forward_layer.cell.hidden:
            raise ValueError(f"Bidirectional: merge='sum' needs equal hidden sizes, got "
                             f"{self.forward_layer.cell.hidden} and {back.cell.hidden}")

    @property
    def backward(self) -> Recurrent:
        """The backward layer: ``backward_layer``, or the forward one with ``reverse=True``."""
        if self.backward_layer is None:
            return dataclasses.replace(self.forward_layer, reverse=True)
        return self.backward_layer

    def _layers(self):
        # a leaf for the library (one summary row with the merged output), built of two layers
        return (("forward", self.forward_layer), ("backward", self.backward))

    def _directions(self, inputs):
        """The input of each direction: ``x``, or a dict with the mask and its initial state."""
        x, mask, initial = split_inputs(inputs)
        if initial is not None and (not isinstance(initial, dict)
                                    or set(initial) != {"forward", "backward"}):
            raise ValueError("Bidirectional: initial_state must be a dict {'forward': state, "
                             f"'backward': state}}; got {type(initial).__name__}")
        if mask is None and initial is None:
            return [x, x]
        return [{"x": x, "mask": mask, **({} if initial is None else {"initial_state": initial[name]})}
                for name in ("forward", "backward")]

    def init_params(self, key, x):
        params = {name: layer.init_params(k, v)[0] for (name, layer), k, v in
                  zip(self._layers(), jax.random.split(key), self._directions(x))}
        return params, {}

    def forward(self, params, state, x, *, train, key):
        outputs = [layer.forward(params[name], {}, v, train=train, key=None)[0]
                   for (name, layer), v in zip(self._layers(), self._directions(x))]
        ys = [o[0] for o in outputs] if self.forward_layer.return_state else outputs
        y = ys[0] + ys[1] if self.merge == "sum" else jnp.concatenate(ys, axis=-1)
        if self.forward_layer.return_state:
            return (y, {"forward": outputs[0][1], "backward": outputs[1][1]}), state
        return y, state

    def flops(self, x_shape, y_shape, params):
        return sum(layer.flops(x_shape, y_shape, params[name]) for name, layer in self._layers())
