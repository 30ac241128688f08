"""One training step: the ``TrainState`` pytree, ``train_batch`` and the jitted, donating step.

Randomness is a pure function of ``(state.key, step)``: step ``s`` drops out with
``fold_in(fold_in(key, 1), s)`` (and ``fit`` shuffles epoch ``e`` with ``fold_in(fold_in(key, 0),
e)``), so a run restarted from any saved state replays exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxnet._xla import options as xla_options
from jaxnet.losses import check_per_example, softmax_cross_entropy
from jaxnet.nn.layer import Layer, Params, State, state_or_empty
from jaxnet.precision import Policy, apply_with_policy, get_training_policy
from jaxnet.train.engine import Metric, Sums, batch_sums

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


class TrainState(NamedTuple):
    """Everything that changes during training; a pytree.

    Attributes:
      params: the network's parameters.
      model_state: the network's state (BatchNorm statistics); ``{}`` when it has none.
      opt_state: the optimizer's state.
      step: int32 scalar, the number of batches trained on.
      key: the run's PRNG key; never advanced (randomness is derived from it and ``step``).
    """

    params: Params
    model_state: State
    opt_state: optax.OptState
    step: jax.Array
    key: jax.Array


def init_train_state(net: Layer, optimizer: optax.GradientTransformation, params: Params, *,
                     model_state: State | None = None, key: jax.Array | None = None) -> TrainState:
    """A fresh ``TrainState`` at step 0.

    Args:
      net: the network.
      optimizer: any optax ``GradientTransformation`` (schedules, ``inject_hyperparams`` included).
      params: from ``net.init``.
      model_state: from ``net.init_with_state``; required when the network has state.
      key: the run's PRNG key (shuffling, dropout); default ``jax.random.key(0)``.

    ``params``, ``model_state`` and ``key`` are copied, so that a donating step never deletes
    arrays the caller still holds.
    """
    model_state = state_or_empty(net, model_state, "init_train_state")
    # copies: the step donates them, the caller keeps theirs
    params, model_state = jax.tree.map(jnp.copy, (params, model_state))
    with jax.numpy_dtype_promotion("standard"):  # see train_batch
        opt_state = optimizer.init(params)
    return TrainState(params, model_state, opt_state, jnp.zeros((), jnp.int32),
                      jax.random.key(0) if key is None else jnp.copy(key))


ON_NAN = ("stop", "skip")


def train_batch(net: Layer, optimizer: optax.GradientTransformation, loss: LossFn,
                state: TrainState, x: jax.Array, y: jax.Array,
                weights: jax.Array | None = None, on_nan: str = "stop",
                drop_rate: jax.Array | None = None,
                precision: str | Policy | None = None,
                metrics: Mapping[str, Metric] | None = None) -> tuple[TrainState, Sums]:
    """One optimizer step on one batch (traceable; not jitted by itself).

    Args:
      x: ``(batch, *example)``; y: ``(batch, ...)`` targets.
      weights: optional ``(batch,)`` float32 example weights (0 for padding); the loss is the
        weighted mean.
      on_nan: ``"stop"`` updates whatever the loss (``fit`` checks each epoch's loss);
        ``"skip"`` keeps params, model and optimizer state unchanged when the batch's loss is
        NaN or infinite (the step still counts), leaves the batch out of the sums and counts
        it in ``Sums.skipped``. Only ``"skip"`` compiles the check in.
      drop_rate: optional float32 scalar replacing the network's dropout rates (see
        ``Layer.apply_with_state``); population training passes one per member.
      precision: ``None`` (no casts), ``"f32"``, ``"bf16"`` or a ``jaxnet.precision.Policy``:
        the forward pass runs in the policy's compute dtype, the loss on float32 logits, and
        the gradients and updates of the float32 params stay float32.
      metrics: ``{name: fn(outputs, y) -> (batch,)}`` summed into ``Sums.extra``.

    The optimizer's ``update`` also receives ``value=`` the batch's mean loss, which optax
    transformations such as ``optax.contrib.reduce_on_plateau`` need and the others ignore.
    """
    policy = get_training_policy(precision, "train_batch")
    step_key = jax.random.fold_in(jax.random.fold_in(state.key, 1), state.step) if net.needs_key else None

    def objective(params):
        logits, model_state = apply_with_policy(net, policy, params, state.model_state, x,
                                                key=step_key, train=True, drop_rate=drop_rate,
                                                reverse_only=True, batch_ndim=1)
        losses = check_per_example(loss(logits, y), jax.tree.leaves(x)[0].shape[0], "train_batch")
        if weights is None:
            mean = jnp.mean(losses)
        else:
            mean = jnp.sum(weights * losses) / jnp.maximum(jnp.sum(weights), 1.0)
        return mean, (model_state, logits, losses)

    (mean, (model_state, logits, losses)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    # optax mixes Python floats and int32 step counts; keep it working for users who trace
    # their own code with jax_numpy_dtype_promotion="strict".
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optax.with_extra_args_support(optimizer).update(
            grads, state.opt_state, state.params, value=mean)
        params = optax.apply_updates(state.params, updates)
    sums = batch_sums(logits, y, losses, weights, metrics)
    trained = (params, model_state, opt_state)
    if on_nan == "skip":
        finite = jnp.isfinite(mean)
        trained = jax.tree.map(lambda new, old: jnp.where(finite, new, old), trained,
                               (state.params, state.model_state, state.opt_state))
        kept = jax.tree.map(lambda s: jnp.where(finite, s, 0.0), sums)
        sums = kept._replace(skipped=1.0 - finite.astype(jnp.float32))
    return TrainState(*trained, state.step + 1, state.key), sums


def make_train_step(net: Layer, optimizer: optax.GradientTransformation,
                    loss: LossFn = softmax_cross_entropy, *,
                    precision: str | Policy | None = None) -> TrainStep:
    """A jitted ``step(state, x, y) -> (state, metrics)`` that donates ``state``'s buffers.

    ``metrics`` is a :class:`StepMetrics`, ``{"loss": mean loss, "accuracy": fraction correct}``
    (float32 scalars on the device; reading them synchronises, so read them rarely).
    ``precision``: see :func:`train_batch`.
    """
    get_training_policy(precision, "make_train_step")  # an unknown name fails here, not at the first step

    def step(trained, step, key, x, y):
        state, sums = train_batch(net, optimizer, loss, TrainState(*trained, step, key), x, y,
                                  precision=precision)
        metrics = jnp.stack([sums.loss, sums.correct]) / sums.count  # order of StepMetrics.NAMES
        return (state.params, state.model_state, state.opt_state), state.step, metrics

    return TrainStep(xla_options.jit(step, donate_argnums=(0, 1)), net.needs_key)


class TrainStep:
    """``step(state, x, y) -> (state, metrics)``, from :func:`make_train_step`.

    The compiled program takes the state's params, model state, optimizer state and step (all
    donated) and its key only when the network draws random numbers (dropout); the returned
    state keeps the same key: passing a typed PRNG key in and out of a jitted call costs CPU
    dispatch time comparable to a small MLP's whole step (docs/performance.md, finding 6).
    ``lower(state, x, y)`` lowers the program for inspection, as ``jax.jit``'s does.
    """

    def __init__(self, jitted, needs_key: bool):
        self._jitted, self._needs_key = jitted, needs_key

    def _arguments(self, state: TrainState, x, y) -> tuple:
        return ((state.params, state.model_state, state.opt_state), state.step,
                state.key if self._needs_key else None, x, y)

    def __call__(self, state: TrainState, x, y) -> tuple[TrainState, StepMetrics]:
        trained, step, metrics = self._jitted(*self._arguments(state, x, y))
        return TrainState(*trained, step, state.key), StepMetrics(metrics)

    def lower(self, state: TrainState, x, y):
        return self._jitted.lower(*self._arguments(state, x, y))


class StepMetrics(Mapping):
    """A train step's ``{"loss": ..., "accuracy": ...}``: float32 scalars on the device.

    Held as one ``(2,)`` float32 array, :attr:`values` (in the order of :data:`NAMES`): one output
    of the compiled step rather than two, since each output adds dispatch time that matters for a
    small MLP's step (docs/performance.md, finding 6). ``metrics["loss"]`` slices it on the
    device.
    """

    NAMES = ("loss", "accuracy")
    _INDEX = {name: i for i, name in enumerate(NAMES)}

    def __init__(self, values: jax.Array):
        self.values = values

    def __getitem__(self, name: str) -> jax.Array:
        return self.values[self._INDEX[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.NAMES)

    def __len__(self) -> int:
        return len(self.NAMES)

    def __repr__(self) -> str:
        return f"StepMetrics({dict(self)})"
