"""Per-example losses and gradients, and the clipping and noise of DP-SGD.

A gradient per example is ``jax.vmap`` of ``jax.grad`` over single examples: XLA computes all of
them in one batched program, as fast as a few ordinary gradient steps for small networks, and
they are what per-example clipping (differential privacy), influence and gradient-noise
studies need. The network runs in evaluation mode (no dropout; BatchNorm uses its running
statistics), so each example's gradient depends on that example only.

>>> grads = per_example_grads(net, params, x, y)          # grads["dense_1"]["w"]: (n, in, out)
>>> update = dp_aggregate(grads, max_norm=1.0, noise_multiplier=1.1, key=key)   # params-shaped
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jaxnet.nn.layer import Layer, Params, State, check_key, shape_str, state_or_empty
from jaxnet.nn.shapes import infer_example_ndim
from jaxnet.losses import check_per_example, softmax_cross_entropy

Loss = Callable[[jax.Array, jax.Array], jax.Array]


def _jit_when_eager(static_argnames: tuple[str, ...] = ()):
    """``jax.jit`` for eager calls (one compiled program rather than op-by-op dispatch), the
    plain function under an outer trace: there a nested jit is a call boundary that XLA does not
    fuse across (docs/performance.md, finding 11)."""
    def wrap(fn):
        jitted = jax.jit(fn, static_argnames=static_argnames)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
            return (fn if traced else jitted)(*args, **kwargs)

        return call

    return wrap


def _checked_state(what: str, net: Layer, params: Params, model_state: State | None, x, y) -> State:
    """Validates ``x`` (n, *example) against ``y`` (n, ...) and the network; returns the state."""
    model_state = state_or_empty(net, model_state, what)
    if jnp.ndim(x) == 0 or jnp.ndim(y) == 0:
        raise ValueError(f"{what}: x and y need a leading example axis; got x of shape "
                         f"{shape_str(jnp.shape(x))} and y of shape {shape_str(jnp.shape(y))}")
    if jnp.shape(x)[0] != jnp.shape(y)[0]:
        raise ValueError(f"{what}: x has {jnp.shape(x)[0]} examples (shape "
                         f"{shape_str(jnp.shape(x))}) but y has {jnp.shape(y)[0]} (shape "
                         f"{shape_str(jnp.shape(y))}); expected one label per example")
    x_spec = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    if infer_example_ndim(net, params, model_state, x_spec) > x_spec.ndim - 1:  # names bad shapes
        raise ValueError(f"{what}: x must be (n, *example); the network reads all of x, shape "
                         f"{shape_str(x_spec.shape)}, as a single example (pass x[None])")
    return model_state


def per_example_losses(net: Layer, params: Params, x: jax.Array, y: jax.Array, *,
                       loss: Loss = softmax_cross_entropy,
                       model_state: State | None = None) -> jax.Array:
    """The loss of every example, in one batched forward pass (evaluation mode).

    Args:
      net: the network.
      params: its parameters.
      x: ``(n, *example)`` inputs.
      y: ``(n, ...)`` targets: ``(n,)`` integer labels for the default loss.
      loss: ``loss(outputs (n, ...), y) -> (n,)``, e.g. from :mod:`jaxnet.losses`.
      model_state: the state of a stateful network (BatchNorm running statistics).

    Returns:
      ``(n,)`` losses in the network's output dtype (float32 for a float32 network).

    Raises:
      ValueError: ``x`` and ``y`` hold different numbers of examples, ``x`` is a single
        example, params that do not fit ``x`` (naming the shapes), or a loss that does not
        return one value per example.
    """
    model_state = _checked_state("per_example_losses", net, params, model_state, x, y)
    return _losses(params, model_state, x, y, net=net, loss=loss)


@_jit_when_eager(static_argnames=("net", "loss"))
def _losses(params, model_state, x, y, *, net: Layer, loss: Loss) -> jax.Array:
    outputs, _ = net.apply_with_state(params, model_state, x)
    return check_per_example(loss(outputs, y), x.shape[0], "per_example_losses")


def _example_loss(params, model_state, x, y, *, net: Layer, loss: Loss) -> jax.Array:
    """The scalar loss of one example ``x`` ``(*example)`` with target ``y``."""
    outputs, _ = net.apply_with_state(params, model_state, x[None], batch_ndim=1)  # a batch of one
    return check_per_example(loss(outputs, y[None]), 1, "per_example_grads")[0]


def per_example_value_and_grads(net: Layer, params: Params, x: jax.Array, y: jax.Array, *,
                                loss: Loss = softmax_cross_entropy,
                                model_state: State | None = None) -> tuple[jax.Array, Params]:
    """Every example's loss and its gradient with respect to ``params``.

    ``jax.vmap`` of ``jax.value_and_grad`` of the loss of a single example: one compiled,
    batched program (jit it with ``net`` and ``loss`` static for repeated use).

    Args:
      as for :func:`per_example_losses`.

    Returns:
      ``(losses, grads)``: ``losses`` ``(n,)``; ``grads`` a tree shaped like ``params`` with a
      leading ``(n,)`` axis on every leaf (``grads["dense_1"]["w"]``: ``(n, in, out)``), in
      the params' dtype. Averaging ``grads`` over the first axis gives the gradient of the mean
      loss.

    Raises:
      ValueError: as :func:`per_example_losses`. Integer labels out of range give NaN (they
        cannot be checked inside ``vmap``).
    """
    model_state = _checked_state("per_example_grads", net, params, model_state, x, y)
    return _value_and_grads(params, model_state, x, y, net=net, loss=loss)


@_jit_when_eager(static_argnames=("net", "loss"))
def _value_and_grads(params, model_state, x, y, *, net: Layer, loss: Loss):
    one = jax.value_and_grad(functools.partial(_example_loss, net=net, loss=loss))
    return jax.vmap(one, in_axes=(None, None, 0, 0))(params, model_state, x, y)


def per_example_grads(net: Layer, params: Params, x: jax.Array, y: jax.Array, *,
                      loss: Loss = softmax_cross_entropy,
                      model_state: State | None = None) -> Params:
    """Every example's gradient: :func:`per_example_value_and_grads` without the losses.

    Returns:
      A tree shaped like ``params`` with a leading ``(n,)`` axis on every leaf.
    """
    return per_example_value_and_grads(net, params, x, y, loss=loss, model_state=model_state)[1]


def _examples(what: str, grads: Params) -> tuple[list[jax.Array], int]:
    """The leaves of per-example ``grads`` and their common leading size ``n``."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    if not paths_leaves:
        raise ValueError(f"{what}: grads has no arrays")
    leading = {jax.tree_util.keystr(p): (jnp.shape(g)[:1] or ("none",))[0] for p, g in paths_leaves}
    if len(set(leading.values())) != 1 or "none" in leading.values():
        listed = ", ".join(f"{p or 'grads'}: {n}" for p, n in leading.items())
        raise ValueError(f"{what}: every leaf of grads needs the same leading example axis; "
                         f"leading sizes are {listed}")
    leaves = [g for _, g in paths_leaves]
    return leaves, jnp.shape(leaves[0])[0]


