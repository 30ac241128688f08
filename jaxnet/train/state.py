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

from jax.sharding import Mesh

import jaxnet.data_parallel as data_parallel
import jaxnet.sharding as sharding
from jaxnet._xla import options as xla_options
from jaxnet.augment import Augment
from jaxnet.losses import (MODEL_STATE, Batch, ModelLoss, check_model_loss, check_per_example,
                           is_model_loss, softmax_cross_entropy)
from jaxnet.nn.layer import Layer, Params, State, state_or_empty
from jaxnet.precision import Policy, apply_with_policy, get_policy, get_training_policy
from jaxnet.train.engine import Metric, Sums, batch_sums

LossFn = Callable[[jax.Array, jax.Array], jax.Array] | ModelLoss


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


def init_sharded(net: Layer, optimizer: optax.GradientTransformation, key: jax.Array, x,
                 mesh: Mesh, rules=None, *,
                 run_key: jax.Array | None = None) -> tuple[TrainState, object]:
    """A fresh ``TrainState`` created sharded: no device ever holds a whole param.

    The params are initialised inside one program compiled with the state's shardings as its
    outputs, so each device computes and keeps only its shards (a model larger than one
    device can start). With JAX's partitionable ``threefry`` (the default) the values equal
    ``net.init_with_state(key, x)`` on one device.

    Args:
      net, optimizer: the network and optax optimizer.
      key: the initialisation key (as for ``net.init``).
      x: an example batch, its shape's ``jax.ShapeDtypeStruct``, or a pytree of them.
      mesh, rules: as for :func:`jaxnet.sharding.param_specs`.
      run_key: the run's PRNG key (dropout, shuffling); default ``jax.random.key(0)``.

    Returns:
      ``(state, specs)``: the sharded ``TrainState`` and the params' ``PartitionSpec`` tree.
    """
    x = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), x)

    def build(key, run_key):
        params, model_state = net.init_with_state(key, x)
        return init_train_state(net, optimizer, params, model_state=model_state, key=run_key)

    run_key = jax.random.key(0) if run_key is None else run_key
    abstract = jax.eval_shape(build, key, run_key)
    specs = sharding.param_specs(abstract.params, mesh, rules)
    state = jax.jit(build, out_shardings=sharding.state_shardings(abstract, mesh, specs))(key, run_key)
    return state, specs


ON_NAN = ("stop", "skip")


def _usable(trained) -> jax.Array:
    """Whether an updated ``(params, model_state, opt_state)`` may be kept, as a traced bool:
    params and model state all finite, the optimizer state free of NaN (an optimizer may hold
    an infinity on purpose: optax's ``reduce_on_plateau`` starts its best value at inf). The
    rule of :func:`jaxnet.checkpoint.non_finite_leaves`, which guards every checkpoint."""
    params, model_state, opt_state = trained
    floating = lambda tree: [x for x in jax.tree.leaves(tree)  # noqa: E731
                             if jnp.issubdtype(x.dtype, jnp.inexact)]
    checks = ([jnp.isfinite(x).all() for x in floating((params, model_state))]
              + [~jnp.isnan(x).any() for x in floating(opt_state)])
    return jnp.stack(checks).all() if checks else jnp.bool_(True)


