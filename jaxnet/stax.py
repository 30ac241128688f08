"""A drop-in replacement for ``jax.example_libraries.stax``, and conversions to and from jaxnet.

Every name ``stax`` exports is here with the same signature and meaning, so stax code
runs unchanged after ``from jaxnet import stax``: a layer is a pair
``(init_fun, apply_fun)`` with ``init_fun(rng, input_shape) -> (output_shape, params)``
(``-1`` allowed for the batch size) and ``apply_fun(params, inputs, **kwargs)``; params
are stax's tuples and lists, initialised from the same keys, so the same ``rng`` gives
the same numbers. ``Dropout(rate)`` keeps stax's meaning: ``rate`` is the probability
of *keeping* a value, and the key comes as ``apply_fun(..., rng=key)``.

What differs, none of it visible to correct stax code:

* no layer relies on implicit rank promotion (Dense adds its bias with
  ``broadcast_to_rank``), so stax networks run under ``jax_numpy_rank_promotion="raise"``;
* wrong shapes fail at once with a ``ShapeError`` naming the layer
  (``Dense: inputs of shape (2, 5) have 5 features ...``) instead of deep inside XLA;
  ``serial``/``parallel`` check that params and inputs have one entry per layer
  instead of silently dropping the rest;
* ``Dropout(rate, mode="test")`` needs no ``rng`` (stax demands one it does not use),
  and ``Dropout`` reads an optional ``train=`` keyword that overrides ``mode`` (stax's
  ``serial`` passes keywords to every layer), which :func:`from_stax` uses;
* ``BatchNorm`` accepts negative axes.

:func:`to_stax` turns a jaxnet network into a stax pair and :func:`from_stax` a stax
pair into a jaxnet layer, so the two mix in both directions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, random
from jax.nn import (elu, gelu, leaky_relu, log_softmax, relu, selu, sigmoid, softmax, softplus,
                    standardize)
from jax.nn.initializers import glorot_normal, normal, ones, zeros

from jaxnet.nn.combinators import as_layer
from jaxnet.nn.layer import Layer, ShapeError, apply_child, shape_str
from jaxnet.nn.shapes import expected_trees
from jaxnet.trees import compare_trees

__all__ = [
    "AvgPool", "BatchNorm", "Conv", "Conv1DTranspose", "ConvTranspose", "Dense", "Dropout", "Elu", "Exp",
    "FanInConcat", "FanInSum", "FanOut", "Flatten", "FromStax", "Gelu", "GeneralConv",
    "GeneralConvTranspose", "Identity", "LeakyRelu", "LogSoftmax", "MaxPool", "Relu", "Selu", "Sigmoid",
    "Softmax", "Softplus", "SumPool", "Tanh", "elementwise", "elu", "from_stax", "gelu", "glorot",
    "glorot_normal", "leaky_relu", "log_softmax", "logsoftmax", "normal", "ones", "parallel", "randn",
    "relu", "selu", "serial", "shape_dependent", "sigmoid", "softmax", "softplus", "standardize",
    "to_stax", "zeros",
]

# stax's aliases, kept for code that imports them from stax.
glorot = glorot_normal
randn = normal
logsoftmax = log_softmax

InitFun = Callable  # (rng, input_shape) -> (output_shape, params)
ApplyFun = Callable  # (params, inputs, **kwargs) -> outputs


def _check_rank(layer: str, shape, rank: int, layout: str) -> None:
    if len(shape) != rank:
        raise ShapeError(f"{layer}: expected inputs of rank {rank} {layout}; got shape "
                         f"{shape_str(tuple(shape))} (rank {len(shape)})")


def _int_tuple(shape) -> tuple[int, ...]:
    """lax's shape helpers return NumPy integers; stax users compare with Python ints."""
    return tuple(int(d) for d in shape)


# ---- layers ----------------------------------------------------------------------------

