"""PyTorch interop: an equivalent ``torch.nn.Module`` for a serial network, and weights back.

:func:`to_torch` builds a module that takes the same channels-last inputs as the jaxnet
network (convolutions and pooling permute to PyTorch's channels-first and back internally, so
``Flatten`` flattens in jaxnet's order) and holds the same weights. Its ``state_dict`` keys are
those of :func:`jaxnet.checkpoint.export_pytorch` (``dense_1.weight``, ``conv_1.bias``, nested
serials as ``block.dense_1.weight``) plus BatchNorm's ``running_mean``/``running_var``.
:func:`from_torch` loads such a module or state dict back into jaxnet params (and state).

Supported layers: nested ``serial``/``named`` of Dense, Conv (1-D, 2-D, groups, strides,
dilation, any padding), MaxPool, AvgPool (1-D, 2-D), Flatten, Reshape, LayerNorm, BatchNorm,
Dropout and the built-in activations. ``torch`` is imported only inside these functions.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnet.checkpoint import _TORCH_NAMES, export_pytorch
from jaxnet.nn.activations import ACTIVATIONS, Activation
from jaxnet.nn.basic import Dense, Dropout, Flatten, Reshape
from jaxnet.nn.calls import recording
from jaxnet.nn.combinators import Named, Serial
from jaxnet.nn.conv import AvgPool, Conv, MaxPool
from jaxnet.nn.layer import Layer, Params, State, shape_str, state_or_empty
from jaxnet.nn.norm import BatchNorm, LayerNorm
from jaxnet.trees import named_leaves

_STATE_NAMES = {"mean": "running_mean", "var": "running_var"}


def _leaf_rows(net: Layer, example_shape, dtype) -> dict[str, tuple]:
    """``{path: (layer, input shape, output shape)}`` for every leaf layer, batch size 1."""
    spec = jax.ShapeDtypeStruct((1, *example_shape), dtype)
    rows: list = []
    params, state = jax.eval_shape(lambda k: net.init_with_state(k, spec), jax.random.key(0))
    with recording(rows):
        jax.eval_shape(lambda p, s, x: net.apply_with_state(p, s, x, batch_ndim=1), params, state, spec)
    return {path: (layer, x_shape, tuple(y.shape)) for path, layer, x_shape, y, _ in rows}


def _activation_module(torch, layer: Activation):
    nn = torch.nn
    modules = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "silu": nn.SiLU,
               "elu": nn.ELU, "softplus": nn.Softplus,
               "gelu": lambda: nn.GELU(approximate="tanh"),  # jax.nn.gelu is the tanh form
               "leaky_relu": lambda: nn.LeakyReLU(0.01),  # jax.nn.leaky_relu's default slope
               "softmax": lambda: nn.Softmax(dim=-1), "log_softmax": lambda: nn.LogSoftmax(dim=-1)}
    if ACTIVATIONS.get(layer.kind) != layer or layer.kind not in modules:
        return None
    return modules[layer.kind]()


def _pads(layer, spatial) -> tuple[tuple[int, int], ...]:
    window = layer.kernel_size if isinstance(layer, Conv) else layer.window_shape
    dilation = layer.dilation if isinstance(layer, Conv) else (1,) * len(window)
    if not isinstance(layer.padding, str):
        return layer.padding
    dilated = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    return tuple(map(tuple, lax.padtype_to_pads(spatial, dilated, layer.strides, layer.padding)))


def _modules(torch):
    """The channels-last module classes, defined once torch is imported."""
    nn, F = torch.nn, torch.nn.functional

    def to_first(x):
        return x.movedim(-1, 1)

    def torch_pads(pads):  # F.pad wants the last axis first: (lo_w, hi_w, lo_h, hi_h)
        return [p for pair in reversed(pads) for p in pair]

    class ChannelsLastConv(nn.Module):
        def __init__(self, layer: Conv, in_channels: int, pads):
            super().__init__()
            k = layer.kernel_size
            self.weight = nn.Parameter(torch.empty(layer.features, in_channels // layer.feature_group_count, *k))
            self.bias = nn.Parameter(torch.empty(layer.features)) if layer.use_bias else None
            self.conv = {1: F.conv1d, 2: F.conv2d}[len(k)]
            self.pads, self.strides, self.dilation = torch_pads(pads), layer.strides, layer.dilation
            self.groups = layer.feature_group_count

        def forward(self, x):
            y = self.conv(F.pad(to_first(x), self.pads), self.weight, self.bias, self.strides,
                          0, self.dilation, self.groups)
            return y.movedim(1, -1)

    class ChannelsLastPool(nn.Module):
        def __init__(self, layer, pads):
            super().__init__()
            self.is_max = isinstance(layer, MaxPool)
            self.window, self.strides = layer.window_shape, layer.strides
            self.pads = torch_pads(pads)
            self.padded = any(self.pads)

        def forward(self, x):
            x = to_first(x)
            if self.is_max:  # padding never wins the max
                pool = {1: F.max_pool1d, 2: F.max_pool2d}[len(self.window)]
                y = pool(F.pad(x, self.pads, value=-float("inf")), self.window, self.strides)
            else:  # jaxnet averages the real values only
                pool = {1: F.avg_pool1d, 2: F.avg_pool2d}[len(self.window)]
                y = pool(F.pad(x, self.pads), self.window, self.strides)
                if self.padded:
                    ones = F.pad(torch.ones_like(x[:1, :1]), self.pads)
                    y = y / pool(ones, self.window, self.strides)
            return y.movedim(1, -1)

    class ChannelsLastBatchNorm(nn.BatchNorm1d):
        # torch's momentum weighs the batch: 1 - jaxnet's momentum, which weighs the old average
        def forward(self, x):
            shape = x.shape
            y = super().forward(x.reshape(shape[0], -1, shape[-1]).movedim(-1, 1))
            return y.movedim(1, -1).reshape(shape)

    class ToShape(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.shape = tuple(shape)

        def forward(self, x):
            return x.reshape(x.shape[0], *self.shape)

        def extra_repr(self):
            return f"shape={self.shape}"

    return ChannelsLastConv, ChannelsLastPool, ChannelsLastBatchNorm, ToShape


def _build(torch, layer: Layer, path: str, rows: dict, classes):
    nn = torch.nn
    conv_cls, pool_cls, bn_cls, to_shape = classes
    if isinstance(layer, Named):
        return _build(torch, layer.layer, path, rows, classes)
    if isinstance(layer, Serial):
        seq = nn.Sequential()
        for name, child in layer.children():
            seq.add_module(name, _build(torch, child, f"{path}/{name}" if path else name, rows, classes))
        return seq
    if path not in rows:
        raise ValueError(f"to_torch: {path or layer.kind} ({layer!r}) is not a serial chain of leaf "
                         "layers; only serial networks convert")
    _, x_shape, y_shape = rows[path]
    if not isinstance(x_shape, tuple) or not all(isinstance(d, int) for d in x_shape):
        raise ValueError(f"to_torch: {path}: layers with several inputs do not convert")
    if isinstance(layer, Dense):
        return nn.Linear(x_shape[-1], layer.features, bias=layer.use_bias)
    if isinstance(layer, Conv) and len(layer.kernel_size) in (1, 2):
        return conv_cls(layer, x_shape[-1], _pads(layer, x_shape[1:-1]))
    if isinstance(layer, (MaxPool, AvgPool)) and len(layer.window_shape) in (1, 2):
        return pool_cls(layer, _pads(layer, x_shape[1:-1]))
    if isinstance(layer, (Flatten, Reshape)):
        return to_shape(y_shape[1:])
    if isinstance(layer, LayerNorm):
        return nn.LayerNorm(x_shape[-1], eps=layer.epsilon,
                            elementwise_affine=layer.use_scale or layer.use_bias, bias=layer.use_bias)
    if isinstance(layer, BatchNorm) and layer.use_scale == layer.use_bias:
        return bn_cls(x_shape[-1], eps=layer.epsilon, momentum=1 - layer.momentum, affine=layer.use_scale)
    if isinstance(layer, Dropout):
        return nn.Dropout(layer.drop_rate)
    if isinstance(layer, Activation) and (module := _activation_module(torch, layer)) is not None:
        return module
    raise ValueError(f"to_torch: {path}: no PyTorch equivalent for {layer!r} (kind {layer.kind!r})")


def _torch_arrays(params: Params, model_state: State) -> dict[str, np.ndarray]:
    """The state_dict of :func:`to_torch`'s module, as NumPy arrays."""
    arrays = export_pytorch(params)
    for name, leaf in named_leaves(model_state):
        *layer, last = name.split(".")
        arrays[".".join([*layer, _STATE_NAMES[last]])] = np.array(leaf)
    return arrays


