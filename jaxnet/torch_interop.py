"""PyTorch interop: an equivalent ``torch.nn.Module`` for a network, and weights back.

:func:`to_torch` builds a module that takes the same channels-last inputs as the jaxnet
network (convolutions and pooling permute to PyTorch's channels-first and back internally, so
``Flatten`` flattens in jaxnet's order) and holds the same weights. Its ``state_dict`` keys are
the layers' paths (``dense_1``, nested serials as ``block.dense_1``) followed by PyTorch's own
parameter names: ``weight``/``bias`` (the names of
:func:`jaxnet.checkpoint.export_pytorch`), BatchNorm's ``running_mean``/``running_var``, the
recurrent layers' ``weight_ih_l0``/``bias_hh_l0``/``..._reverse`` (``nn.LSTM``), attention's
``in_proj_weight``/``out_proj.weight`` (``nn.MultiheadAttention``). :func:`from_torch` loads
such a module or state dict back into jaxnet params (and state).

Supported layers: nested ``serial``/``named`` of Dense, Embedding, Conv, ConvTranspose,
MaxPool, AvgPool (1-D to 3-D, any strides and padding), GlobalAvgPool, GlobalMaxPool,
Upsample, Flatten, Reshape, LayerNorm, GroupNorm, RMSNorm, BatchNorm, Dropout, the built-in
activations, SimpleRNN (tanh or relu), LSTM, GRU and Bidirectional (subclasses of ``nn.RNN``,
``nn.LSTM``, ``nn.GRU``), MultiHeadAttention (a subclass of ``nn.MultiheadAttention``: self and
cross attention, causal, padding masks), the learned and sinusoidal positional encodings,
TransformerBlock, TransformerLM and TransformerClassifier. The modules take jaxnet's input
forms: ``(x, mask)`` and ``{"x", "mask", "initial_state"}`` for the recurrent layers,
``{"query", "context", "mask"}`` for attention. What PyTorch cannot express is refused with
the layer's path: grouped-query or rotary attention, attention whose heads do not split the
query's features, SimpleRNN activations other than tanh and relu, a Bidirectional layer with
two different cells. ``torch`` is imported only inside these functions.
"""

from __future__ import annotations

import collections
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnet.checkpoint import _TORCH_NAMES
from jaxnet.nn.activations import ACTIVATIONS, Activation
from jaxnet.nn.attention import MultiHeadAttention
from jaxnet.nn.basic import Dense, Dropout, Embedding, Flatten, Reshape
from jaxnet.nn.calls import recording
from jaxnet.nn.combinators import Named, Serial
from jaxnet.nn.conv import AvgPool, Conv, MaxPool
from jaxnet.nn.global_pool import GlobalAvgPool, GlobalMaxPool
from jaxnet.nn.layer import Layer, Params, State, shape_str, state_or_empty
from jaxnet.nn.norm import BatchNorm, GroupNorm, LayerNorm, RMSNorm
from jaxnet.nn.positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding, sinusoidal_table
from jaxnet.nn.recurrent import Bidirectional, GRUCell, LSTMCell, Recurrent, SimpleRNNCell, split_inputs
from jaxnet.nn.shapes import input_spec
from jaxnet.nn.transformer import FeedForward, TransformerBlock, TransformerClassifier, TransformerLM
from jaxnet.nn.upsampling import ConvTranspose, Upsample
from jaxnet.trees import compare_trees, named_leaves

_STATE_NAMES = {"mean": "running_mean", "var": "running_var"}
_RNN_PARTS = {"input": "ih", "hidden": "hh"}
_RNN_NONLINEARITIES = {"tanh": ACTIVATIONS["tanh"], "relu": ACTIVATIONS["relu"]}
_QKV = ("query", "key", "value")


# ---- the network's layout ---------------------------------------------------------------

class _Row(NamedTuple):
    """A leaf layer as the network runs it: its input and output shapes (batch axis included)."""
    layer: Layer
    x_shape: object  # a shape, or a tuple/dict of shapes for several inputs
    y_shape: object


class _Layout(NamedTuple):
    rows: dict[str, _Row]  # by path relative to the network, "" for a network that is one layer
    params: Params  # specs (jax.ShapeDtypeStruct leaves)
    state: State