def Dense(out_dim, W_init=glorot_normal(), b_init=normal()):
    """Fully connected layer: ``inputs @ W + b`` on the last axis.

    Args:
      out_dim: output width.
      W_init, b_init: initializers ``init(key, shape)``.

    Shapes:
      inputs ``(batch, ..., in_dim)``; params ``(W: (in_dim, out_dim), b: (out_dim,))``;
      outputs ``(batch, ..., out_dim)``.
    """
    def init_fun(rng, input_shape):
        if len(input_shape) < 1:
            raise ShapeError("Dense: expected inputs with a feature axis (..., in_dim); got shape ()")
        w_key, b_key = random.split(rng)
        params = (W_init(w_key, (input_shape[-1], out_dim)), b_init(b_key, (out_dim,)))
        return tuple(input_shape[:-1]) + (out_dim,), params

    def apply_fun(params, inputs, **kwargs):
        W, b = params
        if inputs.shape[-1:] != W.shape[:1]:
            raise ShapeError(
                f"Dense: inputs of shape {shape_str(inputs.shape)} have "
                f"{inputs.shape[-1] if inputs.ndim else 'no'} features on the last axis, but W of shape "
                f"{shape_str(W.shape)} expects {W.shape[0]} (params made for another input width?)")
        y = jnp.dot(inputs, W)
        return y + lax.broadcast_to_rank(b, y.ndim)
    return init_fun, apply_fun


