"""ONNX export through jax2onnx (private; see :func:`jaxnet.export.export`).

Two adjustments make jaxnet's programs convert:

* jax2onnx lowers a ``reduce_window`` (jaxnet's pooling) to an ONNX pool over *every* axis of
  its operand, and ONNX runtimes pool over at most 3 axes; a channels-last pool window
  ``(1, *window, 1)`` is therefore rewritten to pool ``(batch * channels, *spatial)``, which
  has one axis of window 1 plus the spatial ones.
* Calls (``jit``, ``custom_jvp``/``custom_vjp``) are inlined, so the rewrite reaches inside them.

A primitive that jax2onnx has no rule for is reported with the layer (kind and path) that uses it.
"""

from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jaxnet.nn.calls import recording

_CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat", "checkpoint")
_POOLS = ("reduce_window_max", "reduce_window_min", "reduce_window_sum")


def import_jax2onnx():
    """``(jax2onnx, its plugin_system)``; an ``ImportError`` naming the extra when missing."""
    try:
        import jax2onnx
        from jax2onnx.plugins import plugin_system
    except ImportError as error:
        raise ImportError("export(format='onnx') needs jax2onnx and onnx: "
                          "pip install 'jaxnet[onnx]'") from error
    return jax2onnx, plugin_system


def _inner_jaxpr(eqn):
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(name)
        if isinstance(inner, jcore.ClosedJaxpr):
            return inner.jaxpr, inner.consts
        if isinstance(inner, jcore.Jaxpr):
            return inner, ()
    return None


def _pool_over_channels_first(eqn, x):
    """The pool of ``eqn`` on ``x`` as a pool of ``(batch * channels, *spatial)``, or None when
    its window is not ``(1, *window, 1)``."""
    p = eqn.params
    rank = x.ndim
    edges = (0, rank - 1)
    if rank < 3 or any(p["window_dimensions"][i] != 1 or p["window_strides"][i] != 1
                       or tuple(p["padding"][i]) != (0, 0) or p["base_dilation"][i] != 1
                       or p["window_dilation"][i] != 1 for i in edges):
        return None
    spatial = tuple(range(1, rank - 1))
    n, c = x.shape[0], x.shape[-1]
    folded = jnp.transpose(x, (0, rank - 1, *spatial)).reshape((-1, *x.shape[1:-1]))
    params = {k: (v[0], *v[1:-1]) if k != "padding" else ((0, 0), *v[1:-1]) for k, v in p.items()}
    pooled = eqn.primitive.bind(folded, **params)
    y = pooled.reshape((n, c, *pooled.shape[1:]))
    return jnp.transpose(y, (0, *(i + 1 for i in spatial), 1))


def _eval(jaxpr, consts, *args):
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        inner = _inner_jaxpr(eqn) if eqn.primitive.name in _CALLS else None
        out = None
        if inner is not None:
            out = _eval(inner[0], inner[1], *invals)
        elif eqn.primitive.name in _POOLS:
            pooled = _pool_over_channels_first(eqn, invals[0])
            out = None if pooled is None else [pooled]
        if out is None:
            with eqn.ctx.manager:
                out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            out = out if eqn.primitive.multiple_results else [out]
        for var, val in zip(eqn.outvars, out):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def onnx_friendly(fn):
    """``fn`` re-evaluated equation by equation with calls inlined and pools rewritten."""
    def rewritten(x):
        closed = jax.make_jaxpr(fn)(x)
        return _eval(closed.jaxpr, closed.consts, x)[0]
    return rewritten


def _primitives(jaxpr, found: set) -> set:
    for eqn in jaxpr.eqns:
        inner = _inner_jaxpr(eqn) if eqn.primitive.name in _CALLS else None
        if inner is not None:
            _primitives(inner[0], found)
        else:
            found.add(eqn.primitive.name)
    return found


def check_convertible(fn, spec, net, params, model_state) -> None:
    """Raises ``NotImplementedError`` naming each layer that uses a primitive jax2onnx lacks."""
    _, plugin_system = import_jax2onnx()
    plugin_system.import_all_plugins()  # the registry fills as the plugins are imported
    known = set(plugin_system.PLUGIN_REGISTRY)
    missing = _primitives(jax.make_jaxpr(fn)(spec).jaxpr, set()) - known
    if not missing:
        return
    rows: list = []
    with recording(rows):
        jax.eval_shape(lambda x: net.apply_with_state(params, model_state, x, batch_ndim=1), spec)
    culprits = []
    for path, layer, x_shape, _, layer_params in rows:
        dtype = jnp.int32 if layer.kind == "embedding" else spec.dtype
        try:
            x = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), x_shape,
                             is_leaf=lambda s: isinstance(s, tuple))
            used = _primitives(jax.make_jaxpr(
                lambda v: layer.forward(layer_params, {}, v, train=False, key=None))(x).jaxpr, set())
        except Exception:  # a layer needing state or several inputs: judged by the whole program
            continue
        if used & missing:
            culprits.append(f"{layer.kind} ({path}: {', '.join(sorted(used & missing))})")
    where = ("; the layers using them: " + ", ".join(culprits)) if culprits else ""
    raise NotImplementedError(
        f"export: ONNX cannot express these operations (jax2onnx has no conversion for "
        f"{', '.join(sorted(missing))}){where}; export format='stablehlo' instead")


def onnx_bytes(fn, spec, net, params, model_state, output_name: str) -> bytes:
    """The serialized ONNX model of ``fn`` for inputs like ``spec``, with a dynamic batch axis."""
    jax2onnx, _ = import_jax2onnx()
    check_convertible(fn, spec, net, params, model_state)
    with _quiet("onnx_ir"):  # its warnings about value types it leaves untyped are not the user's
        model = jax2onnx.to_onnx(onnx_friendly(fn), [jax.ShapeDtypeStruct(
            jax.export.symbolic_shape(", ".join(["batch", *map(str, spec.shape[1:])])), spec.dtype)],
            model_name="jaxnet", input_names=["x"], output_names=[output_name])
        return model.SerializeToString()


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Only errors from the named logger inside the block."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