def _layout(net: Layer, spec) -> _Layout:
    """The leaf layers of ``net`` and its params and state specs, for inputs like ``spec``."""
    rows: list = []
    params, state = jax.eval_shape(lambda k: net.init_with_state(k, spec), jax.random.key(0))
    with recording(rows):
        jax.eval_shape(lambda p, s, x: net.apply_with_state(p, s, x, batch_ndim=1), params, state, spec)
    top = net._top_path()

    def relative(path):  # params nest below the network's own name, which is not a level of them
        return path[len(top):].lstrip("/") if path == top or path.startswith(top + "/") else path

    return _Layout({relative(path): _Row(layer, x_shape, jax.tree.map(lambda a: tuple(a.shape), y))
                    for path, layer, x_shape, y, _ in rows}, params, state)


def _subtree(tree, path: str):
    for part in path.split("/") if path else ():
        tree = tree.get(part, {})
    return tree


def _where(path: str, layer: Layer) -> str:
    return path or layer.kind


def _first_direction(layer: Recurrent | Bidirectional) -> Recurrent:
    """A Recurrent layer itself, a Bidirectional's forward one (PyTorch runs one cell both ways)."""
    return layer.forward_layer if isinstance(layer, Bidirectional) else layer


# ---- what PyTorch can express ----------------------------------------------------------

def _check_expressible(who: str, path: str, layer: Layer, params) -> None:
    """Raises ``ValueError`` for a layer configuration without a PyTorch module."""
    where = f"{who}: {_where(path, layer)}"
    if isinstance(layer, MultiHeadAttention):
        heads = layer.num_heads
        if (layer.num_kv_heads or heads) != heads:
            raise ValueError(f"{where}: grouped-query attention (num_kv_heads={layer.num_kv_heads} "
                             f"for num_heads={heads}) does not convert: torch.nn.MultiheadAttention "
                             "has one key/value head per query head")
        if layer.rotary:
            raise ValueError(f"{where}: rotary=True does not convert: torch.nn.MultiheadAttention "
                             "has no rotary position embedding")
        features, inner = params["query"]["w"].shape
        if inner != features:
            raise ValueError(f"{where}: key_features={layer.key_features} gives num_heads * "
                             f"key_features = {inner}, but torch.nn.MultiheadAttention splits the "
                             f"query's {features} features among its heads")
        if params["out"]["w"].shape[1] != features:
            raise ValueError(f"{where}: out_features={layer.out_features} does not convert: "
                             f"torch.nn.MultiheadAttention's output has the query's {features} features")
    if isinstance(layer, Bidirectional) and layer.backward.cell != layer.forward_layer.cell:
        raise ValueError(f"{where}: a backward cell {layer.backward.cell!r} unlike the forward cell "
                         f"{layer.forward_layer.cell!r} does not convert: PyTorch's bidirectional "
                         "nn.LSTM/GRU/RNN runs one cell both ways")
    cell = _first_direction(layer).cell if isinstance(layer, (Recurrent, Bidirectional)) else None
    if isinstance(cell, SimpleRNNCell) and cell.activation not in _RNN_NONLINEARITIES.values():
        raise ValueError(f"{where}: SimpleRNNCell activation {cell.activation!r} does not convert: "
                         "torch.nn.RNN's nonlinearity is tanh or relu")


# ---- weights: jaxnet leaves <-> PyTorch names ---------------------------------------------

class _Entry(NamedTuple):
    """One jaxnet leaf in the module's ``state_dict``: ``np.transpose(leaf, axes)``, stored
    under ``torch_name``; leaves sharing a name are concatenated on axis 0 in ``slot`` order
    (``nn.MultiheadAttention``'s packed ``in_proj_weight``)."""
    tree: str  # "params" or "state"
    name: str  # dotted name in its tree
    torch_name: str
    axes: tuple[int, ...]
    slot: int = 0


def _weight_axes(ndim: int, transposed_conv: bool) -> tuple[int, ...]:
    """Dense ``(in, out)`` -> ``(out, in)``; Conv ``(*kernel, in, out)`` -> ``(out, in, *kernel)``;
    ConvTranspose ``(*kernel, in, out)`` -> ``(in, out, *kernel)`` (no spatial flip)."""
    first = (ndim - 2, ndim - 1) if transposed_conv else (ndim - 1, ndim - 2)
    return (*first, *range(ndim - 2))


