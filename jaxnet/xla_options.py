"""The XLA options jaxnet compiles its own programs with: convolutions off YNNPACK on CPU.

XLA:CPU (jax 0.10) hands dots, reductions and convolutions to YNNPACK. A convolution that
YNNPACK runs on its own uses a single thread: on this project's 2-core machine the benchmark
CNN's 3x3 32->64 convolution at batch 128 takes ~10 ms, the same with one core as with two,
against ~5.3 ms (175 GFLOP/s, near the machine's matmul rate) through XLA's own (Eigen)
convolution, which uses every core (docs/performance.md, finding 9). jaxnet's train step,
``fit``, ``evaluate`` and ``predict`` are therefore compiled on CPU with YNNPACK limited to dots
and reductions (:data:`YNN_FUSION_TYPES`, jax 0.10's default set without convolutions); a
network without convolutions compiles to the same program as before.

The options apply per compiled program (``jax.jit(..., compiler_options=...)``), never to the
rest of the process. They are left out off CPU, when the environment sets
``JAXNET_XLA_OPTIONS=default``, and when the installed XLA does not know the option.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

ENV_VAR = "JAXNET_XLA_OPTIONS"
YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


@functools.cache
def compiler_options() -> dict[str, str]:
    """The options for jaxnet's programs on the default backend (``{}`` for XLA's defaults).

    Evaluated once per process, at the first jaxnet program compiled (it starts JAX's backend);
    call ``compiler_options.cache_clear()`` after changing ``JAXNET_XLA_OPTIONS``.
    """
    if os.environ.get(ENV_VAR) == "default" or jax.default_backend() != "cpu":
        return {}
    options = {YNN_OPTION: YNN_FUSION_TYPES}
    try:  # an XLA without the option (or without these values) rejects it at compile time
        jax.jit(jnp.negative, compiler_options=options).lower(jnp.zeros(())).compile()
    except Exception:  # noqa: BLE001 - jaxlib raises its own XlaRuntimeError type
        return {}
    return options


def jit(fun: Callable, **kwargs: Any):
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options`."""
    return jax.jit(fun, compiler_options=compiler_options() or None, **kwargs)