def _conv_layer(name, transpose, dimension_numbers, out_chan, filter_shape, strides, padding,
                W_init, b_init):
    """A convolution (or transposed convolution) pair; see :func:`GeneralConv`."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    if not len(lhs_spec) == len(rhs_spec) == len(out_spec) == len(filter_shape) + 2:
        raise ValueError(f"{name}: dimension_numbers {dimension_numbers} need {len(filter_shape) + 2} "
                         f"letters each for a filter_shape of {len(filter_shape)} spatial sizes")
    strides = tuple(strides or (1,) * len(filter_shape))
    W_init = W_init or glorot_normal(rhs_spec.index("I"), rhs_spec.index("O"))
    shape_fn = lax.conv_transpose_shape_tuple if transpose else lax.conv_general_shape_tuple
    layout = f"({lhs_spec})"

    def init_fun(rng, input_shape):
        _check_rank(name, input_shape, len(lhs_spec), layout)
        sizes = iter(filter_shape)
        in_chan = input_shape[lhs_spec.index("C")]
        kernel_shape = tuple(out_chan if c == "O" else in_chan if c == "I" else next(sizes)
                             for c in rhs_spec)
        output_shape = shape_fn(tuple(input_shape), kernel_shape, strides, padding, dimension_numbers)
        bias_shape = tuple(out_chan if c == "C" else 1 for c in out_spec)  # full rank: no promotion
        w_key, b_key = random.split(rng)
        return _int_tuple(output_shape), (W_init(w_key, kernel_shape), b_init(b_key, bias_shape))

    def apply_fun(params, inputs, **kwargs):
        W, b = params
        _check_rank(name, inputs.shape, len(lhs_spec), layout)
        channels, expected = inputs.shape[lhs_spec.index("C")], W.shape[rhs_spec.index("I")]
        if channels != expected:
            raise ShapeError(f"{name}: inputs of shape {shape_str(inputs.shape)} {layout} have {channels} "
                             f"channels, but W of shape {shape_str(W.shape)} ({rhs_spec}) expects {expected}")
        if transpose:
            y = lax.conv_transpose(inputs, W, strides, padding, dimension_numbers=dimension_numbers)
        else:
            y = lax.conv_general_dilated(inputs, W, strides, padding, dimension_numbers=dimension_numbers)
        return y + b
    return init_fun, apply_fun


def GeneralConv(dimension_numbers, out_chan, filter_shape, strides=None, padding="VALID",
                W_init=None, b_init=normal(1e-6)):
    """Convolution with any layout.

    Args:
      dimension_numbers: ``(lhs_spec, rhs_spec, out_spec)`` layouts, e.g.
        ``("NHWC", "HWIO", "NHWC")``.
      out_chan: output channels.
      filter_shape: kernel size per spatial axis, e.g. ``(3, 3)``.
      strides: stride per spatial axis; default 1.
      padding: ``"VALID"``, ``"SAME"`` or ``(low, high)`` pairs per spatial axis.
      W_init: defaults to Glorot normal over the kernel's ``I`` and ``O`` axes.
      b_init: bias initializer.

    Shapes:
      inputs laid out as ``lhs_spec``; params ``(W, b)`` with ``W`` laid out as ``rhs_spec``
      and ``b`` of the output's rank (1 except on ``C``); outputs laid out as ``out_spec``.
    """
    return _conv_layer("GeneralConv", False, dimension_numbers, out_chan, filter_shape, strides,
                       padding, W_init, b_init)


def Conv(out_chan, filter_shape, strides=None, padding="VALID", W_init=None, b_init=normal(1e-6)):
    """2-D convolution over ``(batch, height, width, channels)`` inputs; see :func:`GeneralConv`."""
    return _conv_layer("Conv", False, ("NHWC", "HWIO", "NHWC"), out_chan, filter_shape, strides,
                       padding, W_init, b_init)


def GeneralConvTranspose(dimension_numbers, out_chan, filter_shape, strides=None, padding="VALID",
                         W_init=None, b_init=normal(1e-6)):
    """Transposed convolution (``lax.conv_transpose``) with any layout; arguments as :func:`GeneralConv`."""
    return _conv_layer("GeneralConvTranspose", True, dimension_numbers, out_chan, filter_shape,
                       strides, padding, W_init, b_init)


def ConvTranspose(out_chan, filter_shape, strides=None, padding="VALID", W_init=None,
                  b_init=normal(1e-6)):
    """2-D transposed convolution over ``(batch, height, width, channels)``; see :func:`GeneralConv`."""
    return _conv_layer("ConvTranspose", True, ("NHWC", "HWIO", "NHWC"), out_chan, filter_shape,
                       strides, padding, W_init, b_init)


def Conv1DTranspose(out_chan, filter_shape, strides=None, padding="VALID", W_init=None,
                    b_init=normal(1e-6)):
    """1-D transposed convolution over ``(batch, length, channels)``; see :func:`GeneralConv`."""
    return _conv_layer("Conv1DTranspose", True, ("NHC", "HIO", "NHC"), out_chan, filter_shape,
                       strides, padding, W_init, b_init)


def _normalize_axes(axes: tuple[int, ...], rank: int, shape) -> tuple[int, ...]:
    bad = [a for a in axes if not -rank <= a < rank]
    if bad:
        raise ShapeError(f"BatchNorm: axis {bad[0]} is out of range for inputs of shape {shape_str(tuple(shape))}; "
                         "for (batch, features) inputs use BatchNorm(axis=(0,))")
    return tuple(sorted(a % rank for a in axes))


def BatchNorm(axis=(0, 1, 2), epsilon=1e-5, center=True, scale=True, beta_init=zeros,
              gamma_init=ones):
    """Normalises with the statistics of the current batch (stax keeps no running averages).

    Args:
      axis: axes to average over; the default suits ``(batch, height, width, channels)``.
      epsilon: added to the variance.
      center, scale: learn a shift ``beta`` and a scale ``gamma`` (else that param is ``()``).

    Shapes:
      inputs ``x`` any shape; params ``(beta, gamma)`` of ``x``'s shape without ``axis``
      (``(channels,)`` by default); outputs like ``x``.
    """
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)

    def init_fun(rng, input_shape):
        normalized = _normalize_axes(axes, len(input_shape), input_shape)
        shape = tuple(d for i, d in enumerate(input_shape) if i not in normalized)
        beta_key, gamma_key = random.split(rng)
        beta = beta_init(beta_key, shape) if center else ()
        gamma = gamma_init(gamma_key, shape) if scale else ()
        return input_shape, (beta, gamma)

    def apply_fun(params, x, **kwargs):
        beta, gamma = params
        normalized = _normalize_axes(axes, x.ndim, x.shape)
        expected = tuple(d for i, d in enumerate(x.shape) if i not in normalized)
        for name, p, used in (("beta", beta, center), ("gamma", gamma, scale)):
            if used and jnp.shape(p) != expected:
                raise ShapeError(f"BatchNorm: {name} has shape {shape_str(jnp.shape(p))}, expected "
                                 f"{shape_str(expected)} for inputs of shape {shape_str(x.shape)}")
        z = standardize(x, normalized, epsilon=epsilon)
        if scale:
            z = jnp.expand_dims(gamma, normalized) * z
        if center:
            z = z + jnp.expand_dims(beta, normalized)
        return z
    return init_fun, apply_fun


def elementwise(fun, **fun_kwargs):
    """A layer without params applying ``fun(inputs, **fun_kwargs)``; the output shape is the input's."""
    def init_fun(rng, input_shape):
        return input_shape, ()

    def apply_fun(params, inputs, **kwargs):
        return fun(inputs, **fun_kwargs)
    return init_fun, apply_fun


