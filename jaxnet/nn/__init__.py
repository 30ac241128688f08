"""Layers, their composition and the public layer protocol (:class:`Layer`).

Every name here is also importable from ``jaxnet`` itself.
"""

from jaxnet.nn.activations import (Activation, elu, gelu, leaky_relu, log_softmax, relu, sigmoid,
                                   silu, softmax, softplus, tanh)
from jaxnet.nn.basic import Dense, Dropout, Embedding, Flatten, Reshape
from jaxnet.nn.combinators import (Named, Parallel, Residual, Serial, named, parallel, residual,
                                   serial)
from jaxnet.nn.conv import AvgPool, Conv, Conv1D, Conv2D, MaxPool
from jaxnet.nn.layer import Layer, ShapeError, apply_child, init_child, split_keys
from jaxnet.nn.norm import BatchNorm, LayerNorm
from jaxnet.nn.summary import Summary, summarize

__all__ = [
    "Activation", "AvgPool", "BatchNorm", "Conv", "Conv1D", "Conv2D", "Dense", "Dropout",
    "Embedding", "Flatten", "Layer", "LayerNorm", "MaxPool", "Named", "Parallel", "Reshape",
    "Residual", "Serial", "ShapeError", "Summary", "apply_child", "elu", "gelu", "init_child",
    "leaky_relu", "log_softmax", "named", "parallel", "relu", "residual", "serial", "sigmoid",
    "silu", "softmax", "softplus", "split_keys", "summarize", "tanh",
]
