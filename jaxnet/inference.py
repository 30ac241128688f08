"""Batch inference in fixed-size chunks: one compiled function, no recompilation for the last chunk."""

from __future__ import annotations

import functools

import jax
import numpy as np

from jaxnet.core import Layer, Params, State


@functools.partial(jax.jit, static_argnames=("net", "proba"))
def _apply(params, model_state, x, *, net: Layer, proba: bool):
    y, _ = net.apply_with_state(params, model_state, x)
    return jax.nn.softmax(y, axis=-1) if proba else y


def predict(net: Layer, params: Params, x, *, model_state: State | None = None,
            batch_size: int = 8192, proba: bool = False) -> np.ndarray:
    """The network's outputs for every input, computed ``batch_size`` inputs at a time.

    Args:
      net: the network (evaluation mode).
      params: its parameters.
      x: ``(n, *example)`` inputs: a NumPy array (memory-mapped ``.npy`` files work: only one
        chunk is on the device at a time) or a JAX array.
      model_state: the trained state, for networks with state.
      batch_size: inputs per compiled call; the last chunk is padded to it, so one program
        serves every chunk.
      proba: return ``softmax`` of the outputs (probabilities per class) instead of logits.

    Returns:
      ``(n, *output)``, equal to ``net.apply(params, x)`` computed in one go: a JAX array on
      the device when ``x`` is one, else a NumPy array.
    """
    if model_state is None:
        if net.has_state:
            raise ValueError("predict: this network keeps state; pass the trained model_state")
        model_state = {}
    n = x.shape[0]
    if n == 0:
        raise ValueError("predict: no inputs (x has 0 rows)")
    batch_size = min(batch_size, n)
    run = functools.partial(_apply, params, model_state, net=net, proba=proba)
    if isinstance(x, jax.Array) and n == batch_size:
        return run(x)
    outputs = []
    for start in range(0, n, batch_size):
        chunk = np.asarray(x[start:start + batch_size])  # one chunk in host memory at a time
        rows = chunk.shape[0]
        if rows < batch_size:  # pad to the compiled shape; the padding rows are dropped below
            chunk = np.concatenate([chunk, np.zeros((batch_size - rows,) + chunk.shape[1:], chunk.dtype)])
        outputs.append(run(chunk)[:rows])
    return np.concatenate([np.asarray(o) for o in outputs]) if len(outputs) > 1 else np.asarray(outputs[0])