Tanh = elementwise(jnp.tanh)
Relu = elementwise(relu)
Exp = elementwise(jnp.exp)
LogSoftmax = elementwise(log_softmax, axis=-1)
Softmax = elementwise(softmax, axis=-1)
Softplus = elementwise(softplus)
Sigmoid = elementwise(sigmoid)
Elu = elementwise(elu)
LeakyRelu = elementwise(leaky_relu)
Selu = elementwise(selu)
Gelu = elementwise(gelu)


def _with_ones(spatial: tuple[int, ...], axes: tuple[int, int]) -> tuple[int, ...]:
    """Spatial sizes with 1 inserted at the batch and channel axes."""
    full = list(spatial)
    for i in sorted(axes):
        full.insert(i, 1)
    return tuple(full)


def _pooling_layer(name, reducer, init_value, average=False):
    def PoolingLayer(window_shape, strides=None, padding="VALID", spec=None):
        """Pooling over the spatial axes; the batch and channel axes are left alone.

        Args:
          window_shape: window per spatial axis, e.g. ``(2, 2)``.
          strides: stride per spatial axis; default 1, as in stax (``jaxnet.MaxPool`` defaults to the window).
          padding: ``"VALID"`` or ``"SAME"``.
          spec: the input layout, e.g. ``"NCHW"``; default ``"N...C"`` (channels last).

        Shapes:
          inputs ``(batch, *spatial, channels)`` (or as ``spec``); outputs the same rank.
        """
        strides = tuple(strides or (1,) * len(window_shape))
        if len(strides) != len(window_shape):
            raise ValueError(f"{name}: strides {strides} need one entry per window axis {tuple(window_shape)}")
        rank = len(window_shape) + 2
        other_axes = (0, rank - 1) if spec is None else (spec.index("N"), spec.index("C"))
        dims, full_strides = _with_ones(tuple(window_shape), other_axes), _with_ones(strides, other_axes)
        layout = f"({spec})" if spec else "(batch, *spatial, channels)"

        def init_fun(rng, input_shape):
            _check_rank(name, input_shape, rank, layout)
            pads = lax.padtype_to_pads(input_shape, dims, full_strides, padding)
            unit = (1,) * rank
            return _int_tuple(lax.reduce_window_shape_tuple(input_shape, dims, full_strides, pads,
                                                            unit, unit)), ()

        def apply_fun(params, inputs, **kwargs):
            _check_rank(name, inputs.shape, rank, layout)
            zero = np.array(init_value, inputs.dtype)  # concrete, so that lax can differentiate max and add
            out = lax.reduce_window(inputs, zero, reducer, dims, full_strides, padding)
            if not average:
                return out
            # Divide by the number of real (unpadded) values in each window.
            ones_shape = tuple(1 if i in other_axes else d for i, d in enumerate(inputs.shape))
            counts = lax.reduce_window(jnp.ones(ones_shape, inputs.dtype), zero, lax.add, dims,
                                       full_strides, padding)
            return out / counts
        return init_fun, apply_fun
    PoolingLayer.__name__ = PoolingLayer.__qualname__ = name
    return PoolingLayer


MaxPool = _pooling_layer("MaxPool", lax.max, -jnp.inf)
SumPool = _pooling_layer("SumPool", lax.add, 0.0)
AvgPool = _pooling_layer("AvgPool", lax.add, 0.0, average=True)