def _torch_leaf(layer: Layer, local: str, ndim: int, params) -> tuple[str, tuple[int, ...], int]:
    """``(torch name, axes, slot)`` of the params leaf ``local`` (e.g. ``"query.w"``) of ``layer``."""
    *parts, last = local.split(".")
    identity = tuple(range(ndim))
    if isinstance(layer, (Recurrent, Bidirectional)):
        suffix = "_reverse" if isinstance(layer, Bidirectional) and parts.pop(0) == "backward" else ""
        kind = "weight" if last == "w" else "bias"
        return f"{kind}_{_RNN_PARTS[parts[0]]}_l0{suffix}", (1, 0) if last == "w" else identity, 0
    if isinstance(layer, MultiHeadAttention):
        axes = (1, 0) if last == "w" else identity
        if parts[0] == "out":
            return f"out_proj.{_TORCH_NAMES[last]}", axes, 0
        slot = _QKV.index(parts[0])
        if last == "b":
            return "in_proj_bias", axes, slot
        packed = params["key"]["w"].shape[0] == params["query"]["w"].shape[0]  # torch's kdim == embed_dim
        return ("in_proj_weight" if packed else f"{parts[0][0]}_proj_weight"), axes, slot
    if last not in _TORCH_NAMES:
        raise ValueError(f"no PyTorch name for {local}; known leaf names are {', '.join(_TORCH_NAMES)}")
    axes = _weight_axes(ndim, isinstance(layer, ConvTranspose)) if last == "w" else identity
    return ".".join([*parts, _TORCH_NAMES[last]]), axes, 0


def _entries(who: str, layout: _Layout) -> list[_Entry]:
    """Every params and state leaf of the network with its place in the ``state_dict``."""
    entries = []
    for path, row in layout.rows.items():
        params, state = _subtree(layout.params, path), _subtree(layout.state, path)
        _check_expressible(who, path, row.layer, params)
        prefix = path.replace("/", ".")

        def full(name):
            return f"{prefix}.{name}" if prefix else name

        for local, leaf in named_leaves(params):
            try:
                torch_name, axes, slot = _torch_leaf(row.layer, local, leaf.ndim, params)
            except ValueError as error:
                raise ValueError(f"{who}: {_where(path, row.layer)}: {error}") from None
            entries.append(_Entry("params", full(local), full(torch_name), axes, slot))
        for local, leaf in named_leaves(state):
            *parts, last = local.split(".")
            entries.append(_Entry("state", full(local), full(".".join([*parts, _STATE_NAMES[last]])),
                                  tuple(range(leaf.ndim))))
    covered = {(e.tree, e.name) for e in entries}
    lost = [name for tree, kind in ((layout.params, "params"), (layout.state, "state"))
            for name, _ in named_leaves(tree) if (kind, name) not in covered]
    if lost:
        raise ValueError(f"{who}: {', '.join(lost)} belong to no layer the network runs through "
                         "jaxnet's child calls; such a layer does not convert")
    return entries


def _grouped(entries: list[_Entry]) -> dict[str, list[_Entry]]:
    groups: dict[str, list[_Entry]] = {}
    for entry in sorted(entries, key=lambda e: e.slot):
        groups.setdefault(entry.torch_name, []).append(entry)
    return groups


def _torch_arrays(entries: list[_Entry], trees: dict) -> dict[str, np.ndarray]:
    """The ``state_dict`` of :func:`to_torch`'s module as writable NumPy arrays."""
    leaves = {kind: dict(named_leaves(tree)) for kind, tree in trees.items()}
    return {name: np.concatenate([np.transpose(np.asarray(leaves[e.tree][e.name]), e.axes) for e in group])
            for name, group in _grouped(entries).items()}


def _torch_shapes(entries: list[_Entry], layout: _Layout) -> dict[str, tuple[int, ...]]:
    """The ``state_dict``'s shapes, from the network's specs."""
    specs = {"params": dict(named_leaves(layout.params)), "state": dict(named_leaves(layout.state))}
    shapes = {}
    for name, group in _grouped(entries).items():
        parts = [tuple(specs[e.tree][e.name].shape[a] for a in e.axes) for e in group]
        shapes[name] = (sum(p[0] for p in parts), *parts[0][1:])
    return shapes


def _jaxnet_leaves(entries: list[_Entry], given: dict[str, np.ndarray], layout: _Layout) -> dict:
    """``{"params": {name: array}, "state": {...}}`` from a ``state_dict``'s arrays."""
    specs = {"params": dict(named_leaves(layout.params)), "state": dict(named_leaves(layout.state))}
    values: dict = {"params": {}, "state": {}}
    for name, group in _grouped(entries).items():
        sizes = [specs[e.tree][e.name].shape[e.axes[0]] for e in group]
        for entry, part in zip(group, np.split(given[name], np.cumsum(sizes)[:-1])):
            spec = specs[entry.tree][entry.name]
            leaf = np.transpose(part, np.argsort(entry.axes))
            values[entry.tree][entry.name] = jnp.asarray(leaf, spec.dtype)
    return values


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