def _check_positive(what: str, name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, jax.core.Tracer):
        return  # traced inside jit: cannot be checked, used as given
    number = float(value)
    if not (number >= 0 if allow_zero else number > 0) or number == float("inf"):
        raise ValueError(f"{what}: {name} must be a finite number {'>=' if allow_zero else '>'} 0, "
                         f"got {value!r}")


def per_example_norms(grads: Params) -> jax.Array:
    """The global L2 norm of each example's gradient, over all leaves.

    Args:
      grads: per-example gradients, every leaf ``(n, ...)``.

    Returns:
      ``(n,)`` norms, in the dtype of the (first) leaf.
    """
    leaves, n = _examples("per_example_norms", grads)
    dtype = leaves[0].dtype
    squares = [jnp.sum(jnp.square(g.reshape(n, -1)), axis=1).astype(dtype) for g in leaves]
    return jnp.sqrt(functools.reduce(jnp.add, squares))


def clip_per_example(grads: Params, max_norm: float) -> Params:
    """Scales each example's gradient down to global L2 norm at most ``max_norm``.

    ``g_i * min(1, max_norm / ||g_i||)``: gradients already within the bound are unchanged,
    the others keep their direction.

    Args:
      grads: per-example gradients, every leaf ``(n, ...)``.
      max_norm: the bound, a number > 0.

    Returns:
      ``grads``'s shape and dtypes, each example's norm at most ``max_norm``.
    """
    _check_positive("clip_per_example", "max_norm", max_norm)
    _examples("clip_per_example", grads)
    return _clip(grads, max_norm)


@_jit_when_eager()
def _clip(grads: Params, max_norm) -> Params:
    norms = per_example_norms(grads)  # (n,)
    scale = max_norm / jnp.maximum(norms, max_norm)  # min(1, C / norm), never 0 / 0
    return jax.tree.map(lambda g: g * scale.reshape(scale.shape + (1,) * (g.ndim - 1)).astype(g.dtype),
                        grads)


def dp_aggregate(grads: Params, *, max_norm: float, noise_multiplier: float,
                 key: jax.Array) -> Params:
    """The DP-SGD gradient: per-example clipping, sum, Gaussian noise, mean.

    ``(sum_i clip(g_i, C) + N(0, (noise_multiplier * C)^2 I)) / n`` (Abadi et al., 2016), with
    ``C = max_norm``. With ``noise_multiplier=0`` it is the mean of the clipped gradients. The
    privacy guarantee (epsilon, delta) follows from ``noise_multiplier``, the sampling rate and
    the number of steps through a privacy accountant, which jaxnet does not include.

    Args:
      grads: per-example gradients, every leaf ``(n, ...)``.
      max_norm: the clipping bound ``C`` > 0.
      noise_multiplier: the noise's standard deviation in units of ``C``, >= 0.
      key: a PRNG key for the noise (one draw per leaf, from ``jax.random.split``).

    Returns:
      A tree shaped like one example's gradient (no leading axis), in the grads' dtypes.
    """
    _check_positive("dp_aggregate", "noise_multiplier", noise_multiplier, allow_zero=True)
    _check_positive("dp_aggregate", "max_norm", max_norm)
    _examples("dp_aggregate", grads)
    return _dp_aggregate(grads, max_norm, noise_multiplier, check_key(key))


@_jit_when_eager()
def _dp_aggregate(grads: Params, max_norm, noise_multiplier, key) -> Params:
    clipped = _clip(grads, max_norm)
    leaves, n = _examples("dp_aggregate", clipped)
    treedef = jax.tree.structure(clipped)
    keys = jax.random.split(key, len(leaves))
    std = noise_multiplier * max_norm
    noisy = [(jnp.sum(g, axis=0) + std * jax.random.normal(k, g.shape[1:], g.dtype)) / n
             for g, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)