def _flatten():
    """Flattens all but the leading (batch) axis: ``(batch, ...) -> (batch, prod(...))``."""
    def init_fun(rng, input_shape):
        if len(input_shape) < 1:
            raise ShapeError("Flatten: expected inputs with a leading batch axis; got shape ()")
        return (input_shape[0], math.prod(input_shape[1:])), ()

    def apply_fun(params, inputs, **kwargs):
        return jnp.reshape(inputs, (inputs.shape[0], -1))
    return init_fun, apply_fun


Flatten = _flatten()  # a layer, not a constructor, as in stax
Identity = elementwise(lambda inputs: inputs)


def FanOut(num):
    """Copies its input into a list of ``num`` inputs, for :func:`parallel`."""
    def init_fun(rng, input_shape):
        return [input_shape] * num, ()

    def apply_fun(params, inputs, **kwargs):
        return [inputs] * num
    return init_fun, apply_fun


def _check_shapes(layer: str, input_shape) -> None:
    if not input_shape or not all(isinstance(s, (tuple, list)) for s in input_shape):
        raise ShapeError(f"{layer}: expected a list of input shapes (from parallel); got {input_shape!r}")


def _fan_in_sum():
    """Adds a list of equally shaped inputs."""
    def init_fun(rng, input_shape):
        _check_shapes("FanInSum", input_shape)
        if len({tuple(s) for s in input_shape}) > 1:
            raise ShapeError(f"FanInSum: inputs must have one shape; got "
                             f"{', '.join(shape_str(tuple(s)) for s in input_shape)}")
        return input_shape[0], ()

    def apply_fun(params, inputs, **kwargs):
        return functools.reduce(operator.add, inputs)
    return init_fun, apply_fun


FanInSum = _fan_in_sum()  # a layer, not a constructor, as in stax


def FanInConcat(axis=-1):
    """Concatenates a list of inputs along ``axis``; the other axes must agree."""
    def init_fun(rng, input_shape):
        _check_shapes("FanInConcat", input_shape)
        shapes = [tuple(s) for s in input_shape]
        ax = axis % len(shapes[0])
        others = {s[:ax] + s[ax + 1:] for s in shapes}
        if len({len(s) for s in shapes}) > 1 or len(others) > 1:
            raise ShapeError(f"FanInConcat: inputs must agree on all axes but {axis}; got "
                             f"{', '.join(shape_str(s) for s in shapes)}")
        size = sum(s[ax] for s in shapes)
        return shapes[0][:ax] + (size,) + shapes[0][ax + 1:], ()

    def apply_fun(params, inputs, **kwargs):
        return jnp.concatenate(inputs, axis)
    return init_fun, apply_fun


def Dropout(rate, mode="train"):
    """Stax's dropout: keeps each value with probability ``rate``, scaling kept values by ``1/rate``.

    Args:
      rate: the probability of *keeping* a value, in ``(0, 1]`` (stax's convention;
        :class:`jaxnet.Dropout` takes the probability of dropping).
      mode: ``"train"`` drops values, using the key passed as ``apply_fun(..., rng=key)``;
        any other value (``"test"``) returns the inputs unchanged and needs no key.

    ``apply_fun(params, inputs, *, rng=None, train=None)``: ``train=True`` or ``False``
    (a jaxnet extension, which ``serial`` passes to every layer) overrides ``mode``;
    :func:`from_stax` uses it to run a stax network in jaxnet's evaluation mode.

    Shapes: inputs any shape; outputs the same.
    """
    if isinstance(rate, numbers.Real):
        if not 0 < rate <= 1:
            raise ValueError(f"Dropout: rate is the probability of keeping a value (stax's convention) and "
                             f"must be in (0, 1]; got {rate!r}")
        rate = float(rate)  # a Python float stays weakly typed: no dtype promotion of the inputs

    def init_fun(rng, input_shape):
        return input_shape, ()

    def apply_fun(params, inputs, *, rng=None, train=None, **kwargs):
        if not (mode == "train" if train is None else train):
            return inputs
        if rng is None:
            raise ValueError("Dropout: training mode needs a PRNG key: call apply_fun(params, inputs, "
                             "rng=key), or build the evaluation network with Dropout(rate, mode='test')")
        keep = random.bernoulli(rng, rate, inputs.shape)
        return jnp.where(keep, inputs / rate, 0)
    return init_fun, apply_fun