def train_batch(net: Layer, optimizer: optax.GradientTransformation, loss: LossFn,
                state: TrainState, x, y, weights: jax.Array | None = None, on_nan: str = "stop",
                drop_rate: jax.Array | None = None,
                precision: str | Policy | None = None,
                metrics: Mapping[str, Metric] | None = None,
                augment: Augment | None = None) -> tuple[TrainState, Sums]:
    """One optimizer step on one batch (traceable; not jitted by itself).

    Args:
      loss: a per-example loss ``(outputs, y) -> (batch,)``, or a model loss
        (:func:`jaxnet.losses.model_loss`) ``(params, model_state, batch, key) -> (loss, aux)``,
        which gets a :class:`jaxnet.losses.Batch` with ``weights`` and ``train=True``, and the
        key ``fold_in(fold_in(state.key, 1), state.step)``; its aux scalars are summed into
        ``Sums.extra``.
      x: ``(batch, *example)``, or a pytree of such arrays (a dict of tokens and a mask);
        y: ``(batch, ...)`` targets, or a pytree of them.
      weights: optional ``(batch,)`` float32 example weights (0 for padding); the loss is the
        weighted mean.
      on_nan: ``"stop"`` updates whatever the loss (``fit`` checks each epoch's loss);
        ``"skip"`` keeps params, model and optimizer state unchanged when the batch's loss is
        NaN or infinite or the update would make them so (params or model state not finite,
        a NaN in the optimizer state), the step still counting, leaves the batch out of the
        sums and counts it in ``Sums.skipped``. Only ``"skip"`` compiles the check in.
      drop_rate: optional float32 scalar replacing the network's dropout rates (see
        ``Layer.apply_with_state``); population training passes one per member. Not with a
        model loss.
      precision: ``None`` (no casts), ``"f32"``, ``"bf16"`` or a ``jaxnet.precision.Policy``:
        the forward pass runs in the policy's compute dtype, the loss on float32 logits, and
        the gradients and updates of the float32 params stay float32. A model loss applies the
        network itself: only ``None`` and ``"f32"``.
      metrics: ``{name: fn(outputs, y) -> (batch,)}`` summed into ``Sums.extra`` (not with a
        model loss: it reports its own in aux).
      augment: ``augment(key, x) -> x`` (:mod:`jaxnet.augment`) applied to the batch's
        inputs first, with the key ``fold_in(fold_in(state.key, 3), state.step)``: a new draw
        every step, the same in a resumed run.

    The optimizer's ``update`` also receives ``value=`` the batch's mean loss, which optax
    transformations such as ``optax.contrib.reduce_on_plateau`` need and the others ignore.
    """
    policy = get_training_policy(precision, "train_batch")
    if augment is not None:
        x = augment(jax.random.fold_in(jax.random.fold_in(state.key, 3), state.step), x)
    if is_model_loss(loss):
        check_model_loss_options(policy, drop_rate, metrics, "train_batch")
        key = jax.random.fold_in(jax.random.fold_in(state.key, 1), state.step)
        batch = Batch(x, y, _weights_or_ones(weights, x), True)
        (mean, (model_state, aux)), grads = jax.value_and_grad(
            lambda params: apply_model_loss(net, loss, params, state.model_state, batch, key,
                                            "train_batch"), has_aux=True)(state.params)
        return _update(optimizer, state, grads, mean, model_state,
                       model_loss_sums(mean, aux, batch.weights), on_nan)
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
    return _update(optimizer, state, grads, mean, model_state,
                   batch_sums(logits, y, losses, weights, metrics), on_nan)


def _update(optimizer, state: TrainState, grads, mean, model_state, sums: Sums,
            on_nan: str) -> tuple[TrainState, Sums]:
    """The optimizer's step from ``grads``; with ``on_nan="skip"``, none for a non-finite loss."""
    # optax mixes Python floats and int32 step counts; keep it working for users who trace
    # their own code with jax_numpy_dtype_promotion="strict".
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optax.with_extra_args_support(optimizer).update(
            grads, state.opt_state, state.params, value=mean)
        params = optax.apply_updates(state.params, updates)
    trained = (params, model_state, opt_state)
    if on_nan == "skip":  # a finite loss can still give non-finite params (an inf update)
        finite = jnp.isfinite(mean) & _usable(trained)
        trained = jax.tree.map(lambda new, old: jnp.where(finite, new, old), trained,
                               (state.params, state.model_state, state.opt_state))
        kept = jax.tree.map(lambda s: jnp.where(finite, s, 0.0), sums)
        sums = kept._replace(skipped=1.0 - finite.astype(jnp.float32))
    return TrainState(*trained, state.step + 1, state.key), sums