def to_torch(net: Layer, params: Params, *, model_state: State | None = None, example_shape):
    """A ``torch.nn.Module`` computing what ``net`` computes, with ``params``' weights.

    Args:
      net: a serial network of the layers listed in the module docstring.
      params: its params.
      model_state: its state (BatchNorm running statistics), when it keeps state.
      example_shape: the shape of one input example, e.g. ``(28, 28, 1)`` (channels last).

    Shapes:
      The module takes ``(batch, *example_shape)`` float32 tensors, channels last like
      jaxnet, and returns what ``net.apply`` returns. It is in evaluation mode (``.eval()``).

    Raises:
      ValueError: a layer without a PyTorch equivalent (named with its path), or params that
        do not fit the network.
    """
    import torch  # lazily: jaxnet imports without torch

    model_state = state_or_empty(net, model_state, "to_torch")
    dtype = jax.tree.leaves(params)[0].dtype if jax.tree.leaves(params) else jnp.float32
    rows = _leaf_rows(net, tuple(example_shape), dtype)
    module = _build(torch, net, "", rows, _modules(torch))
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    arrays = _torch_arrays(params, model_state)
    _check_names_and_shapes("to_torch", arrays, expected, "params", "the module built for net")
    module.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=False)
    return module.eval()


def _check_names_and_shapes(who, given: dict, expected: dict, given_what: str, expected_what: str):
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [f"{k}: {shape_str(tuple(given[k].shape))}, expected {shape_str(expected[k])}"
             for k in sorted(set(given) & set(expected)) if tuple(given[k].shape) != tuple(expected[k])]
    problems = ([f"missing from {given_what}: {', '.join(missing)}"] if missing else []) + \
        ([f"not in {expected_what}: {', '.join(unexpected)}"] if unexpected else []) + \
        ([f"shapes differ: {'; '.join(wrong)}"] if wrong else [])
    if problems:
        raise ValueError(f"{who}: the weights do not fit the network: " + "; ".join(problems))


