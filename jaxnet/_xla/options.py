"""The XLA options jaxnet compiles its own programs with: convolutions off YNNPACK on CPU.

XLA:CPU (jax 0.10) hands dots, reductions and convolutions to YNNPACK. A convolution that
YNNPACK runs on its own uses a single thread, so on a multi-core CPU it is slower than XLA's own
(Eigen) convolution, which uses every core (docs/performance.md, finding 9). jaxnet's train step,
``fit``, ``evaluate`` and ``predict`` are therefore compiled on CPU with YNNPACK limited to dots
and reductions (:data:`YNN_FUSION_TYPES`, jax 0.10's default set without convolutions); a
network without convolutions compiles to the same program as with XLA's defaults.

Forward-only programs (``predict``, ``evaluate``) over at least :data:`LARGE_FORWARD_ROWS` rows per
call also leave dots to Eigen (:data:`FORWARD_YNN_FUSION_TYPES`): for the benchmark MLP's
forward pass Eigen's dots are the faster from 256 rows up and YNNPACK's below, while in training
steps YNNPACK's are as fast or faster (docs/performance.md, finding 9).

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
FORWARD_YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_REDUCE"
LARGE_FORWARD_ROWS = 256


@functools.cache
def compiler_options(large_forward: bool = False) -> dict[str, str]:
    """The options for jaxnet's programs on the default backend (``{}`` for XLA's defaults).

    ``large_forward``: for a forward-only program over at least :data:`LARGE_FORWARD_ROWS` rows.
    Evaluated once per process and kind, at the first such program compiled (it starts JAX's
    backend); call ``compiler_options.cache_clear()`` after changing ``JAXNET_XLA_OPTIONS``. Pass
    ``large_forward`` positionally, as :func:`jit` does, or the cache holds it twice.
    """
    if os.environ.get(ENV_VAR) == "default" or jax.default_backend() != "cpu":
        return {}
    options = {YNN_OPTION: FORWARD_YNN_FUSION_TYPES if large_forward else YNN_FUSION_TYPES}
    try:  # an XLA without the option (or without these values) rejects it at compile time
        jax.jit(jnp.negative, compiler_options=options).lower(jnp.zeros(())).compile()
    except Exception:  # noqa: BLE001 - jaxlib raises its own XlaRuntimeError type
        return {}
    return options


def jit(fun: Callable, *, forward_rows: int | None = None, **kwargs: Any):
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options`.

    ``forward_rows``: for a program without gradients, the rows (examples) it runs per call.
    """
    large = forward_rows is not None and forward_rows >= LARGE_FORWARD_ROWS
    return jax.jit(fun, compiler_options=compiler_options(large) or None, **kwargs)
