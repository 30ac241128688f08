"""Training: a ``TrainState`` pytree, a jitted train step, and ``fit`` with the loop on the device.

``fit`` compiles one program per epoch: a ``lax.scan`` over the epoch's batches with the data
resident on the device, shuffled there with ``jax.random``, metrics summed there. The last partial
batch is filled with other (real) examples that carry weight zero, so every batch has one static
shape and nothing recompiles. Randomness is a pure function of ``(state.key, step)``: epoch ``e``
is shuffled with ``fold_in(fold_in(key, 0), e)`` and step ``s`` drops out with
``fold_in(fold_in(key, 1), s)``, so a run restarted from any saved state replays exactly.
A NaN or infinite loss stops training after its epoch, or, with ``on_nan="skip"``, the update
of each such batch is skipped inside the compiled step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet._xla import options as xla_options
from jaxnet.nn.layer import Layer, Params, State
from jaxnet.losses import check_labels, softmax_cross_entropy
from jaxnet.metrics import is_argmax
from jaxnet.precision import (Policy, apply_with_policy, check_params, get_policy,
                              get_training_policy)

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


class Sums(NamedTuple):
    """Metric sums over examples (float32 scalars), accumulated on the device."""

    loss: jax.Array
    correct: jax.Array
    count: jax.Array
    skipped: jax.Array | None = None  # batches skipped for a non-finite loss (on_nan="skip" only)

    @staticmethod
    def zeros(count_skipped: bool = False) -> Sums:
        zero = lambda: jnp.zeros((), jnp.float32)
        return Sums(zero(), zero(), zero(), zero() if count_skipped else None)

    def __add__(self, other: Sums) -> Sums:  # None fields stay None: no work when not counted
        return jax.tree.map(jnp.add, self, other)

    def means(self) -> dict[str, float]:
        count = max(float(self.count), 1.0)
        return {"loss": float(self.loss) / count, "accuracy": float(self.correct) / count}


def init_train_state(net: Layer, optimizer: optax.GradientTransformation, params: Params, *,
                     model_state: State | None = None, key: jax.Array | None = None) -> TrainState:
    """A fresh ``TrainState`` at step 0.

    Args:
      net: the network.
      optimizer: any optax ``GradientTransformation`` (schedules, ``inject_hyperparams`` included).
      params: from ``net.init``.
      model_state: from ``net.init_with_state``; required when the network has state.
      key: the run's PRNG key (shuffling, dropout); default ``jax.random.key(0)``.
    """
    if model_state is None:
        if net.has_state:
            raise ValueError("init_train_state: this network keeps state (e.g. BatchNorm): pass "
                             "model_state from net.init_with_state(key, x)")
        model_state = {}
    with jax.numpy_dtype_promotion("standard"):  # see train_batch
        opt_state = optimizer.init(params)
    return TrainState(params, model_state, opt_state, jnp.zeros((), jnp.int32),
                      jax.random.key(0) if key is None else key)


def _is_classification(logits: jax.Array, labels: jax.Array) -> bool:
    return (jnp.issubdtype(labels.dtype, jnp.integer) and logits.ndim == labels.ndim + 1)


def batch_sums(logits: jax.Array, labels: jax.Array, losses: jax.Array,
               weights: jax.Array | None) -> Sums:
    """Weighted sums of loss and correct predictions for one batch."""
    if weights is None:
        weights = jnp.ones(losses.shape, jnp.float32)
    correct = is_argmax(logits, labels).astype(jnp.float32) if _is_classification(
        logits, labels) else jnp.zeros(losses.shape, jnp.float32)
    return Sums(jnp.sum(weights * losses.astype(jnp.float32)), jnp.sum(weights * correct),
                jnp.sum(weights))


ON_NAN = ("stop", "skip")


def train_batch(net: Layer, optimizer: optax.GradientTransformation, loss: LossFn,
                state: TrainState, x: jax.Array, y: jax.Array,
                weights: jax.Array | None = None, on_nan: str = "stop",
                drop_rate: jax.Array | None = None,
                precision: str | Policy | None = None) -> tuple[TrainState, Sums]:
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
    """
    policy = get_training_policy(precision, "train_batch")
    step_key = jax.random.fold_in(jax.random.fold_in(state.key, 1), state.step) if net.needs_key else None

    def objective(params):
        logits, model_state = apply_with_policy(net, policy, params, state.model_state, x,
                                                key=step_key, train=True, drop_rate=drop_rate,
                                                reverse_only=True)
        losses = loss(logits, y)
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
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    sums = batch_sums(logits, y, losses, weights)
    trained = (params, model_state, opt_state)
    if on_nan == "skip":
        finite = jnp.isfinite(mean)
        trained = jax.tree.map(lambda new, old: jnp.where(finite, new, old), trained,
                               (state.params, state.model_state, state.opt_state))
        sums = Sums(*(jnp.where(finite, s, 0.0) for s in sums[:3]),
                    skipped=1.0 - finite.astype(jnp.float32))
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
    state keeps the same key. Passing a typed PRNG key in and out of a jitted call costs ~5-8 us
    of dispatch on CPU, as much as a whole step of a small MLP (docs/performance.md).
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
    of the compiled step rather than two, ~2 us less per call, which is a tenth of a small MLP's
    step (docs/performance.md, finding 6). ``metrics["loss"]`` slices it on the device.
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