# ---- combinators -----------------------------------------------------------------------

def _unzip(combinator: str, layers) -> tuple[tuple[InitFun, ...], tuple[ApplyFun, ...]]:
    if not layers:
        raise ValueError(f"{combinator}: needs at least one layer")
    for i, layer in enumerate(layers):
        if not (isinstance(layer, (tuple, list)) and len(layer) == 2 and all(map(callable, layer))):
            hint = f"; call it, e.g. {layer.__name__}(...)" if callable(layer) else ""
            raise TypeError(f"{combinator}: layer {i} is {layer!r}, not an (init_fun, apply_fun) pair{hint}")
    init_funs, apply_funs = zip(*layers)
    return init_funs, apply_funs


def _split(rng, num: int):
    return random.split(rng, num) if rng is not None else (None,) * num


def _check_count(combinator: str, what: str, values, num: int) -> None:
    if not isinstance(values, (tuple, list)) or len(values) != num:
        got = f"{len(values)} entries" if isinstance(values, (tuple, list)) else repr(values)
        raise ValueError(f"{combinator}: expected {what} with one entry per layer ({num}); got {got}")


def serial(*layers):
    """Chains layers: each one's output is the next one's input.

    Args:
      *layers: ``(init_fun, apply_fun)`` pairs.

    Returns:
      A pair whose params are a list with one entry per layer. Its ``apply_fun``
      splits ``rng=key`` (when given) into one key per layer.
    """
    init_funs, apply_funs = _unzip("serial", layers)

    def init_fun(rng, input_shape):
        params = []
        for init in init_funs:
            rng, layer_rng = random.split(rng)
            input_shape, layer_params = init(layer_rng, input_shape)
            params.append(layer_params)
        return input_shape, params

    def apply_fun(params, inputs, *, rng=None, **kwargs):
        _check_count("serial", "params", params, len(apply_funs))
        for apply, layer_params, layer_rng in zip(apply_funs, params, _split(rng, len(apply_funs))):
            inputs = apply(layer_params, inputs, rng=layer_rng, **kwargs)
        return inputs
    return init_fun, apply_fun


def parallel(*layers):
    """Applies the ``i``-th layer to the ``i``-th input (use after :func:`FanOut`).

    Args:
      *layers: ``(init_fun, apply_fun)`` pairs.

    Returns:
      A pair taking a sequence of inputs (and input shapes) with one entry per layer
      and returning a list of outputs; its params are a tuple with one entry per layer.
    """
    init_funs, apply_funs = _unzip("parallel", layers)

    def init_fun(rng, input_shape):
        _check_count("parallel", "input shapes", input_shape, len(init_funs))
        if not all(isinstance(shape, (tuple, list)) for shape in input_shape):
            raise ShapeError(f"parallel: expected one input shape per layer (put FanOut({len(init_funs)}) "
                             f"before it); got {input_shape!r}")
        results = [init(layer_rng, shape)
                   for init, layer_rng, shape in zip(init_funs, random.split(rng, len(init_funs)), input_shape)]
        return tuple(shape for shape, _ in results), tuple(params for _, params in results)

    def apply_fun(params, inputs, *, rng=None, **kwargs):
        _check_count("parallel", "params", params, len(apply_funs))
        _check_count("parallel", "inputs", inputs, len(apply_funs))
        return [apply(p, x, rng=r, **kwargs)
                for apply, p, x, r in zip(apply_funs, params, inputs, _split(rng, len(apply_funs)))]
    return init_fun, apply_fun


def shape_dependent(make_layer):
    """A layer built only once the input shape is known: ``make_layer(input_shape) -> (init_fun, apply_fun)``."""
    def init_fun(rng, input_shape):
        return make_layer(input_shape)[0](rng, input_shape)

    def apply_fun(params, inputs, **kwargs):
        return make_layer(inputs.shape)[1](params, inputs, **kwargs)
    return init_fun, apply_fun


# ---- conversions -----------------------------------------------------------------------