# ---- model losses (jaxnet.losses.model_loss) -----------------------------------------------

def check_model_loss_options(policy: Policy | None, drop_rate, metrics, where: str) -> None:
    """Refuses what cannot reach a model loss: a precision policy that casts, a population's
    dropout rates, metrics of the outputs (each with a ``ValueError`` saying why)."""
    if policy is not None and policy != Policy():
        raise ValueError(f"{where}: precision {policy.name} cannot reach a model loss, which "
                         "applies the network itself; pass precision=None and cast inside it "
                         "(jaxnet.precision.apply_with_policy)")
    if drop_rate is not None:
        raise ValueError(f"{where}: a population's dropout rates cannot reach a model loss, "
                         "which applies the network itself; train members without drop_rate")
    if metrics:
        raise ValueError(f"{where}: metrics ({', '.join(metrics)}) are functions of the "
                         "network's outputs, which a model loss does not return; report them "
                         "in its aux dict")


def _weights_or_ones(weights, x) -> jax.Array:
    if weights is not None:
        return weights
    return jnp.ones((jax.tree.leaves(x)[0].shape[0],), jnp.float32)


def apply_model_loss(net: Layer, loss: ModelLoss, params: Params, model_state: State,
                     batch: Batch, key, where: str):
    """``loss(params, model_state, batch, key)`` checked: ``(mean, (new model state, aux
    scalars))``; in evaluation (``batch.train`` false) the state comes back unchanged."""
    mean, aux, new_state = check_model_loss(loss(params, model_state, batch, key), where)
    if not batch.train:
        return mean, (model_state, aux)
    if new_state is None:
        if net.has_state:
            raise ValueError(f"{where}: the network has state (BatchNorm statistics); a model "
                             f"loss must return its new state as aux[{MODEL_STATE!r}] (from "
                             "net.apply_with_state)")
        return mean, (model_state, aux)
    if jax.tree.structure(new_state) != jax.tree.structure(model_state):
        raise ValueError(f"{where}: aux[{MODEL_STATE!r}] must be the network's state tree "
                         f"{jax.tree.structure(model_state)}, got {jax.tree.structure(new_state)}")
    return mean, (new_state, aux)


def model_loss_sums(mean: jax.Array, aux: Mapping[str, jax.Array], weights: jax.Array) -> Sums:
    """A model loss's batch mean and aux scalars as sums over its real examples (weights)."""
    count = jnp.sum(weights)
    return Sums(mean * count, jnp.zeros((), jnp.float32), count,
                extra={name: value * count for name, value in aux.items()} or None)


def evaluate_batch(net: Layer, loss: LossFn, params: Params, model_state: State, x, y,
                   weights: jax.Array | None = None, *, precision: str | Policy | None = None,
                   metrics: Mapping[str, Metric] | None = None) -> Sums:
    """One batch's sums in evaluation mode (traceable), for either form of ``loss``.

    Args:
      x, y: a batch, ``(batch, ...)`` arrays or pytrees of them; weights: ``(batch,)`` float32
        (0 for padding), or ``None`` for all 1.
      precision, metrics: as for :func:`train_batch`.
    """
    rows = jax.tree.leaves(x)[0].shape[0]
    if is_model_loss(loss):
        check_model_loss_options(get_policy(precision), None, metrics, "evaluate")
        weights = _weights_or_ones(weights, x)
        mean, (_, aux) = apply_model_loss(net, loss, params, model_state,
                                          Batch(x, y, weights, False), None, "evaluate")
        return model_loss_sums(mean, aux, weights)
    logits, _ = apply_with_policy(net, get_policy(precision), params, model_state, x, batch_ndim=1)
    losses = check_per_example(loss(logits, y), rows, "evaluate")
    return batch_sums(logits, y, losses, weights, metrics)