def shuffled_order(key: jax.Array, n: int) -> jax.Array:
    """A random permutation of ``arange(n)`` (int32), drawn on the device with one sort.

    ``jax.random.permutation`` sorts several times; XLA:CPU's sort is slow (~6 ms for 32,000
    elements), and for small networks that doubled an epoch's time. One sort by random 32-bit
    keys is uniform except that the rare equal keys keep their index order.
    """
    keys = jax.random.bits(key, (n,), jnp.uint32)
    return jax.lax.platform_dependent(keys, cpu=_sort_packed, default=_sort_key_val)


def _sort_key_val(keys: jax.Array) -> jax.Array:
    return jax.lax.sort_key_val(keys, jnp.arange(keys.shape[0], dtype=jnp.int32))[1]


def _sort_packed(keys: jax.Array) -> jax.Array:
    """The same permutation as :func:`_sort_key_val`, from one sort of ``key << 32 | index`` as
    uint64: XLA:CPU sorts one array of numbers ~5x faster than keys with a payload (1.6 against
    9.4 ms for 32,000), which was a third of a small MLP's epoch."""
    with jax.enable_x64(True):
        packed = keys.astype(jnp.uint64) << 32 | jnp.arange(keys.shape[0], dtype=jnp.uint64)
        return (jax.lax.sort(packed) & 0xFFFFFFFF).astype(jnp.int32)


def _padded_batches(n: int, batch_size: int) -> tuple[int, np.ndarray | None]:
    """Number of batches and, when the last one is partial, the ``(batches, batch_size)`` weights."""
    num_batches = max(math.ceil(n / batch_size), 1)
    if n % batch_size == 0:
        return num_batches, None
    return num_batches, (np.arange(num_batches * batch_size) < n).astype(np.float32).reshape(
        num_batches, batch_size)


def _batch_indices(order, num_batches: int, batch_size: int, numpy=jnp):
    """``order`` cut into ``(num_batches, batch_size)``, the last batch topped up from the start."""
    return numpy.resize(order, (num_batches * batch_size,)).reshape(num_batches, batch_size)


def make_epoch(net: Layer, optimizer: optax.GradientTransformation, loss: LossFn, n: int,
               batch_size: int, progress: Callable | None = None, progress_every: int = 0,
               on_nan: str = "stop", precision: str | Policy | None = None,
               batch_sharding: jax.sharding.Sharding | None = None):
    """A function ``epoch(state, x, y, epoch_index) -> (state, Sums)`` training one shuffled epoch.

    It is meant to be jitted whole (``fit`` does so, donating ``state``). When ``progress`` is
    given, it is called on the host every ``progress_every`` steps with
    ``(step_in_epoch, Sums so far)`` through ``jax.debug.callback``. ``on_nan`` and
    ``precision`` are passed to :func:`train_batch`. ``batch_sharding`` (data parallel, see
    :mod:`jaxnet.data_parallel`) lays out the gathered ``(batches, batch_size, ...)`` epoch so
    that each batch is split over the devices.
    """
    num_batches, weights = _padded_batches(n, batch_size)

    def epoch(state, x, y, epoch_index):
        shuffle_key = jax.random.fold_in(jax.random.fold_in(state.key, 0), epoch_index)
        order = _batch_indices(shuffled_order(shuffle_key, n), num_batches, batch_size)
        # One gather of the whole epoch, then contiguous batches: on XLA:CPU this is ~3x faster
        # for small networks than gathering each batch inside the loop.
        xs = jnp.take(x, order, axis=0, mode="clip")  # (num_batches, batch_size, *example)
        ys = jnp.take(y, order, axis=0, mode="clip")
        if batch_sharding is not None:  # each step's batch split over the devices
            xs, ys = (jax.lax.with_sharding_constraint(a, batch_sharding) for a in (xs, ys))

        def body(carry, inputs):
            state, sums = carry
            i, xb, yb, batch_weights = inputs
            state, batch = train_batch(net, optimizer, loss, state, xb, yb, batch_weights, on_nan,
                                       precision=precision)
            sums = sums + batch
            if progress is not None:
                jax.lax.cond((i + 1) % progress_every == 0,
                             lambda: jax.debug.callback(progress, i + 1, sums), lambda: None)
            return (state, sums), None

        steps = jnp.arange(num_batches, dtype=jnp.int32)
        inputs = (steps, xs, ys, None if weights is None else jnp.asarray(weights))
        (state, sums), _ = jax.lax.scan(body, (state, Sums.zeros(on_nan == "skip")), inputs)
        return state, sums

    return epoch, num_batches