# ---- PyTorch modules ---------------------------------------------------------------------

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
    """The module classes, defined once torch is imported."""
    nn, F = torch.nn, torch.nn.functional

    def to_first(x):
        return x.movedim(-1, 1)

    def torch_pads(pads):  # F.pad wants the last axis first: (lo_w, hi_w, lo_h, hi_h)
        return [p for pair in reversed(pads) for p in pair]

    def sequence_and_mask(inputs):
        return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs, None)

    def rejoin(inputs, y, mask):
        return y if mask is None else type(inputs)((y, mask))

    class ChannelsLastConv(nn.Module):
        def __init__(self, layer: Conv, in_channels: int, pads):
            super().__init__()
            k = layer.kernel_size
            self.groups = layer.feature_group_count
            self.weight = nn.Parameter(torch.empty(layer.features, in_channels // self.groups, *k))
            self.bias = nn.Parameter(torch.empty(layer.features)) if layer.use_bias else None
            self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(k)]
            self.pads, self.strides, self.dilation = torch_pads(pads), layer.strides, layer.dilation

        def forward(self, x):
            y = self.conv(F.pad(to_first(x), self.pads), self.weight, self.bias, self.strides,
                          0, self.dilation, self.groups)
            return y.movedim(1, -1)

    class ChannelsLastConvTranspose(nn.Module):
        """``weight`` is ``nn.ConvTranspose``'s ``(in, out, *kernel)``; jaxnet's crops, any
        (``"SAME"`` included), are cut from (or, negative, added to) the unpadded output."""

        def __init__(self, layer: ConvTranspose, in_channels: int):
            super().__init__()
            k = layer.kernel_size
            self.weight = nn.Parameter(torch.empty(in_channels, layer.features, *k))
            self.bias = nn.Parameter(torch.empty(layer.features)) if layer.use_bias else None
            self.conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(k)]
            self.strides = layer.strides
            self.pads = torch_pads([(-lo, -hi) for lo, hi in layer.crops()])

        def forward(self, x):
            # the bias after the crop: positions that the padding adds hold it too, as in jaxnet
            y = F.pad(self.conv(to_first(x), self.weight, None, self.strides), self.pads).movedim(1, -1)
            return y if self.bias is None else y + self.bias

    class ChannelsLastPool(nn.Module):
        def __init__(self, layer, pads):
            super().__init__()
            self.is_max = isinstance(layer, MaxPool)
            self.window, self.strides = layer.window_shape, layer.strides
            self.pads = torch_pads(pads)
            self.padded = any(self.pads)

        def forward(self, x):
            x = to_first(x)
            ndim = len(self.window)
            if self.is_max:  # padding never wins the max
                pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[ndim]
                y = pool(F.pad(x, self.pads, value=-float("inf")), self.window, self.strides)
            else:  # jaxnet averages the real values only
                pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[ndim]
                y = pool(F.pad(x, self.pads), self.window, self.strides)
                if self.padded:
                    ones = F.pad(torch.ones_like(x[:1, :1]), self.pads)
                    y = y / pool(ones, self.window, self.strides)
            return y.movedim(1, -1)

    class GlobalPool(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.is_max, self.keepdims = isinstance(layer, GlobalMaxPool), layer.keepdims

        def forward(self, x):
            axes = tuple(range(1, x.ndim - 1))
            return (x.amax if self.is_max else x.mean)(axes, keepdim=self.keepdims)

    class ChannelsLastUpsample(nn.Module):
        def __init__(self, layer: Upsample, spatial_ndim: int):
            super().__init__()
            self.scales = (layer.scale,) * spatial_ndim if isinstance(layer.scale, int) else layer.scale
            self.method = layer.method

        def forward(self, x):
            if self.method == "nearest":  # repeats, for any dtype
                for axis, scale in enumerate(self.scales, 1):
                    x = x.repeat_interleave(scale, dim=axis)
                return x
            mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(self.scales)]
            return F.interpolate(to_first(x), scale_factor=tuple(map(float, self.scales)), mode=mode,
                                 align_corners=False).movedim(1, -1)

    class ChannelsLastBatchNorm(nn.BatchNorm1d):
        # torch's momentum weighs the batch: 1 - jaxnet's momentum, which weighs the old average
        def forward(self, x):
            shape = x.shape
            y = super().forward(x.reshape(shape[0], -1, shape[-1]).movedim(-1, 1))
            return y.movedim(1, -1).reshape(shape)

    class ChannelsLastGroupNorm(nn.GroupNorm):
        def forward(self, x):
            return super().forward(to_first(x)).movedim(1, -1)

    class ToShape(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.shape = tuple(shape)

        def forward(self, x):
            return x.reshape(x.shape[0], *self.shape)

        def extra_repr(self):
            return f"shape={self.shape}"

    def reverse_steps(x, lengths):
        """Each sequence's real steps in reverse order, the padded ones where they are."""
        if lengths is None:
            return x.flip(1)
        t = torch.arange(x.shape[1], device=x.device)[None]
        order = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
        return x.gather(1, order[..., None].expand_as(x))

    def state_map(fn, *states):  # an LSTM's state is the pair (h, c)
        return tuple(map(fn, *states)) if isinstance(states[0], tuple) else fn(*states)

    class RecurrentLayer:
        """Runs a jaxnet Recurrent or Bidirectional layer as its ``nn.RNN``/``LSTM``/``GRU`` base.

        Takes ``x``, ``(x, mask)`` or ``{"x", "mask", "initial_state"}`` and returns what
        jaxnet returns. Masks go through packed sequences, so they must be right-padded.
        """

        def __init__(self, layer, in_features: int, path: str):
            bidirectional, first = isinstance(layer, Bidirectional), _first_direction(layer)
            options = {}
            if isinstance(first.cell, SimpleRNNCell):
                options["nonlinearity"] = next(name for name, activation in _RNN_NONLINEARITIES.items()
                                               if activation == first.cell.activation)
            super().__init__(in_features, first.cell.hidden, batch_first=True,
                             bidirectional=bidirectional, **options)
            self.path, self.return_sequences = path, first.return_sequences
            self.return_state = first.return_state
            self.flip = not bidirectional and layer.reverse
            self.merge = layer.merge if bidirectional else None

        def lengths(self, mask):
            lengths = mask.sum(1)
            steps = torch.arange(mask.shape[1], device=mask.device)
            if not torch.equal(mask, steps[None] < lengths[:, None]):
                raise ValueError(f"{self.path}: PyTorch's packed sequences need right-padded masks "
                                 "(True for a sequence's first steps, then False); this mask has a "
                                 "padded step before a real one")
            return lengths

        def forward(self, inputs):
            x, mask, initial = split_inputs(inputs)
            lengths = None if mask is None else self.lengths(mask)
            hx = None
            if initial is not None:  # (batch, hidden) per direction -> (directions, batch, hidden)
                parts = [initial["forward"], initial["backward"]] if self.bidirectional else [initial]
                hx = state_map(lambda *s: torch.stack(s).to(x.dtype), *parts)
            if self.flip:
                x = reverse_steps(x, lengths)
            if lengths is None:
                out, h_n = super().forward(x, hx)
            else:
                packed = nn.utils.rnn.pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True,
                                                           enforce_sorted=False)
                out, h_n = super().forward(packed, hx)
                out = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]
                empty = lengths == 0  # packing needs a step: undo the one given to empty sequences
                out = out.masked_fill(empty[:, None, None], 0)
                start = hx if hx is not None else state_map(torch.zeros_like, h_n)
                h_n = state_map(lambda s, h: torch.where(empty[None, :, None], s, h), start, h_n)
            if self.flip:
                out = reverse_steps(out, lengths)
            finals = [state_map(lambda h: h[d], h_n) for d in range(2 if self.bidirectional else 1)]
            if self.return_sequences:
                y = out[..., :self.hidden_size] + out[..., self.hidden_size:] if self.merge == "sum" else out
            else:
                hs = [f[0] if isinstance(f, tuple) else f for f in finals]
                y = hs[0] + hs[1] if self.merge == "sum" else torch.cat(hs, -1)
            if not self.return_state:
                return y
            return y, (finals[0] if len(finals) == 1 else {"forward": finals[0], "backward": finals[1]})

    recurrent = {cell: type(f"Recurrent{base.__name__}", (RecurrentLayer, base), {})
                 for cell, base in ((LSTMCell, nn.LSTM), (GRUCell, nn.GRU), (SimpleRNNCell, nn.RNN))}

    class Attention(nn.MultiheadAttention):
        """jaxnet's MultiHeadAttention: ``x``, ``(x, mask)`` or ``{"query", "context", "mask"}``
        (masks True at real tokens); queries that see no key output zeros."""

        def __init__(self, layer: MultiHeadAttention, features: int, context_features: int):
            super().__init__(features, layer.num_heads, bias=layer.use_bias, kdim=context_features,
                             vdim=context_features, batch_first=True)
            self.causal = layer.causal

        def forward(self, inputs):
            if isinstance(inputs, dict):
                query, context, key_mask = inputs["query"], inputs.get("context"), inputs.get("mask")
            else:
                (query, key_mask), context = sequence_and_mask(inputs), None
            query_mask = key_mask if context is None else None
            context = query if context is None else context
            time_q, time_k = query.shape[1], context.shape[1]
            causal = (torch.ones(time_q, time_k, dtype=torch.bool, device=query.device).triu(1)
                      if self.causal else None)
            y = super().forward(query, context, context, need_weights=False, attn_mask=causal,
                                key_padding_mask=None if key_mask is None else ~key_mask)[0]
            if key_mask is None:
                return y
            if query_mask is not None:
                valid = query_mask
            elif self.causal:  # a real key at or before the query's position
                seen = key_mask.int().cummax(1).values > 0
                valid = seen[:, torch.arange(time_q, device=seen.device).clamp(max=time_k - 1)]
            else:
                valid = key_mask.any(1, keepdim=True).expand(-1, time_q)
            return y.masked_fill(~valid[..., None], 0)  # torch gives NaN where jaxnet gives zeros

    class FeedForwardModule(nn.Module):
        def __init__(self, features: int, hidden: int):
            super().__init__()
            self.add_module("in", nn.Linear(features, hidden))
            self.add_module("out", nn.Linear(hidden, features))

        def forward(self, x):
            return self._modules["out"](F.gelu(self._modules["in"](x), approximate="tanh"))

    class LearnedPositions(nn.Module):
        def __init__(self, max_length: int, features: int):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(max_length, features))

        def forward(self, inputs):
            seq, mask = sequence_and_mask(inputs)
            return rejoin(inputs, seq + self.weight[:seq.shape[1]], mask)

    class SinusoidalPositions(nn.Module):
        def forward(self, inputs):
            seq, mask = sequence_and_mask(inputs)
            table = torch.from_numpy(sinusoidal_table(seq.shape[1], seq.shape[2])).to(seq.dtype)
            return rejoin(inputs, seq + table, mask)

    class Children(nn.Module):
        def __init__(self, children: dict):
            super().__init__()
            for name, child in children.items():
                self.add_module(name, child)

        def run(self, name, x):
            """The child ``name`` applied to ``x``; ``x`` itself when there is none (no dropout)."""
            return self._modules[name](x) if name in self._modules else x

    class PreNormBlock(Children):
        def forward(self, inputs):
            seq, mask = sequence_and_mask(inputs)
            h = self.run("attention_norm", seq)
            y = seq + self.run("attention_dropout", self.run("attention", h if mask is None else (h, mask)))
            y = y + self.run("mlp_dropout", self.run("mlp", self.run("mlp_norm", y)))
            if mask is not None:  # padded positions pass through
                y = torch.where(mask[..., None], y, seq)
            return rejoin(inputs, y, mask)

    class TokenTransformer(Children):
        def __init__(self, layer, children: dict):
            super().__init__(children)
            self.pad_id, self.blocks, self.features = layer.pad_id, layer.num_blocks, layer.features
            self.classifier = isinstance(layer, TransformerClassifier)

        def forward(self, tokens):
            mask = None if self.pad_id is None else tokens != self.pad_id
            h = self.run("dropout", self.run("positional", self.run("embedding", tokens)))
            for i in range(self.blocks):
                h = self.run(f"block_{i + 1}", h if mask is None else (h, mask))
                h = h if mask is None else h[0]
            h = self.run("norm", h)
            if self.classifier:
                if mask is None:
                    return self.run("head", h.mean(1))
                count = mask.sum(1, keepdim=True).clamp(min=1).to(h.dtype)
                return self.run("head", (h * mask[..., None]).sum(1) / count)
            if "output" in self._modules:
                return self.run("output", h)
            return h @ self.embedding.weight.T * self.features ** -0.5  # tied to the embedding

    return types.SimpleNamespace(
        conv=ChannelsLastConv, conv_transpose=ChannelsLastConvTranspose, pool=ChannelsLastPool,
        global_pool=GlobalPool, upsample=ChannelsLastUpsample, batch_norm=ChannelsLastBatchNorm,
        group_norm=ChannelsLastGroupNorm, to_shape=ToShape, recurrent=recurrent, attention=Attention,
        feed_forward=FeedForwardModule, learned_positions=LearnedPositions,
        sinusoidal_positions=SinusoidalPositions, block=PreNormBlock, token_transformer=TokenTransformer)


