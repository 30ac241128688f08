"""jaxnet: neural networks as pure functions over parameter pytrees.

>>> import jax, jaxnet as jn
>>> net = jn.serial(jn.Flatten(), jn.Dense(512), jn.relu, jn.Dense(10))
>>> params = net.init(jax.random.key(0), (1, 28, 28))
>>> logits = net.apply(params, jax.numpy.ones((32, 28, 28)))   # (32, 10)
"""

from jaxnet.nn.activations import (Activation, elu, gelu, leaky_relu, log_softmax, relu, sigmoid,
                                silu, softmax, softplus, tanh)
from jaxnet.checkpoint import (CheckpointError, latest_checkpoint, restore_checkpoint,
                               restore_params, save_checkpoint)
from jaxnet.nn.combinators import Named, Parallel, Residual, Serial, named, parallel, residual, serial
from jaxnet.nn.conv import AvgPool, Conv, Conv1D, Conv2D, MaxPool
from jaxnet.nn.layer import Context, Layer, ShapeError
from jaxnet.data_parallel import data_mesh
from jaxnet.host_memory import keep_freed_host_memory
from jaxnet.nn.basic import Dense, Dropout, Embedding, Flatten, Reshape
from jaxnet.nn.norm import BatchNorm, LayerNorm
from jaxnet.precision import Policy, get_policy
from jaxnet.population import (Ensemble, Population, best_member, fit_population,
                               init_population)
from jaxnet.stax import from_stax, to_stax
from jaxnet.nn.summary import Summary, summarize
from jaxnet.inference import predict, predict_proba, predict_to_file
from jaxnet.per_example import (clip_per_example, dp_aggregate, per_example_grads,
                                per_example_losses, per_example_norms, per_example_value_and_grads)
from jaxnet.train import TrainState, evaluate, fit, init_train_state, make_train_step

__version__ = "0.1.0"

__all__ = [
    "Activation", "AvgPool", "BatchNorm", "Context", "Conv", "Conv1D", "Conv2D", "Dense", "Dropout",
    "Embedding", "Flatten", "Layer", "LayerNorm", "MaxPool", "Named", "Parallel", "Reshape",
    "Residual", "Serial", "ShapeError", "Summary", "elu", "gelu", "leaky_relu", "log_softmax",
    "named", "parallel", "relu", "residual", "serial", "sigmoid", "silu", "softmax", "softplus",
    "summarize", "tanh", "from_stax", "to_stax", "TrainState", "evaluate", "fit",
    "init_train_state", "make_train_step", "predict", "CheckpointError", "latest_checkpoint",
    "restore_checkpoint", "restore_params", "save_checkpoint", "data_mesh", "Ensemble", "Population",
    "best_member", "fit_population", "init_population", "Policy", "get_policy",
    "predict_proba", "predict_to_file", "clip_per_example", "dp_aggregate", "per_example_grads",
    "per_example_losses", "per_example_norms", "per_example_value_and_grads",
    "keep_freed_host_memory",
]
