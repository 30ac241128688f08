"""Weight initializers by name, over ``jax.nn.initializers``.

``"pytorch"`` reproduces PyTorch's default for ``Linear``/``Conv``: weights and
biases uniform in ``±1/sqrt(fan_in)``; every other scheme starts biases at zero.
"""

from __future__ import annotations

import math

import jax
from jax.nn import initializers

WEIGHT_INITS = {
    "he_normal": initializers.he_normal(),
    "he_uniform": initializers.he_uniform(),
    "glorot_normal": initializers.glorot_normal(),
    "glorot_uniform": initializers.glorot_uniform(),
    "lecun_normal": initializers.lecun_normal(),
    "lecun_uniform": initializers.lecun_uniform(),
    "pytorch": initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
}


def check_weight_init(layer: str, weight_init) -> None:
    if not (callable(weight_init) or weight_init in WEIGHT_INITS):
        raise ValueError(f"{layer}: unknown weight_init {weight_init!r}; choose one of "
                         f"{sorted(WEIGHT_INITS)} or pass a jax.nn.initializers function")


def init_weight_and_bias(key, weight_init, w_shape, fan_in: int, use_bias: bool, dtype) -> dict:
    """``{"w": w_shape, "b": (w_shape[-1],)}`` arrays (no ``b`` without bias)."""
    w_key, b_key = jax.random.split(key)
    init = WEIGHT_INITS[weight_init] if isinstance(weight_init, str) else weight_init
    params = {"w": init(w_key, w_shape, dtype)}
    if use_bias:
        b_shape = (w_shape[-1],)
        if weight_init == "pytorch":
            bound = 1 / math.sqrt(fan_in)
            params["b"] = jax.random.uniform(b_key, b_shape, dtype, -bound, bound)
        else:
            params["b"] = jax.numpy.zeros(b_shape, dtype)
    return params
