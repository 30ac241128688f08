"""jaxnet: neural networks as pure functions over parameter pytrees.

>>> import jax, jaxnet as jn
>>> net = jn.serial(jn.Flatten(), jn.Dense(512), jn.relu, jn.Dense(10))
>>> params = net.init(jax.random.key(0), (1, 28, 28))
>>> logits = net.apply(params, jax.numpy.ones((32, 28, 28)))   # (32, 10)

Importing jaxnet changes nothing in the process (allocator, plotting backend, XLA flags); see
:func:`keep_freed_host_memory` for the one process-wide setting it offers.
"""

from jaxnet.nn import *  # noqa: F401,F403  (the layers; their list is jaxnet.nn.__all__)
from jaxnet.nn import __all__ as _layer_names
from jaxnet.checkpoint import (CheckpointError, latest_checkpoint, restore_checkpoint,
                               restore_params, save_checkpoint)
from jaxnet.data_parallel import data_mesh
from jaxnet.export import export
from jaxnet.host_memory import keep_freed_host_memory
from jaxnet.inference import predict, predict_proba, predict_to_file
from jaxnet.per_example import (clip_per_example, dp_aggregate, per_example_grads,
                                per_example_losses, per_example_norms, per_example_value_and_grads)
from jaxnet.population import (Ensemble, Population, best_member, fit_population,
                               init_population)
from jaxnet.precision import Policy, get_policy
from jaxnet.runs import Run, load_run
from jaxnet.stax import from_stax, to_stax
from jaxnet.torch_interop import from_torch, to_torch
from jaxnet.train import TrainState, evaluate, fit, init_train_state, make_train_step

from jaxnet._version import __version__

__all__ = [
    *_layer_names,
    "CheckpointError", "latest_checkpoint", "restore_checkpoint", "restore_params",
    "save_checkpoint", "data_mesh", "keep_freed_host_memory", "predict", "predict_proba",
    "predict_to_file", "clip_per_example", "dp_aggregate", "per_example_grads",
    "per_example_losses", "per_example_norms", "per_example_value_and_grads", "Ensemble",
    "Population", "best_member", "fit_population", "init_population", "Policy", "get_policy",
    "from_stax", "to_stax", "TrainState", "evaluate", "fit", "init_train_state",
    "make_train_step", "Run", "load_run", "export", "to_torch", "from_torch",
]


def __getattr__(name: str):
    if name == "Context":
        raise AttributeError(
            "jaxnet.Context was removed: a layer now implements the public methods "
            "init_params(key, x) and forward(params, state, x, *, train, key); see "
            "docs/custom_layers.md")
    raise AttributeError(f"module 'jaxnet' has no attribute {name!r}")