def from_torch(module_or_state_dict, net: Layer, example):
    """jaxnet params (and state) from a PyTorch module or state dict laid out as :func:`to_torch`'s.

    Args:
      module_or_state_dict: a ``torch.nn.Module`` or a ``{name: tensor or array}`` dict with the
        keys of :func:`jaxnet.checkpoint.export_pytorch` (plus ``running_mean``/``running_var``
        for BatchNorm; ``num_batches_tracked`` is ignored).
      net: the jaxnet network.
      example: an example batch (or its shape) as for ``net.init``.

    Shapes:
      Dense ``weight (out, in)`` becomes ``w (in, out)``; a Conv ``weight (out, in, *kernel)``
      becomes ``w (*kernel, in, out)``; arrays take the dtype of ``net.init``'s params.

    Returns:
      ``params``; ``(params, model_state)`` when ``net`` keeps state (BatchNorm).

    Raises:
      ValueError: names missing or unexpected, or shapes that differ, each listed.
    """
    source = module_or_state_dict
    if hasattr(source, "state_dict"):
        source = source.state_dict()
    given = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
             for k, v in source.items() if not k.endswith("num_batches_tracked")}
    params, state = jax.eval_shape(lambda k: net.init_with_state(k, example), jax.random.key(0))
    expected = {}
    for tree, kind in ((params, "params"), (state, "state")):
        for name, leaf in named_leaves(tree):
            *layer, last = name.split(".")
            torch_last = _STATE_NAMES[last] if kind == "state" else _TORCH_NAMES[last]
            shape = leaf.shape
            if last == "w":
                shape = (shape[-1], shape[-2], *shape[:-2])
            expected[".".join([*layer, torch_last])] = (name, kind, shape, leaf.dtype)
    _check_names_and_shapes("from_torch", given, {k: v[2] for k, v in expected.items()},
                            "the PyTorch weights", "the jaxnet network")
    values = {"params": {}, "state": {}}
    for key, (name, kind, _, dtype) in expected.items():
        array = given[key]
        if name.split(".")[-1] == "w":  # (out, in, *kernel) -> (*kernel, in, out)
            array = np.moveaxis(array, (0, 1), (-1, -2))
        values[kind][name] = jnp.asarray(array, dtype)
    params, state = (jax.tree.unflatten(jax.tree.structure(tree),
                                        [values[kind][name] for name, _ in named_leaves(tree)])
                     for tree, kind in ((params, "params"), (state, "state")))
    return (params, state) if net.has_state else params