def make_evaluate(net: Layer, loss: LossFn, n: int, batch_size: int,
                  precision: str | Policy | None = None,
                  batch_sharding: jax.sharding.Sharding | None = None):
    """A function ``evaluate(params, model_state, x, y) -> Sums`` over all ``n`` examples in fixed batches.

    ``precision``: the forward pass's policy (see :mod:`jaxnet.precision`); the loss is computed
    on its output dtype (float32 logits). ``batch_sharding``: how each batch is split over the
    devices (data parallel).
    """
    policy = get_policy(precision)
    num_batches, weights = _padded_batches(n, batch_size)
    indices = _batch_indices(np.arange(n), num_batches, batch_size, numpy=np)

    def evaluate(params, model_state, x, y):
        def body(sums, inputs):
            batch_indices, batch_weights = inputs
            xb, yb = jnp.take(x, batch_indices, axis=0), jnp.take(y, batch_indices, axis=0)
            if batch_sharding is not None:
                xb, yb = (jax.lax.with_sharding_constraint(a, batch_sharding) for a in (xb, yb))
            logits, _ = apply_with_policy(net, policy, params, model_state, xb)
            batch = batch_sums(logits, yb, loss(logits, yb), batch_weights)
            return sums + batch, None

        xs = (indices, None if weights is None else jnp.asarray(weights))
        return jax.lax.scan(body, Sums.zeros(), xs)[0]

    return evaluate


def evaluate(net: Layer, params: Params, data: tuple[Any, Any], *, model_state: State | None = None,
             loss: LossFn = softmax_cross_entropy, batch_size: int = 1024,
             precision: str | Policy | None = None) -> dict[str, float]:
    """Mean loss and accuracy of ``net`` on ``data = (x, y)``, in evaluation mode.

    Args:
      data: ``x: (n, *example)``, ``y: (n,)`` integer labels (or targets for other losses).
      batch_size: examples per compiled batch; the last batch is padded and masked.
      precision: the forward pass's policy: ``None`` (no casts), ``"f32"``, ``"bf16"``,
        ``"f16"`` or a ``jaxnet.precision.Policy``.

    Returns:
      ``{"loss": float, "accuracy": float}``.
    """
    x, y = map(jnp.asarray, data)
    _check_data(net, params, x, y, "data")
    check_params(get_policy(precision), params, "evaluate")
    if model_state is None:
        if net.has_state:
            raise ValueError("evaluate: this network keeps state (e.g. BatchNorm statistics); pass "
                             "the trained model_state (TrainState.model_state)")
        model_state = {}
    rows = min(batch_size, x.shape[0])
    fn = xla_options.jit(make_evaluate(net, loss, x.shape[0], rows, precision=precision),
                         forward_rows=rows)
    return fn(params, model_state, x, y).means()


def _check_data(net: Layer, params: Params, x, y, what: str) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: x has {x.shape[0]} examples but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: no examples")
    if jnp.issubdtype(y.dtype, jnp.integer):
        out = jax.eval_shape(lambda p, v: net.apply_with_state(p, _zero_state(net, p, v), v)[0],
                             params, jax.ShapeDtypeStruct(x.shape, x.dtype))
        if out.ndim == 2:
            check_labels(np.asarray(y), out.shape[-1], f"{what} labels")


def _zero_state(net: Layer, params: Params, x) -> State:
    """A state tree of the right shapes, for shape checks only."""
    if not net.has_state:
        return {}
    return net.init_with_state(jax.random.key(0), jax.ShapeDtypeStruct(x.shape, x.dtype))[1]