def _run(layer: Layer, params, inputs, *, train: bool, key):
    """``layer`` on ``(batch, *example)`` inputs, read with exactly one batch axis as stax does."""
    return apply_child(layer, layer._top_path(), params, {}, inputs, train=train, key=key)[0]


def _check_params(layer: Layer, params, inputs) -> None:
    if inputs.ndim < 1:
        raise ShapeError(f"to_stax({layer!r}): expected inputs with a leading batch axis; got a scalar")
    expected, _ = expected_trees(layer, (1,) + tuple(inputs.shape[1:]), inputs.dtype)
    differences = compare_trees(expected, params, dtypes=False)
    if differences:
        raise ShapeError(f"to_stax({layer!r}): params do not fit inputs of shape {shape_str(inputs.shape)}: "
                         + differences.describe())


def to_stax(layer, *, input_dtype=jnp.float32):
    """Wraps a jaxnet layer or network as a stax ``(init_fun, apply_fun)`` pair.

    ``init_fun(rng, input_shape) -> (output_shape, params)``: ``input_shape`` is
    ``(batch, *example)``, its batch size may be ``-1``; ``params`` is the network's
    jaxnet params dict (``params["dense_1"]["w"]``), so it mixes with stax params in
    ``serial`` and works with any optimizer.

    ``apply_fun(params, inputs, *, rng=None, train=None, **ignored)``: ``inputs`` is
    ``(batch, *example)`` (as in stax, exactly one leading batch axis). Passing ``rng``
    means training mode with that key (dropout active), as stax's own Dropout does;
    ``train=False`` with a key, or ``train=True`` without one, overrides it. Other
    keywords, which stax's ``serial`` passes to every layer, are ignored.

    Args:
      layer: a jaxnet layer or network (or a function such as ``jax.nn.relu``).
      input_dtype: dtype of the inputs ``init_fun`` assumes (stax passes only a shape);
        use an integer dtype for networks starting with an ``Embedding``.

    Raises:
      ValueError: the network keeps state (BatchNorm running statistics), which a stax
        pair cannot carry; use ``jaxnet.stax.BatchNorm`` (batch statistics only) instead.

    Example:
      >>> init_fun, apply_fun = to_stax(jaxnet.serial(jaxnet.Dense(8), jaxnet.relu))
      >>> output_shape, params = init_fun(jax.random.key(0), (-1, 4))   # (-1, 8)
    """
    layer = as_layer(layer)
    if layer.has_state:
        raise ValueError(f"to_stax: {layer!r} keeps state (running statistics), which a stax pair cannot "
                         "carry; use jaxnet.stax.BatchNorm (batch statistics only) or keep it in jaxnet")

    def init_fun(rng, input_shape):
        input_shape = tuple(input_shape)
        if not input_shape or any(d < 0 for d in input_shape[1:]) or input_shape[0] < -1:
            raise ShapeError(f"to_stax: input_shape must be (batch, *example) with only the batch size "
                             f"allowed to be -1; got {shape_str(input_shape)}")
        spec = jax.ShapeDtypeStruct((max(input_shape[0], 1),) + input_shape[1:], input_dtype)
        params = layer.init(rng, spec)
        output = jax.eval_shape(lambda p, x: _run(layer, p, x, train=False, key=None), params, spec)
        return (input_shape[0],) + tuple(output.shape[1:]), params

    def apply_fun(params, inputs, *, rng=None, train=None, **ignored):
        inputs = jnp.asarray(inputs)
        _check_params(layer, params, inputs)
        return _run(layer, params, inputs, train=rng is not None if train is None else train, key=rng)
    return init_fun, apply_fun


