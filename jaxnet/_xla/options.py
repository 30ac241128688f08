"""The XLA options jaxnet compiles its own programs with: convolutions off YNNPACK on CPU.

XLA:CPU (jax 0.10) hands dots, reductions and convolutions to YNNPACK. A convolution that
YNNPACK runs on its own uses a single thread, so on a multi-core CPU it is slower than XLA's own
(Eigen) convolution, which uses every core (docs/performance.md, finding 9). jaxnet's train step,
``fit``, ``evaluate`` and ``predict`` are therefore compiled on CPU with YNNPACK limited to dots
and reductions (:data:`YNN_FUSION_TYPES`, jax 0.10's default set without convolutions); a
network without convolutions compiles to the same program as with XLA's defaults.

Forward-only programs (``predict``, ``evaluate``) over at least :data:`LARGE_FORWARD_ROWS` rows per
call also leave dots to Eigen (:data:`EIGEN_DOT_FUSION_TYPES`): for the benchmark MLP's
forward pass Eigen's dots are the faster from 256 rows up and YNNPACK's below (docs/performance.md,
finding 9). Training programs do so when most of their float32 dot work is in products of at
least :data:`LARGE_DOT_ROWS` rows and :data:`LARGE_DOT_COLUMNS` columns (:func:`has_large_dots`,
:func:`compile`), as a transformer's ``batch x time`` rows are: Eigen runs those faster,
YNNPACK the products of a batch of a hundred rows and those of a few columns (finding 20).

The options apply per compiled program (``jax.jit(..., compiler_options=...)``), never to the
rest of the process. They are left out off CPU, when the environment sets
``JAXNET_XLA_OPTIONS=default``, and when the installed XLA does not know the option.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

ENV_VAR = "JAXNET_XLA_OPTIONS"
YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
EIGEN_DOT_FUSION_TYPES = "LIBRARY_FUSION_TYPE_REDUCE"
LARGE_FORWARD_ROWS = 256
LARGE_DOT_ROWS, LARGE_DOT_COLUMNS = 2048, 256


@functools.cache
def compiler_options(eigen_dots: bool = False) -> dict[str, str]:
    """The options for jaxnet's programs on the default backend (``{}`` for XLA's defaults).

    ``eigen_dots``: dots left to Eigen too, for a forward-only program over at least
    :data:`LARGE_FORWARD_ROWS` rows or a program with large dots (:func:`has_large_dots`).
    Evaluated once per process and kind, at the first such program compiled (it starts JAX's
    backend); call ``compiler_options.cache_clear()`` after changing ``JAXNET_XLA_OPTIONS``. Pass
    ``eigen_dots`` positionally, as :func:`jit` does, or the cache holds it twice.
    """
    if os.environ.get(ENV_VAR) == "default" or jax.default_backend() != "cpu":
        return {}
    options = {YNN_OPTION: EIGEN_DOT_FUSION_TYPES if eigen_dots else YNN_FUSION_TYPES}
    try:  # an XLA without the option (or without these values) rejects it at compile time
        jax.jit(jnp.negative, compiler_options=options).lower(jnp.zeros(())).compile()
    except Exception:  # noqa: BLE001 - jaxlib raises its own XlaRuntimeError type
        return {}
    return options


def jit(fun: Callable, *, forward_rows: int | None = None, eigen_dots: bool = False,
        **kwargs: Any):
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options`.

    ``forward_rows``: for a program without gradients, the rows (examples) it runs per call;
    ``eigen_dots``: leave dots to Eigen whatever the rows.
    """
    large = eigen_dots or (forward_rows is not None and forward_rows >= LARGE_FORWARD_ROWS)
    return jax.jit(fun, compiler_options=compiler_options(large) or None, **kwargs)


def compile(jitted, *args):
    """``jitted.lower(*args).compile()`` for a program made by :func:`jit`, with dots left to
    Eigen when the program has large dots (:func:`has_large_dots`); traced once."""
    traced = jitted.trace(*args)
    if not has_large_dots(traced.jaxpr):
        return traced.lower().compile()
    return traced.lower().compile(compiler_options(True) or None)


def has_large_dots(jaxpr) -> bool:
    """Whether at least half of the float32 dot FLOPs of ``jaxpr`` (a ``ClosedJaxpr``, its
    loops' bodies counted once per iteration of a ``scan``) are in products without batch axes
    with at least :data:`LARGE_DOT_ROWS` rows (the left operand's free axes) and
    :data:`LARGE_DOT_COLUMNS` columns (the right operand's)."""
    large = total = 0
    for eqn, repeats in _equations(jaxpr.jaxpr, 1):
        if eqn.primitive.name != "dot_general":
            continue
        lhs, rhs = (v.aval for v in eqn.invars[:2])
        if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
            continue  # bfloat16 products are YNNPACK's (the matrix units)
        (contracting, rhs_contracting), (batch, _) = eqn.params["dimension_numbers"]
        flops = 2 * repeats * math.prod(eqn.outvars[0].aval.shape) * math.prod(
            lhs.shape[d] for d in contracting)
        rows = math.prod(lhs.shape[d] for d in range(lhs.ndim)
                         if d not in contracting and d not in batch)
        columns = math.prod(rhs.shape[d] for d in range(rhs.ndim) if d not in rhs_contracting)
        total += flops
        large += flops if (not batch and rows >= LARGE_DOT_ROWS
                           and columns >= LARGE_DOT_COLUMNS) else 0
    return total > 0 and 2 * large >= total


def _equations(jaxpr, repeats: int):
    """``(equation, times it runs)`` of ``jaxpr`` and of the jaxprs in its equations' params."""
    for eqn in jaxpr.eqns:
        yield eqn, repeats
        inner = repeats * (eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _equations(sub, inner)