def _build(torch, modules, layer: Layer, path: str, layout: _Layout):
    """The module for ``layer`` at ``path`` (relative to the network)."""
    nn = torch.nn

    def children():
        return {name: _build(torch, modules, child, f"{path}/{name}" if path else name, layout)
                for name, child in layer.children()}

    if isinstance(layer, Named):
        return _build(torch, modules, layer.layer, path, layout)
    if isinstance(layer, Serial):
        return nn.Sequential(collections.OrderedDict(children()))
    if isinstance(layer, TransformerBlock):
        return modules.block(children())
    if isinstance(layer, (TransformerLM, TransformerClassifier)):
        return modules.token_transformer(layer, children())
    if path not in layout.rows:
        raise ValueError(f"to_torch: {_where(path, layer)} ({layer!r}) is not a serial chain of "
                         "leaf layers; only serial networks convert")
    params, (_, x_shape, y_shape) = _subtree(layout.params, path), layout.rows[path]
    if isinstance(layer, (Recurrent, Bidirectional)):
        direction = params["forward"] if isinstance(layer, Bidirectional) else params
        return modules.recurrent[type(_first_direction(layer).cell)](
            layer, direction["input"]["w"].shape[0], _where(path, layer))
    if isinstance(layer, MultiHeadAttention):
        return modules.attention(layer, params["query"]["w"].shape[0], params["key"]["w"].shape[0])
    if isinstance(layer, LearnedPositionalEmbedding):
        return modules.learned_positions(*params["table"].shape)
    if isinstance(layer, SinusoidalPositionalEncoding):
        return modules.sinusoidal_positions()
    if not isinstance(x_shape, tuple) or not all(isinstance(d, int) for d in x_shape):
        raise ValueError(f"to_torch: {path}: {layer.kind} layers with several inputs do not convert")
    if isinstance(layer, Dense):
        return nn.Linear(x_shape[-1], layer.features, bias=layer.use_bias)
    if isinstance(layer, FeedForward):
        return modules.feed_forward(*params["in"]["w"].shape)
    if isinstance(layer, Conv):
        return modules.conv(layer, x_shape[-1], _pads(layer, x_shape[1:-1]))
    if isinstance(layer, ConvTranspose):
        return modules.conv_transpose(layer, x_shape[-1])
    if isinstance(layer, (MaxPool, AvgPool)):
        return modules.pool(layer, _pads(layer, x_shape[1:-1]))
    if isinstance(layer, (GlobalAvgPool, GlobalMaxPool)):
        return modules.global_pool(layer)
    if isinstance(layer, Upsample):
        return modules.upsample(layer, len(x_shape) - 2)
    if isinstance(layer, (Flatten, Reshape)):
        return modules.to_shape(y_shape[1:])
    if isinstance(layer, LayerNorm):
        return nn.LayerNorm(x_shape[-1], eps=layer.epsilon,
                            elementwise_affine=layer.use_scale or layer.use_bias, bias=layer.use_bias)
    if isinstance(layer, BatchNorm) and layer.use_scale == layer.use_bias:
        return modules.batch_norm(x_shape[-1], eps=layer.epsilon, momentum=1 - layer.momentum,
                                  affine=layer.use_scale)
    if isinstance(layer, RMSNorm):
        return nn.RMSNorm(x_shape[-1], eps=layer.epsilon, elementwise_affine=layer.use_scale)
    if isinstance(layer, GroupNorm) and layer.use_scale == layer.use_bias:
        return modules.group_norm(layer.num_groups, x_shape[-1], eps=layer.epsilon, affine=layer.use_scale)
    if isinstance(layer, Embedding):
        return nn.Embedding(layer.num_embeddings, layer.features)
    if isinstance(layer, Dropout):
        return nn.Dropout(layer.drop_rate)
    if isinstance(layer, Activation) and (module := _activation_module(torch, layer)) is not None:
        return module
    raise ValueError(f"to_torch: {_where(path, layer)}: no conversion to PyTorch for {layer!r} "
                     f"(kind {layer.kind!r}); the module docstring of jaxnet.torch_interop lists "
                     "the layers that convert")