def metric_names(net: Layer, loss: LossFn, metrics: Mapping[str, Metric] | None, params: Params,
                 model_state: State, x, y, train: bool) -> tuple[str, ...]:
    """The names of ``Sums.extra``: ``metrics``' for a per-example loss, a model loss's aux
    names for a batch like ``(x, y)`` (arrays or shape specs; nothing computed)."""
    if not is_model_loss(loss):
        return tuple(metrics or ())
    where = "fit" if train else "evaluate"
    check_model_loss_options(None, None, metrics, where)
    key = jax.random.key(0) if train else None
    one = lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype)  # noqa: E731
    aux = jax.eval_shape(
        lambda p, s, xb, yb, w: apply_model_loss(net, loss, p, s, Batch(xb, yb, w, train), key,
                                                 where)[1][1],
        params, model_state, jax.tree.map(one, x), jax.tree.map(one, y),
        jax.ShapeDtypeStruct((1,), jnp.float32))
    return tuple(aux)


def make_train_step(net: Layer, optimizer: optax.GradientTransformation,
                    loss: LossFn = softmax_cross_entropy, *,
                    precision: str | Policy | None = None, mesh: Mesh | None = None,
                    rules=None) -> TrainStep:
    """A jitted ``step(state, x, y) -> (state, metrics)`` that donates ``state``'s buffers.

    ``metrics`` is a :class:`StepMetrics`, ``{"loss": mean loss, "accuracy": fraction correct}``
    (float32 scalars on the device; reading them synchronises, so read them rarely); with a
    model loss (:func:`jaxnet.losses.model_loss`), ``{"loss": ..., **aux scalars}``. ``x`` and
    ``y`` may be pytrees of ``(batch, ...)`` arrays. ``precision``: see :func:`train_batch`.

    ``mesh`` (:func:`jaxnet.sharding.make_mesh` or a ``data_mesh``) and ``rules``
    (:class:`jaxnet.sharding.ShardingRules`, default jaxnet's): the step runs sharded. A state
    whose every array is already placed on ``mesh`` (from :func:`init_sharded`, a restored
    sharded checkpoint or an earlier step) keeps its layout; any other state is first placed
    with its params laid out by ``rules`` (:func:`jaxnet.sharding.param_specs`), the optimizer
    state following them, and the caller's arrays are then not donated. Each batch is split by
    rows over ``data`` and ``fsdp`` (``batch`` must be a multiple of their product); host
    arrays must hold the whole batch on every process. XLA inserts the collectives.
    """
    if rules is not None and mesh is None:
        raise ValueError("make_train_step: rules lay the params out over a mesh; pass mesh too")
    get_training_policy(precision, "make_train_step")  # an unknown name fails here, not at the first step
    model = is_model_loss(loss)
    index = {} if model else StepMetrics.INDEX  # a model loss's names are known once traced

    def step(trained, step, key, x, y):
        state, sums = train_batch(net, optimizer, loss, TrainState(*trained, step, key), x, y,
                                  precision=precision)
        if model:
            extra = sums.extra or {}
            index.clear()
            index.update({name: i for i, name in enumerate(("loss", *extra))})
            metrics = jnp.stack([sums.loss, *extra.values()]) / sums.count
        else:
            metrics = jnp.stack([sums.loss, sums.correct]) / sums.count  # order of StepMetrics.NAMES
        return (state.params, state.model_state, state.opt_state), state.step, metrics

    return TrainStep(step, net.needs_key or model, index, mesh, rules)


