"""Exporting a trained network for serving without jaxnet: StableHLO or ONNX.

:func:`export` folds the network, its params (and state), the preprocessing and optionally the
softmax into one program in evaluation mode, with a symbolic batch dimension: raw inputs in,
logits or probabilities out. The file is written atomically, next to a JSON sidecar
``FILE.json`` describing inputs, outputs, versions and the file's sha256.

* ``format="stablehlo"``: ``jax.export`` serialized bytes; load them with
  ``jax.export.deserialize(data).call(x)`` in any process with JAX, no jaxnet needed.
* ``format="onnx"``: an ONNX model through ``jax2onnx`` (``pip install jaxnet[onnx]``), for
  ``onnxruntime`` and other ONNX runtimes; see ``docs/export.md`` for what converts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet._version import __version__
from jaxnet.nn.layer import Layer, Params, State, shape_str, state_or_empty
from jaxnet.precision import Policy, apply_with_policy, check_params, get_policy
from jaxnet.tensorfile import atomic_write

FORMATS = ("stablehlo", "onnx")
#: The platforms a StableHLO export is lowered for (it then runs on any of them).
PLATFORMS = ("cpu", "cuda")


def export(net: Layer, params: Params, example, *, model_state: State | None = None,
           format: str = "stablehlo", output, preprocess=None, proba: bool = False,
           force: bool = False, precision: str | Policy | None = None,
           metadata: dict | None = None, output_name: str | None = None) -> Path:
    """Writes ``net`` with its params as a self-contained program, and a JSON sidecar.

    Args:
      net: the network.
      params: its trained params.
      example: an example batch ``(n, *example)`` (an array, a shape tuple for float32, or a
        ``jax.ShapeDtypeStruct``); its example shape and dtype are the exported input's, and
        its batch size is replaced by a symbolic ``batch``.
      model_state: the state (BatchNorm statistics) of a stateful network.
      format: ``"stablehlo"`` or ``"onnx"``.
      output: the file to write; ``FILE.json`` is written next to it.
      preprocess: folded into the program before the network: ``None``, a ``(mean, std)`` pair
        of arrays broadcastable to one example (the input becomes ``(x - mean) / std`` in the
        params' dtype), or a pure ``jnp`` function of the batch.
      proba: output the softmax probabilities instead of logits.
      force: overwrite an existing ``output`` (and sidecar).
      precision: the forward pass's policy, as for :func:`jaxnet.predict` (``"bf16"``:
        bfloat16 compute, float32 outputs); ``None``: the params' dtype.
      output_name: the output's name (default ``"probabilities"`` with ``proba``, else
        ``"logits"``; ``jaxnet export`` names a regression run's ``"predictions"``).
      metadata: more JSON values for the sidecar (``jaxnet export`` adds the run's model, data
        set and, for text, vocabulary); they cannot replace its own entries.

    Shapes:
      The exported program maps ``x: (batch, *example)`` of ``example``'s dtype to
      ``y: (batch, *output)`` (``(batch, num_classes)`` for a classifier) of the network's dtype.

    Returns:
      The path written.

    Raises:
      ValueError: an unknown format; a stateful network without ``model_state``; ONNX with a
        precision that does not compute in float32.
      FileExistsError: ``output`` exists and ``force`` is False.
      ImportError: ``format="onnx"`` without jax2onnx installed.
      NotImplementedError: (ONNX) a layer whose operations jax2onnx cannot express; the
        message names the layer.
    """
    if format not in FORMATS:
        raise ValueError(f"export: unknown format {format!r}; use one of {', '.join(map(repr, FORMATS))}")
    output = Path(output)
    sidecar = output.with_name(output.name + ".json")
    for path in (output, sidecar):
        if path.exists() and not force:
            raise FileExistsError(f"export: {path} exists; pass force=True (--force) to overwrite it")
    policy = get_policy(precision)
    if format == "onnx" and (narrow := _narrow_dtypes(policy)):
        raise ValueError(f"export: format='onnx' needs float32 compute, but precision "
                         f"{policy.name} computes in {', '.join(narrow)}, which onnxruntime's "
                         "CPU kernels do not run; export format='stablehlo' instead")
    model_state = state_or_empty(net, model_state, "export")
    spec = _example_spec(example)
    fn = serving_function(net, params, model_state, preprocess=preprocess, proba=proba,
                          input_dtype=spec.dtype, precision=policy)
    y = jax.eval_shape(fn, spec)
    output_name = output_name or ("probabilities" if proba else "logits")
    if format == "stablehlo":
        data = _stablehlo_bytes(fn, spec)
    else:
        from jaxnet._onnx_export import onnx_bytes
        data = onnx_bytes(fn, spec, net, params, model_state, output_name)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, data)
    meta = {
        "format": format,
        "file": output.name,
        "inputs": [{"name": "x", "shape": ["batch", *spec.shape[1:]], "dtype": str(spec.dtype)}],
        "outputs": [{"name": output_name, "shape": ["batch", *y.shape[1:]], "dtype": str(y.dtype)}],
        "num_classes": int(y.shape[-1]) if y.ndim == 2 else None,
        "proba": bool(proba),
        "preprocess": _describe_preprocess(preprocess),
        "precision": None if policy is None else policy.name,
        "platforms": list(PLATFORMS) if format == "stablehlo" else None,
        "jaxnet_version": __version__,
        "jax_version": jax.__version__,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    meta = {**(metadata or {}), **meta}
    atomic_write(sidecar, (json.dumps(meta, indent=2) + "\n").encode())
    return output


def serving_function(net: Layer, params: Params, model_state: State, *, preprocess=None,
                     proba: bool = False, input_dtype=jnp.float32,
                     precision: str | Policy | None = None) -> Callable[[jax.Array], jax.Array]:
    """``x (batch, *example) -> y``: preprocessing, the network in evaluation mode (in
    ``precision``'s policy), and the softmax when ``proba``, with params and state as constants
    (what :func:`export` exports)."""
    prep = _preprocess_fn(preprocess, params, input_dtype)
    policy = get_policy(precision)
    check_params(policy, params, "export")

    def serve(x):
        y, _ = apply_with_policy(net, policy, params, model_state, prep(x), train=False,
                                 batch_ndim=1)
        return jax.nn.softmax(y, axis=-1) if proba else y
    return serve


def _narrow_dtypes(policy: Policy | None) -> list[str]:
    """The dtypes other than float32 that ``policy``'s forward pass computes in."""
    if policy is None:
        return []
    used = (policy.compute_dtype, getattr(policy, "matmul_dtype", None))
    return sorted({jnp.dtype(d).name for d in used if d is not None} - {"float32"})


def _example_spec(example) -> jax.ShapeDtypeStruct:
    if isinstance(example, tuple) and all(isinstance(d, (int, np.integer)) for d in example):
        example = jax.ShapeDtypeStruct(example, jnp.float32)
    if not (hasattr(example, "shape") and hasattr(example, "dtype")):
        example = np.asarray(example)
    if len(example.shape) < 1:
        raise ValueError("export: example must be a batch (n, *example), e.g. x[:1]; got a scalar")
    dtype = jax.dtypes.canonicalize_dtype(example.dtype)
    return jax.ShapeDtypeStruct((1, *example.shape[1:]), dtype)


def _preprocess_fn(preprocess, params, input_dtype):
    if preprocess is None:
        return lambda x: x
    if callable(preprocess):
        return preprocess
    try:
        mean, std = preprocess
    except (TypeError, ValueError):
        raise TypeError("export: preprocess must be None, a (mean, std) pair or a function; "
                        f"got {type(preprocess).__name__}") from None
    leaves = jax.tree.leaves(params)
    dtype = leaves[0].dtype if leaves and jnp.issubdtype(leaves[0].dtype, jnp.floating) else jnp.float32
    if not jnp.issubdtype(input_dtype, jnp.floating):
        input_dtype = dtype
    mean, std = (np.asarray(v, dtype=input_dtype) for v in (mean, std))

    def standardise(x):
        x = x.astype(input_dtype)
        try:  # one example's shape; explicit, never relying on implicit rank promotion
            m, s = (jnp.broadcast_to(v, x.shape[1:])[None] for v in (mean, std))
        except ValueError:
            raise ValueError(f"export: preprocess mean {shape_str(mean.shape)} and std "
                             f"{shape_str(std.shape)} do not broadcast to examples of shape "
                             f"{shape_str(x.shape[1:])}") from None
        return (x - m) / s
    return standardise


def _describe_preprocess(preprocess):
    if preprocess is None:
        return None
    if callable(preprocess):
        return {"kind": "function", "name": getattr(preprocess, "__name__", "function")}
    mean, std = preprocess
    return {"kind": "standardise", "mean": np.asarray(mean).tolist(), "std": np.asarray(std).tolist()}


def _stablehlo_bytes(fn, spec: jax.ShapeDtypeStruct) -> bytes:
    shape = jax.export.symbolic_shape(", ".join(["b", *map(str, spec.shape[1:])]))
    exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(
        jax.ShapeDtypeStruct(shape, spec.dtype))
    return bytes(exported.serialize())