@dataclasses.dataclass(frozen=True, repr=False)
class FromStax(Layer):
    """A stax ``(init_fun, apply_fun)`` pair as a jaxnet layer; see :func:`from_stax`."""

    init_fun: InitFun
    apply_fun: ApplyFun
    name: str = "stax"
    example_ndim: int | None = None  # type: ignore[misc]  (a field here, a ClassVar in Layer)
    pointwise: bool = False  # type: ignore[misc]

    def __post_init__(self):
        if not (callable(self.init_fun) and callable(self.apply_fun)):
            raise TypeError(f"from_stax: expected an (init_fun, apply_fun) pair of functions; got "
                            f"{self.init_fun!r}, {self.apply_fun!r}")
        if not isinstance(self.name, str) or not self.name or "/" in self.name or "." in self.name:
            raise ValueError(f"from_stax: name must be a non-empty string without '/' or '.'; got {self.name!r}")

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.name

    @property
    def needs_key(self) -> bool:
        return True  # stax's apply_fun may use rng; it costs one key split in training mode only

    def __repr__(self) -> str:
        """``from_stax(<serial>)``: the stax constructor that made the pair, and the name if not the default."""
        maker = getattr(self.init_fun, "__qualname__", type(self.init_fun).__name__).split(".")[0]
        return f"from_stax(<{maker}>" + (f", name={self.name!r})" if self.name != "stax" else ")")

    def init_params(self, key, x):
        try:
            _, params = self.init_fun(key, x.shape)
        except Exception as error:  # stax reports bad shapes with IndexError, TypeError, ...
            raise ShapeError(f"the stax init_fun rejects inputs of shape {shape_str(x.shape)}: "
                             f"{type(error).__name__}: {error}") from error
        return params, {}

    def forward(self, params, state, x, *, train, key):
        if isinstance(params, dict) and not params:
            params = ()  # parameterless: a parent left this layer out of its params tree
        return self.apply_fun(params, x, rng=key if train else None, train=train), state

    def flops(self, x_shape, y_shape, params):
        """XLA's count for the stax apply_fun, which does not describe its own cost (float32 inputs)."""
        specs = jax.tree.map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p), p.dtype), params)
        x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
        cost = jax.jit(lambda p, v: self.forward(p, {}, v, train=False, key=None)[0]).lower(specs, x).cost_analysis()
        return int(cost.get("flops", 0) + cost.get("transcendentals", 0)) if cost else 0


def from_stax(init_fun: InitFun, apply_fun: ApplyFun, name: str = "stax", *,
              example_ndim: int | None = None, pointwise: bool = False) -> FromStax:
    """Wraps a stax ``(init_fun, apply_fun)`` pair as a jaxnet layer.

    The stax params tree (tuples and lists, as stax makes them) is kept as is in the
    layer's slot, e.g. ``params["stax_1"] == [(W, b), ()]``; a pair without params
    is left out of the tree like any jaxnet layer without params.

    The stax ``apply_fun`` is called as ``apply_fun(params, x, rng=key, train=train)``:
    in training mode (``apply(..., key=k, train=True)``) ``rng`` is a key of its own,
    in evaluation mode ``None``. Stax has no evaluation mode of its own; ``train`` is
    the extension with which ``jaxnet.stax.Dropout`` (and any stax layer written to
    read it) follows jaxnet's mode; other stax layers ignore it, as stax's convention
    ``apply_fun(params, inputs, **kwargs)`` asks. Stax's own ``Dropout`` demands a key
    even in test mode, so a network built with ``jax.example_libraries.stax.Dropout``
    cannot be wrapped (its shape inference runs in evaluation mode); build it with
    ``jaxnet.stax`` instead, unchanged.

    Args:
      init_fun: ``init_fun(rng, input_shape) -> (output_shape, params)``; it is given
        ``(1, *example)``.
      apply_fun: ``apply_fun(params, inputs, **kwargs)`` on ``(batch, *example)`` inputs.
      name: the layer's name in the params tree and in error messages (``stax_1``, ...).
      example_ndim: the rank of one example the pair takes, when it has one (e.g. 3 for a
        stax ``Conv``); stax itself never says, so jaxnet cannot tell which axes of a network's
        input are batch axes when several readings fit, and raises until told.
      pointwise: ``True`` when the pair treats every position of an example independently
        (stax ``Dense`` and elementwise layers), so that any reading gives the same outputs.

    Example:
      >>> net = jaxnet.serial(from_stax(*stax.serial(stax.Dense(8), stax.Relu), pointwise=True),
      ...                     jaxnet.Dense(2))
    """
    return FromStax(init_fun, apply_fun, name, example_ndim, pointwise)