def fit(net: Layer, params: Params | TrainState, optimizer: optax.GradientTransformation,
        train_data: tuple[Any, Any], *, epochs: int, batch_size: int = 128,
        loss: LossFn = softmax_cross_entropy, eval_data: tuple[Any, Any] | None = None,
        model_state: State | None = None, key: jax.Array | None = None,
        eval_batch_size: int = 1024, progress: bool | None = None, progress_every: int | None = None,
        on_epoch: Callable[[dict, TrainState], None] | None = None,
        on_nan: str = "stop",
        precision: str | Policy | None = None,
        mesh: jax.sharding.Mesh | None = None,
        num_examples: int | None = None) -> tuple[TrainState, list[dict]]:
    """Trains ``net`` with each epoch compiled into one program that runs on the device.

    Args:
      net: the network; its output is fed to ``loss``.
      params: from ``net.init``, or a ``TrainState`` to continue from (then ``epochs`` is the
        total number of epochs, counting those already done).
      optimizer: any optax ``GradientTransformation``.
      train_data: ``(x, y)``: ``x (n, *example)``, ``y (n,)`` integer labels (or targets).
        Moved to the device once.
      epochs: number of epochs (passes over ``train_data``).
      batch_size: examples per step (capped at ``n``); the last partial batch is masked.
      loss: per-example loss ``(logits, y) -> (batch,)``.
      eval_data: optional held-out ``(x, y)``, evaluated after every epoch.
      model_state: the network's initial state; derived from ``init_with_state`` when omitted.
      key: PRNG key for shuffling and dropout; default ``jax.random.key(0)``.
      eval_batch_size: examples per compiled evaluation batch.
      progress: show a progress bar (default: when stderr is a terminal).
      progress_every: steps between progress updates from the device (default: ~50 per epoch).
      on_epoch: called as ``on_epoch(record, state)`` after each epoch, before the next starts
        (never for an epoch whose loss is not finite).
      on_nan: ``"stop"`` (default) raises after an epoch whose training loss is NaN or infinite;
        ``"skip"`` skips the update of every batch with a non-finite loss inside the compiled
        step and reports ``skipped_batches`` per epoch (it stops only when a whole epoch is
        skipped).
      precision: ``None`` (default: no casts), ``"f32"``, ``"bf16"`` or a
        ``jaxnet.precision.Policy``: forward passes (training and evaluation) in its compute
        dtype, params, gradients, optimizer state and loss in float32.
      mesh: train data-parallel on this 1-D ``"data"`` mesh
        (:func:`jaxnet.data_parallel.data_mesh`): each batch is split over its devices, the
        state is replicated, and XLA inserts the gradient all-reduce. ``batch_size`` must be a multiple of the number of devices. In a
        multi-process run every process calls ``fit`` with the same data; each places only its
        block of rows. Results equal a one-device run's up to float rounding.
      num_examples: with ``mesh``: the size of the whole training set, when ``train_data``
        holds only this process's block of it, rows ``data_parallel.process_rows(num_examples,
        mesh)`` (as :func:`jaxnet.app.run.train` loads them in a multi-process run); the results
        are those of passing the whole set. Labels are checked only in this block.

    Returns:
      ``(state, history)``: the final ``TrainState`` and one dict per epoch with ``epoch,
      train_loss, train_accuracy, [test_loss, test_accuracy,] [skipped_batches,] seconds,
      examples_per_second``; the first also has ``compile_seconds``.

    Raises:
      FloatingPointError: the training loss became NaN or infinite (names the epoch and steps).
    """
    from jaxnet import data_parallel as parallel
    from jaxnet.progress import make_progress

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fit: epochs must be a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"fit: batch_size must be a positive integer, got {batch_size!r}")
    if on_nan not in ON_NAN:
        raise ValueError(f"fit: on_nan must be one of {', '.join(ON_NAN)}; got {on_nan!r}")
    policy = get_training_policy(precision, "fit")
    check_params(policy, params.params if isinstance(params, TrainState) else params, "fit")
    x, y = map(jnp.asarray if mesh is None else np.asarray, train_data)  # a mesh: placed below
    n = x.shape[0]
    if num_examples is not None:  # this process's rows only: placed with parallel.shard_rows
        if mesh is None:
            raise ValueError("fit: num_examples is for a mesh (train_data then holds one "
                             "process's rows); pass mesh too, or the whole train_data alone")
        n = num_examples
    if x.shape[0] or num_examples is None:  # a process's block may be empty (padding only)
        _check_data(net, params.params if isinstance(params, TrainState) else params, x, y,
                    "train_data")
    if isinstance(params, TrainState):
        state = params
    else:
        if model_state is None and net.has_state:
            model_state = net.init_with_state(
                jax.random.key(0), jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))[1]
        state = init_train_state(net, optimizer, params, model_state=model_state, key=key)
    state = jax.tree.map(jnp.copy, state)  # the epochs donate it; the caller's arrays stay valid
    batch_size = min(batch_size, n)
    shardings, epoch_layout, eval_layout = {}, None, None
    if mesh is not None:  # data parallel; the layout is described in jaxnet/data_parallel.py
        parallel.check_batch_size(mesh, batch_size, "fit: batch_size")
        if num_examples is None:
            x, y = parallel.place_rows(mesh, x), parallel.place_rows(mesh, y)
        else:
            x, y = parallel.shard_rows(mesh, x, n), parallel.shard_rows(mesh, y, n)
        state = parallel.replicate(mesh, state)
        shardings = {"out_shardings": parallel.replicated(mesh)}
        epoch_layout, eval_layout = parallel.row_sharding(mesh, 1), parallel.row_sharding(mesh)
    steps_per_epoch = max(math.ceil(n / batch_size), 1)
    progress_every = progress_every or max(steps_per_epoch // 50, 1)
    reporter = make_progress(progress, epochs, steps_per_epoch)
    epoch_fn, _ = make_epoch(net, optimizer, loss, n, batch_size,
                             reporter.update if reporter.active else None, progress_every, on_nan,
                             precision=policy, batch_sharding=epoch_layout)

    start = time.perf_counter()
    run_epoch = xla_options.jit(epoch_fn, donate_argnums=0, **shardings).lower(
        state, x, y, jnp.int32(0)).compile()
    if eval_data is not None:
        x_eval, y_eval = map(jnp.asarray if mesh is None else np.asarray, eval_data)
        _check_data(net, state.params, x_eval, y_eval, "eval_data")
        eval_size = min(eval_batch_size, x_eval.shape[0])
        if mesh is not None:  # whole on every device; each batch split over them (masked padding)
            x_eval, y_eval = parallel.replicate(mesh, (x_eval, y_eval))
            eval_size = parallel.round_up_to_devices(mesh, eval_size)
        run_eval = xla_options.jit(make_evaluate(net, loss, x_eval.shape[0], eval_size,
                                                 precision=policy, batch_sharding=eval_layout),
                                   forward_rows=eval_size, **shardings).lower(
            state.params, state.model_state, x_eval, y_eval).compile()
    compile_seconds = time.perf_counter() - start

    done, rest = divmod(int(state.step), steps_per_epoch)
    if rest:
        raise ValueError(f"fit: the state is at step {int(state.step)}, inside epoch {done + 1} "
                         f"({steps_per_epoch} steps per epoch); continue from an epoch boundary")
    history = []
    with reporter:
        for epoch in range(done, epochs):
            reporter.start_epoch(epoch + 1)
            start = time.perf_counter()
            state, sums = run_epoch(state, x, y, jnp.int32(epoch))
            train = sums.means()  # waits for the epoch to finish
            train_seconds = time.perf_counter() - start
            steps = f"steps {epoch * steps_per_epoch + 1}-{(epoch + 1) * steps_per_epoch}"
            if not math.isfinite(train["loss"]):
                raise FloatingPointError(f"fit: the training loss became {train['loss']} in epoch "
                                         f"{epoch + 1} ({steps}); lower the learning rate?")
            record = {"epoch": epoch + 1, "train_loss": train["loss"],
                      "train_accuracy": train["accuracy"]}
            if on_nan == "skip":
                record["skipped_batches"] = int(sums.skipped)
                if record["skipped_batches"] == steps_per_epoch:
                    raise FloatingPointError(f"fit: the training loss was NaN or infinite in every "
                                             f"batch of epoch {epoch + 1} ({steps}); all skipped")
            if eval_data is not None:
                test = run_eval(state.params, state.model_state, x_eval, y_eval).means()
                record.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
            record.update(seconds=time.perf_counter() - start,
                          examples_per_second=n / train_seconds)
            if not history:
                record["compile_seconds"] = compile_seconds
            history.append(record)
            reporter.end_epoch(record)
            if on_epoch is not None:
                on_epoch(record, state)
    return state, history