# ---- the two directions ------------------------------------------------------------------

def to_torch(net: Layer, params: Params, *, model_state: State | None = None, example_shape=None,
             example_dtype=None, example=None):
    """A ``torch.nn.Module`` computing what ``net`` computes, with ``params``' weights.

    Args:
      net: a network of the layers listed in the module docstring.
      params: its params.
      model_state: its state (BatchNorm running statistics), when it keeps state.
      example_shape: the shape of one input example, e.g. ``(28, 28, 1)`` (channels last).
      example_dtype: the inputs' dtype: ``"int32"`` for token ids (a network starting with
        Embedding); default the params' floating dtype.
      example: instead of ``example_shape`` and ``example_dtype``, an example batch (arrays
        or ``jax.ShapeDtypeStruct``), a tuple or dict for several inputs (attention's
        ``{"query", "context"}`` with a context of another width).

    Shapes:
      The module takes ``(batch, *example_shape)`` tensors (float32, or integer ids), channels
      last like jaxnet, or the tuples and dicts of jaxnet's sequence layers (with bool masks),
      and returns what ``net.apply`` returns. It is in evaluation mode (``.eval()``).

    Raises:
      ValueError: a layer or option without a PyTorch equivalent (named with its path), or
        params that do not fit the network.
    """
    import torch  # lazily: jaxnet imports without torch

    if (example is None) == (example_shape is None):
        raise ValueError("to_torch: pass either example_shape (with example_dtype) or example, "
                         "not both or neither")
    model_state = state_or_empty(net, model_state, "to_torch")
    if example is None:
        leaves = jax.tree.leaves(params)
        dtype = example_dtype or (leaves[0].dtype if leaves else jnp.float32)
        example = jax.ShapeDtypeStruct((1, *example_shape), dtype)
    layout = _layout(net, input_spec(example))
    for tree, spec, what in ((params, layout.params, "params"), (model_state, layout.state, "model_state")):
        differences = compare_trees(spec, tree, dtypes=False)
        if differences:
            raise ValueError(f"to_torch: {what} do not fit the network: {differences.describe()}")
    entries = _entries("to_torch", layout)  # refuses what PyTorch cannot express
    module = _build(torch, _modules(torch), net, "", layout)
    arrays = _torch_arrays(entries, {"params": params, "state": model_state})
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    _check_names_and_shapes("to_torch", arrays, expected, "params", "the module built for net")
    module.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=False)
    return module.eval()


