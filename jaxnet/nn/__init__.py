"""Layers, their composition and the public layer protocol (:class:`Layer`).

Every name here is also importable from ``jaxnet`` itself.
"""

from jaxnet.nn.attention import MultiHeadAttention
from jaxnet.nn.activations import (Activation, elu, gelu, leaky_relu, log_softmax, relu, sigmoid,
                                   silu, softmax, softplus, tanh)
from jaxnet.nn.basic import Dense, Dropout, Embedding, Flatten, Reshape
from jaxnet.nn.combinators import (Join, Named, Parallel, Residual, Route, Select, Serial, join,
                                   named, parallel, residual, route, select, serial)
from jaxnet.nn.conv import AvgPool, Conv, Conv1D, Conv2D, MaxPool
from jaxnet.nn.global_pool import GlobalAvgPool, GlobalMaxPool
from jaxnet.nn.layer import Layer, ShapeError, apply_child, init_child, split_keys
from jaxnet.nn.norm import BatchNorm, GroupNorm, LayerNorm, RMSNorm
from jaxnet.nn.positional import (LearnedPositionalEmbedding, SinusoidalPositionalEncoding,
                                  apply_rotary)
from jaxnet.nn.recurrent import (GRU, LSTM, Bidirectional, GRUCell, LSTMCell, Recurrent,
                                 SimpleRNN, SimpleRNNCell)
from jaxnet.nn.summary import Summary, summarize
from jaxnet.nn.transformer import TransformerBlock, TransformerClassifier, TransformerLM
from jaxnet.nn.upsampling import ConvTranspose, ConvTranspose1D, ConvTranspose2D, Upsample

__all__ = [
    "Activation", "AvgPool", "BatchNorm", "Conv", "Conv1D", "Conv2D", "Dense", "Dropout",
    "Embedding", "Flatten", "Layer", "LayerNorm", "MaxPool", "Named", "Parallel", "Reshape",
    "Residual", "Serial", "ShapeError", "Summary", "apply_child", "elu", "gelu", "init_child",
    "leaky_relu", "log_softmax", "named", "parallel", "relu", "residual", "serial", "sigmoid",
    "silu", "softmax", "softplus", "split_keys", "summarize", "tanh",
    "ConvTranspose", "ConvTranspose1D", "ConvTranspose2D", "GlobalAvgPool", "GlobalMaxPool", "Upsample",
    "Bidirectional", "GRU", "GRUCell", "LSTM", "LSTMCell", "Recurrent", "SimpleRNN", "SimpleRNNCell",
    "GroupNorm", "LearnedPositionalEmbedding", "MultiHeadAttention", "RMSNorm",
    "SinusoidalPositionalEncoding", "TransformerBlock", "TransformerClassifier", "TransformerLM",
    "apply_rotary", "Join", "Route", "Select", "join", "route", "select",
]