class TrainStep:
    """``step(state, x, y) -> (state, metrics)``, from :func:`make_train_step`.

    The compiled program takes the state's params, model state, optimizer state and step (all
    donated) and its key only when the network draws random numbers (dropout) or the loss is a
    model loss; the returned state keeps the same key: passing a typed PRNG key in and out of a
    jitted call costs CPU dispatch time comparable to a small MLP's whole step
    (docs/performance.md, finding 6). ``lower(state, x, y)`` lowers the program for
    inspection, as ``jax.jit``'s does.
    """

    def __init__(self, step: Callable, needs_key: bool, index: Mapping[str, int],
                 mesh: Mesh | None = None, rules=None):
        self._step, self._needs_key, self._index = step, needs_key, index
        self._mesh, self._rules = mesh, rules
        self._programs: dict = {}  # by the state's layout (one, without a mesh)

    def _placed(self, state: TrainState, x, y) -> tuple[TrainState, object, object]:
        """Without a mesh, as given; with one, the state laid out on it and the batch split."""
        if self._mesh is None:
            return state, x, y
        mesh = self._mesh
        if not sharding.placed_on(state, mesh):
            state = sharding.shard_state(state, mesh,
                                         sharding.param_specs(state.params, mesh, self._rules))
        data_parallel.check_batch_size(mesh, jax.tree.leaves(x)[0].shape[0],
                                       "make_train_step: batch")
        rows = data_parallel.row_sharding(mesh)
        x, y = (tree if all(isinstance(a, jax.Array) and a.sharding == rows
                            for a in jax.tree.leaves(tree)) else sharding.shard_batch(mesh, tree)
                for tree in (x, y))
        return state, x, y

    def _program(self, state: TrainState, arguments: tuple):
        """The jitted step for ``state``'s layout (its outputs keep that layout), with dots left
        to Eigen when the step's are large (``jaxnet._xla.options.has_large_dots``), as the
        first ``arguments`` decide."""
        layout = None if self._mesh is None else jax.tree.map(lambda a: a.sharding, state)
        key = None if layout is None else (jax.tree.structure(layout), *jax.tree.leaves(layout))
        if key not in self._programs:
            shardings = {} if layout is None else {"out_shardings": (
                (layout.params, layout.model_state, layout.opt_state),
                data_parallel.replicated(self._mesh), data_parallel.replicated(self._mesh))}
            program = xla_options.jit(self._step, donate_argnums=(0, 1), **shardings)
            if xla_options.has_large_dots(program.trace(*arguments).jaxpr):
                program = xla_options.jit(self._step, eigen_dots=True, donate_argnums=(0, 1),
                                          **shardings)
            self._programs[key] = program
        return self._programs[key]

    def _arguments(self, state: TrainState, x, y) -> tuple:
        return ((state.params, state.model_state, state.opt_state), state.step,
                state.key if self._needs_key else None, x, y)

    def __call__(self, state: TrainState, x, y) -> tuple[TrainState, StepMetrics]:
        state, x, y = self._placed(state, x, y)
        arguments = self._arguments(state, x, y)
        trained, step, metrics = self._program(state, arguments)(*arguments)
        return TrainState(*trained, step, state.key), StepMetrics(metrics, self._index)

    def lower(self, state: TrainState, x, y):
        state, x, y = self._placed(state, x, y)
        arguments = self._arguments(state, x, y)
        return self._program(state, arguments).lower(*arguments)


class StepMetrics(Mapping):
    """A train step's ``{"loss": ..., "accuracy": ...}`` (a model loss's: ``{"loss": ...,
    **aux}``): float32 scalars on the device.

    Held as one float32 array, :attr:`values` (in the order of ``index``, by default
    :data:`NAMES`): one output of the compiled step rather than several, since each output adds
    dispatch time that matters for a small MLP's step (docs/performance.md, finding 6).
    ``metrics["loss"]`` slices it on the device.
    """

    NAMES = ("loss", "accuracy")
    INDEX = {name: i for i, name in enumerate(NAMES)}

    def __init__(self, values: jax.Array, index: Mapping[str, int] = INDEX):
        self.values, self._index = values, index

    def __getitem__(self, name: str) -> jax.Array:
        return self.values[self._index[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"StepMetrics({dict(self)})"