def from_torch(module_or_state_dict, net: Layer, example):
    """jaxnet params (and state) from a PyTorch module or state dict laid out as :func:`to_torch`'s.

    Args:
      module_or_state_dict: a ``torch.nn.Module`` or a ``{name: tensor or array}`` dict with the
        keys of :func:`to_torch`'s module (for Dense, Conv, norms and Embedding those of
        :func:`jaxnet.checkpoint.export_pytorch`; ``num_batches_tracked`` is ignored).
      net: the jaxnet network.
      example: an example batch (or its shape, or a tuple or dict of them) as for ``net.init``.

    Shapes:
      Dense ``weight (out, in)`` becomes ``w (in, out)``; a Conv ``weight (out, in, *kernel)``
      becomes ``w (*kernel, in, out)``; a ConvTranspose ``weight (in, out, *kernel)`` becomes
      ``w (*kernel, in, out)``; ``weight_ih_l0 (G*hidden, in)`` becomes ``input.w``; the packed
      ``in_proj_weight (3*E, E)`` is split into ``query.w``, ``key.w``, ``value.w``; arrays take
      the dtype of ``net.init``'s params.

    Returns:
      ``params``; ``(params, model_state)`` when ``net`` keeps state (BatchNorm).

    Raises:
      ValueError: names missing or unexpected, or shapes that differ, each listed; a layer or
        option without a PyTorch equivalent, named with its path.
    """
    source = module_or_state_dict
    if hasattr(source, "state_dict"):
        source = source.state_dict()
    given = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
             for k, v in source.items() if not k.endswith("num_batches_tracked")}
    layout = _layout(net, input_spec(example))
    entries = _entries("from_torch", layout)
    _check_names_and_shapes("from_torch", given, _torch_shapes(entries, layout),
                            "the PyTorch weights", "the jaxnet network")
    values = _jaxnet_leaves(entries, given, layout)
    params, state = (jax.tree.unflatten(jax.tree.structure(tree),
                                        [values[kind][name] for name, _ in named_leaves(tree)])
                     for tree, kind in ((layout.params, "params"), (layout.state, "state")))
    return (params, state) if net.has_state else params
