"""``fit`` and ``evaluate``: whole epochs compiled into one program each, run on the device.

``fit`` compiles one program per epoch (:func:`make_epoch`): the epoch's shuffle, one gather of
its data and a ``lax.scan`` over its batches with the metrics summed on the device
(:mod:`jaxnet.train.engine`); the host only starts epochs, reads their sums and reports. A NaN
or infinite loss stops training after its epoch, or, with ``on_nan="skip"``, the update of each
such batch is skipped inside the compiled step.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnet.data_parallel as parallel
import jaxnet.sharding as sharding
from jaxnet._xla import options as xla_options
from jaxnet.augment import Augment
from jaxnet.losses import check_labels, is_model_loss, softmax_cross_entropy
from jaxnet.nn.layer import Layer, Params, State, state_or_empty
from jaxnet.progress import make_progress
from jaxnet.precision import Policy, check_params, get_policy, get_training_policy
from jaxnet.train.engine import (EpochPlan, Metric, Sums, call_step_callbacks, epoch_order,
                                 run_epochs, scan_batches, segment_bounds, step_interval,
                                 take_rows)
from jaxnet.train.setup import (as_arrays, count_examples, initial_state, output_spec,
                                task_metrics, train_record)
from jaxnet.train.state import (ON_NAN, LossFn, TrainState, evaluate_batch, metric_names,
                                train_batch)
from jaxnet.validate import positive_int


def make_epoch(net: Layer, optimizer: optax.GradientTransformation, loss: LossFn, n: int,
               batch_size: int, progress: Callable | None = None, progress_every: int = 0,
               on_nan: str = "stop", precision: str | Policy | None = None,
               batch_sharding: jax.sharding.Sharding | None = None,
               metrics: Mapping[str, Metric] | None = None, augment: Augment | None = None):
    """A function ``epoch(state, x, y, epoch_index) -> (state, Sums)`` training one shuffled epoch.

    It is meant to be jitted whole (``fit`` does so, donating ``state``). When ``progress`` is
    given, it is called on the host every ``progress_every`` steps with
    ``(step_in_epoch, Sums so far)``. ``on_nan``, ``precision``, ``metrics`` and ``augment``
    are passed to :func:`jaxnet.train.train_batch`. ``batch_sharding`` (data parallel, see
    :mod:`jaxnet.data_parallel`) lays out the gathered ``(batches, batch_size, ...)`` epoch so
    that each batch is split over the devices.

    Returns:
      ``(epoch, num_batches)``.
    """
    plan = EpochPlan.of(n, batch_size)
    step = _train_step(net, optimizer, loss, on_nan, precision, metrics, augment)

    def epoch(state, x, y, epoch_index):
        batches = _batches(x, y, epoch_order(state.key, epoch_index, plan), batch_sharding)
        return scan_batches(step, state, batches, plan,
                            zero_sums(net, loss, metrics, on_nan, state, x, y),
                            progress=progress, progress_every=progress_every)

    return epoch, plan.num_batches


def make_segment(net: Layer, optimizer: optax.GradientTransformation, loss: LossFn, n: int,
                 batch_size: int, length: int, progress: Callable | None = None,
                 progress_every: int = 0, on_nan: str = "stop",
                 precision: str | Policy | None = None,
                 batch_sharding: jax.sharding.Sharding | None = None,
                 metrics: Mapping[str, Metric] | None = None, augment: Augment | None = None):
    """A function ``segment(state, sums, x, y, order, start) -> (state, sums)`` training steps
    ``start .. start + length - 1`` of an epoch, adding their sums to ``sums``.

    Run one after the other over an epoch, segments give bitwise the state and sums of
    :func:`make_epoch`'s epoch (same arguments): ``fit`` runs epochs in segments when
    callbacks are due every N steps, or to finish an epoch from a mid-epoch checkpoint.

    Shapes:
      order: ``(num_batches, batch_size)`` int32, the epoch's example indices
      (:func:`jaxnet.train.engine.epoch_order`); start: an int32 scalar; sums: as
      :func:`zero_sums` gives them at the epoch's start.
    """
    plan = EpochPlan.of(n, batch_size)
    step = _train_step(net, optimizer, loss, on_nan, precision, metrics, augment)

    def segment(state, sums, x, y, order, start):
        batches = _batches(x, y, jax.lax.dynamic_slice_in_dim(order, start, length),
                           batch_sharding)
        return scan_batches(step, state, batches, plan, sums, progress=progress,
                            progress_every=progress_every, start=start)

    return segment


def _train_step(net, optimizer, loss, on_nan, precision, metrics, augment):
    def step(state, batch, weights):
        return train_batch(net, optimizer, loss, state, *batch, weights, on_nan, precision=precision,
                           metrics=metrics, augment=augment)
    return step


def _batches(x, y, order, batch_sharding):
    """The rows of ``order`` (``(steps, batch_size)`` indices): one gather for all the steps."""
    batches = take_rows((x, y), order)
    if batch_sharding is not None:  # each step's batch split over the devices
        batches = jax.lax.with_sharding_constraint(batches, batch_sharding)
    return batches


def zero_sums(net: Layer, loss: LossFn, metrics, on_nan: str, state: TrainState, x, y) -> Sums:
    """The zero sums an epoch's train steps add to (traceable)."""
    names = metric_names(net, loss, metrics, state.params, state.model_state, x, y, True)
    return Sums.zeros(on_nan == "skip", metrics=names)


def make_evaluate(net: Layer, loss: LossFn, n: int, batch_size: int,
                  precision: str | Policy | None = None,
                  batch_sharding: jax.sharding.Sharding | None = None,
                  metrics: Mapping[str, Metric] | None = None):
    """A function ``evaluate(params, model_state, x, y) -> Sums`` over all ``n`` examples in fixed batches.

    ``precision``: the forward pass's policy (see :mod:`jaxnet.precision`); the loss is computed
    on its output dtype (float32 logits). ``batch_sharding``: how each batch is split over the
    devices (data parallel). ``metrics``: ``{name: fn(outputs, y) -> (batch,)}``. ``loss`` may
    be a model loss (:func:`jaxnet.losses.model_loss`, called with ``train=False``); ``x``
    and ``y`` pytrees of arrays.
    """
    plan = EpochPlan.of(n, batch_size)
    indices = plan.batches(np.arange(n), numpy=np)

    def evaluate(params, model_state, x, y):
        def step(carry, batch_indices, weights):
            xb, yb = take_rows((x, y), batch_indices)
            if batch_sharding is not None:
                xb, yb = jax.lax.with_sharding_constraint((xb, yb), batch_sharding)
            return carry, evaluate_batch(net, loss, params, model_state, xb, yb, weights,
                                         precision=precision, metrics=metrics)

        names = metric_names(net, loss, metrics, params, model_state, x, y, False)
        return scan_batches(step, (), jnp.asarray(indices), plan, Sums.zeros(metrics=names))[1]

    return evaluate


def evaluate(net: Layer, params: Params, data: tuple[Any, Any], *, model_state: State | None = None,
             loss: LossFn = softmax_cross_entropy, batch_size: int = 1024,
             precision: str | Policy | None = None,
             metrics: Mapping[str, Metric] | None = None,
             mesh: jax.sharding.Mesh | None = None,
             rules: sharding.ShardingRules | Mapping | None = None) -> dict[str, float]:
    """Mean loss and metrics of ``net`` on ``data = (x, y)``, in evaluation mode.

    Args:
      data: ``x: (n, *example)``, ``y: (n,)`` integer labels (or targets for other losses);
        each may be a pytree (dict, tuple) of arrays sharing the leading ``n``.
      loss: a per-example loss ``(outputs, y) -> (batch,)`` or a model loss
        (:func:`jaxnet.losses.model_loss`, whose aux scalars are returned as metrics).
      batch_size: examples per compiled batch; the last batch is padded and masked.
      precision: the forward pass's policy: ``None`` (no casts), ``"f32"``, ``"bf16"``,
        ``"f16"`` or a ``jaxnet.precision.Policy``.
      metrics: ``{name: fn(outputs, y) -> (batch,)}`` per-example values (see
        :mod:`jaxnet.metrics`); default: the task's (:func:`default_metrics`).
      mesh, rules: evaluate on a mesh, as :func:`fit` trains on one: params placed on it
        already keep their layout, others are laid out by ``rules``; each batch is split over
        the ``data`` and ``fsdp`` devices (``batch_size`` is rounded up to a multiple of them).

    Returns:
      ``{"loss": float, ["accuracy": float,] **metrics}``: accuracy for classification.

    A memory-mapped ``(x, y)`` or an iterable of ``(x, y)`` batches is streamed
    (:func:`jaxnet.train.streaming.evaluate_streaming`).
    """
    import jaxnet.train.streaming as streaming  # noqa: PLC0415 - kept with the dispatch
    if streaming.is_streaming(data):
        return streaming.evaluate_streaming(net, params, data, model_state=model_state, loss=loss,
                                            batch_size=batch_size, precision=precision,
                                            metrics=metrics, mesh=mesh, rules=rules)
    if rules is not None and mesh is None:
        raise ValueError("evaluate: rules lay the params out over a mesh; pass mesh too")
    x, y = as_arrays(tuple(data), jnp.asarray)
    _check_data(net, params, x, y, "data", loss)  # before tracing the network with them
    check_params(get_policy(precision), params, "evaluate")
    model_state = state_or_empty(net, model_state, "evaluate")
    metrics, classification = task_metrics(net, loss, metrics, params, x, y, "evaluate")
    if mesh is not None:
        params = sharding.shard_params(params, mesh, rules)
        model_state = parallel.replicate(mesh, model_state)
    run = _compile_evaluation(net, loss, (x, y), batch_size, precision, mesh, params,
                              model_state, metrics, classification, "data")
    return run(params, model_state)




def _check_data(net: Layer, params: Params, x, y, what: str, loss: LossFn | None = None) -> int:
    """The number of examples in ``(x, y)``, after checking the arrays' lengths, the params
    against the network and integer labels against its outputs (not for a model loss, which
    applies the network its own way)."""
    n = count_examples((x, y), what)
    if not is_model_loss(loss) and hasattr(y, "dtype") and jnp.issubdtype(y.dtype, jnp.integer):
        out = output_spec(net, params, x)
        if getattr(out, "ndim", 0) == 2:
            check_labels(np.asarray(y), out.shape[-1], f"{what} labels")
    return n



def fit(net: Layer, params: Params | TrainState, optimizer: optax.GradientTransformation,
        train_data: tuple[Any, Any], *, epochs: int, batch_size: int = 128,
        loss: LossFn = softmax_cross_entropy, eval_data: tuple[Any, Any] | None = None,
        model_state: State | None = None, key: jax.Array | None = None,
        eval_batch_size: int = 1024, progress: bool | None = None, progress_every: int | None = None,
        on_epoch: Callable[[dict, TrainState], None] | None = None,
        on_nan: str = "stop",
        precision: str | Policy | None = None,
        mesh: jax.sharding.Mesh | None = None,
        num_examples: int | None = None,
        metrics: Mapping[str, Metric] | None = None,
        validation_data: tuple[Any, Any] | None = None,
        validation_split: float | None = None,
        callbacks: Sequence[Any] = (),
        augment: Augment | None = None,
        rules: sharding.ShardingRules | Mapping | None = None) -> tuple[TrainState, list[dict]]:
    """Trains ``net`` with each epoch compiled into one program that runs on the device.

    Args:
      net: the network; its output is fed to ``loss``.
      params: from ``net.init``, or a ``TrainState`` to continue from (then ``epochs`` is the
        total number of epochs, counting those already done; a state from a mid-epoch
        checkpoint finishes its epoch first, exactly as the uninterrupted run would have).
      optimizer: any optax ``GradientTransformation``.
      train_data: ``(x, y)``: ``x (n, *example)``, ``y (n,)`` integer labels (or targets).
        Moved to the device once. Either may be a pytree, a dict or tuple of arrays
        (``{"tokens": (n, t) int32, "mask": (n, t) bool}``) whose leaves share the leading
        ``n``: every leaf is shuffled, gathered and padded alike. (A list is one array; a pair
        whose x and y are both 2-tuples of arrays reads as two batches when streamed: use a
        dict there.)
      epochs: number of epochs (passes over ``train_data``).
      batch_size: examples per step (capped at ``n``); the last partial batch is masked.
      loss: per-example loss ``(logits, y) -> (batch,)`` (fastest), or a model loss
        ``(params, model_state, batch, key) -> (loss, aux)`` made with
        :func:`jaxnet.losses.model_loss` (weight penalties, auxiliary losses, several
        outputs): its aux scalars are reported as ``train_<name>``, ``test_<name>``, and
        there is no accuracy.
      eval_data: optional held-out ``(x, y)``, evaluated after every epoch.
      model_state: the network's initial state; derived from ``init_with_state`` when omitted.
      key: PRNG key for shuffling and dropout; default ``jax.random.key(0)``.
      eval_batch_size: examples per compiled evaluation batch.
      progress: show a progress bar (default: when stderr is a terminal).
      progress_every: steps between progress updates from the device (default: ~50 per epoch).
      on_epoch: called as ``on_epoch(record, state)`` after each epoch (and its callbacks),
        before the next starts (never for an epoch whose loss is not finite), with a copy of
        the state that it may keep.
      on_nan: ``"stop"`` (default) raises after an epoch whose training loss is NaN or infinite;
        ``"skip"`` skips the update of every batch with a non-finite loss inside the compiled
        step and reports ``skipped_batches`` per epoch (it stops only when a whole epoch is
        skipped).
      precision: ``None`` (default: no casts), ``"f32"``, ``"bf16"`` or a
        ``jaxnet.precision.Policy``: forward passes (training and evaluation) in its compute
        dtype, params, gradients, optimizer state and loss in float32.
      mesh: train on this mesh: a 1-D ``"data"`` mesh (:func:`jaxnet.data_parallel.data_mesh`,
        data parallel: the state replicated) or a ``data x fsdp x model`` mesh
        (:func:`jaxnet.sharding.make_mesh`: params and optimizer state sharded by ``rules``).
        Each batch is split over the ``data`` and ``fsdp`` devices (``batch_size`` must be a
        multiple of their product) and XLA inserts the collectives. A ``TrainState`` already
        placed on the mesh (:func:`jaxnet.train.init_sharded`, a restored sharded checkpoint)
        keeps its layout. In a multi-process run every process calls ``fit`` with the same
        data; each places only its block of rows. Results equal a one-device run's up to float
        rounding.
      rules: with ``mesh``: how params are laid out (:class:`jaxnet.sharding.ShardingRules`
        or ``{pattern: PartitionSpec}``; default jaxnet's FSDP and tensor-parallel rules,
        :func:`jaxnet.sharding.param_specs`).
      num_examples: with ``mesh``: the size of the whole training set, when ``train_data``
        holds only this process's block of it, rows ``data_parallel.process_rows(num_examples,
        mesh)`` (as :func:`jaxnet.app.run.train` loads them in a multi-process run); the results
        are those of passing the whole set. Labels are checked only in this block.

      metrics: ``{name: fn(outputs, y) -> (batch,)}`` per-example metrics summed on the
        device (:mod:`jaxnet.metrics`: ``top_k(5)``, ``absolute_error``, ...), reported as
        ``train_<name>``, ``val_<name>``, ``test_<name>``; default by task
        (:func:`default_metrics`). Accuracy is reported for classification only.
      validation_data: held-out ``(x, y)`` to select and stop on, evaluated after every epoch
        (``val_loss``, ``val_accuracy``, ...); ``eval_data`` stays the test set.
      validation_split: instead, the fraction in ``(0, 1)`` of ``train_data``'s rows held out
        for validation: the last rows, as given (shuffle the data first if it is ordered).
      callbacks: objects with ``on_epoch_end(record, state) -> bool`` (``True`` stops
        training) and optionally ``on_train_end(state) -> state``, called with copies of the
        state they may keep (:mod:`jaxnet.train.callbacks`: early stopping, logging,
        checkpoints). One with ``every_steps = N`` also gets ``on_step_end(step, record,
        state)`` after steps ``N, 2N, ...`` of each epoch: the epoch then runs as segments
        of its compiled program, with bitwise the same results (arrays only, not streaming).
      augment: ``augment(key, x) -> x`` applied on the device to each training batch's inputs
        (:mod:`jaxnet.augment`: ``random_crop``, ``random_flip``, ``compose``), with a new key
        every step (see :func:`jaxnet.train.train_batch`); never to validation or test data.

    Returns:
      ``(state, history)``: the final ``TrainState`` and one dict per epoch with ``epoch,
      train_loss, train_accuracy, [test_loss, test_accuracy,] [skipped_batches,] seconds,
      examples_per_second``; the first also has ``compile_seconds``.

    Raises:
      FloatingPointError: the training loss became NaN or infinite (names the epoch and steps).

    A memory-mapped ``train_data`` (``np.load(path, mmap_mode="r")``) or an iterable of
    ``(x, y)`` batches is streamed to the device chunk by chunk
    (:func:`jaxnet.train.streaming.fit_streaming`).
    """
    import jaxnet.train.streaming as streaming  # noqa: PLC0415 - kept with the dispatch
    if streaming.is_streaming(train_data):
        if step_interval(callbacks) is not None:
            raise ValueError("fit: callbacks with every_steps need train_data in memory; "
                             "streaming data (a memory-mapped array or an iterable of batches) "
                             "runs in chunks and calls callbacks once per epoch")
        return streaming.fit_streaming(
            net, params, optimizer, train_data, epochs=epochs, batch_size=batch_size, loss=loss,
            eval_data=eval_data, model_state=model_state, key=key,
            eval_batch_size=eval_batch_size, progress=progress, progress_every=progress_every,
            on_epoch=on_epoch, on_nan=on_nan, precision=precision, mesh=mesh,
            num_examples=num_examples, metrics=metrics, validation_data=validation_data,
            validation_split=validation_split, callbacks=callbacks, augment=augment, rules=rules)
    positive_int("fit", "epochs", epochs)
    positive_int("fit", "batch_size", batch_size)
    if on_nan not in ON_NAN:
        raise ValueError(f"fit: on_nan must be one of {', '.join(ON_NAN)}; got {on_nan!r}")
    policy = get_training_policy(precision, "fit")
    check_params(policy, params.params if isinstance(params, TrainState) else params, "fit")
    # a mesh: placed below
    x, y = as_arrays(tuple(train_data), jnp.asarray if mesh is None else np.asarray)
    (x, y), validation_data = _split_validation(x, y, validation_data, validation_split, mesh)
    if num_examples is not None and mesh is None:
        raise ValueError("fit: num_examples is for a mesh (train_data then holds one "
                         "process's rows); pass mesh too, or the whole train_data alone")
    n = num_examples
    if num_examples is None or len(jax.tree.leaves(x)[0]):  # a process's block may be empty
        rows = _check_data(net, params.params if isinstance(params, TrainState) else params, x,
                           y, "train_data", loss)
        n = rows if num_examples is None else num_examples
    state = initial_state(net, optimizer, params, model_state, key, x)
    metrics, classification = task_metrics(net, loss, metrics, state.params, x, y, "fit")
    batch_size = min(batch_size, n)
    shardings, epoch_layout = {}, None
    if mesh is not None:  # rows as in jaxnet/data_parallel.py, params as in jaxnet/sharding.py
        parallel.check_batch_size(mesh, batch_size, "fit: batch_size")
        place = parallel.place_rows if num_examples is None else (
            lambda m, a: parallel.shard_rows(m, a, n))
        x, y = jax.tree.map(lambda a: place(mesh, a), (x, y))
        state = _laid_out(state, mesh, rules)
        shardings = {"out_shardings": (jax.tree.map(lambda a: a.sharding, state),
                                       parallel.replicated(mesh))}
        epoch_layout = parallel.row_sharding(mesh, 1)
    elif rules is not None:
        raise ValueError("fit: rules lay the params out over a mesh; pass mesh too")
    plan = EpochPlan.of(n, batch_size)
    reporter = make_progress(progress, epochs, plan.num_batches, classification)
    epoch_fn, _ = make_epoch(net, optimizer, loss, n, batch_size,
                             reporter.update if reporter.active else None,
                             progress_every or max(plan.num_batches // 50, 1), on_nan,
                             precision=policy, batch_sharding=epoch_layout, metrics=metrics,
                             augment=augment)

    start = time.perf_counter()
    done, rest = divmod(int(state.step), plan.num_batches)  # rest: a mid-epoch checkpoint's
    every = step_interval(callbacks)
    whole = None  # (state, epoch) -> (state, sums): one program per epoch, the default
    if every is None:
        compiled = xla_options.compile(xla_options.jit(epoch_fn, donate_argnums=0, **shardings),
                                       state, x, y, jnp.int32(0))
        whole = lambda state, epoch: compiled(state, x, y, epoch)  # noqa: E731
    if every is None and not rest:
        run_epoch = whole
    else:  # step callbacks, or the rest of a mid-epoch checkpoint's epoch first
        run_epoch = _SegmentedEpochs(
            lambda length: make_segment(
                net, optimizer, loss, n, batch_size, length,
                reporter.update if reporter.active else None,
                progress_every or max(plan.num_batches // 50, 1), on_nan, precision=policy,
                batch_sharding=epoch_layout, metrics=metrics, augment=augment),
            state, x, y, plan, every=every, first_step=rest, callbacks=callbacks,
            whole=whole,
            zero=zero_sums(net, loss, metrics, on_nan, state, x, y), classification=classification,
            shardings=shardings, mesh=mesh)
    evaluations = {prefix: _compile_evaluation(
        net, loss, data, eval_batch_size, policy, mesh, state.params, state.model_state, metrics,
        classification, "eval_data" if prefix == "test" else "validation_data")
        for prefix, data in (("val", validation_data), ("test", eval_data)) if data is not None}
    compile_seconds = time.perf_counter() - start

    return run_epochs(state, run_epoch,
                      first_epoch=done, epochs=epochs, reporter=reporter,
                      train_record=lambda sums, epoch: train_record(sums, epoch, plan.num_batches, on_nan,
                                                                     classification),
                      evaluate=lambda state: {
                          f"{prefix}_{name}": value for prefix, run in evaluations.items()
                          for name, value in run(state.params, state.model_state).items()},
                      examples=n, compile_seconds=compile_seconds, on_epoch=on_epoch,
                      callbacks=callbacks)



def _split_validation(x, y, validation_data, validation_split, mesh):
    """``((x, y), validation_data)`` with the last ``validation_split`` of the rows held out."""
    if validation_split is None:
        return (x, y), validation_data
    if validation_data is not None or mesh is not None:
        raise ValueError("fit: validation_split holds out rows of train_data; it cannot be "
                         "combined with validation_data or a mesh (pass validation_data)")
    if isinstance(validation_split, bool) or not 0 < validation_split < 1:
        raise ValueError(f"fit: validation_split must be in (0, 1), got {validation_split!r}")
    n = count_examples((x, y), "train_data")
    held = int(round(n * validation_split))
    if not 0 < held < n:
        raise ValueError(f"fit: validation_split={validation_split} of {n} examples "
                         f"leaves {held} for validation and {n - held} for training")
    return (jax.tree.map(lambda a: a[:-held], (x, y)), jax.tree.map(lambda a: a[-held:], (x, y)))


def _compile_evaluation(net, loss, eval_data, eval_batch_size, policy, mesh, params,
                        model_state, metrics, classification, what: str
                        ) -> Callable[[Params, State], dict]:
    """``(params, model_state) -> {"loss": ..., ...}`` over ``eval_data``, compiled for the
    layout of ``params`` and ``model_state`` (on ``mesh``, when given)."""
    x_eval, y_eval = as_arrays(tuple(eval_data), jnp.asarray if mesh is None else np.asarray)
    n_eval = _check_data(net, params, x_eval, y_eval, what, loss)
    eval_size, layout, shardings = min(eval_batch_size, n_eval), None, {}
    if mesh is not None:  # whole on every device; each batch split over them (masked padding)
        x_eval, y_eval = parallel.replicate(mesh, (x_eval, y_eval))
        eval_size = parallel.round_up_to_devices(mesh, eval_size)
        layout = parallel.row_sharding(mesh)
        shardings = {"out_shardings": parallel.replicated(mesh)}
    compiled = xla_options.jit(make_evaluate(net, loss, n_eval, eval_size,
                                             precision=policy, batch_sharding=layout,
                                             metrics=metrics),
                               forward_rows=eval_size, **shardings).lower(
        params, model_state, x_eval, y_eval).compile()
    return lambda params, model_state: compiled(params, model_state, x_eval,
                                                y_eval).means(classification)


def _laid_out(state: TrainState, mesh: jax.sharding.Mesh, rules) -> TrainState:
    """``state`` on ``mesh``: kept as it is when every array is placed there already (a state
    from :func:`jaxnet.train.init_sharded` or a restored sharded checkpoint), else placed with
    its params laid out by ``rules`` (:func:`jaxnet.sharding.param_specs`; a 1-D ``data``
    mesh replicates them) and the optimizer state following."""
    if sharding.placed_on(state, mesh):
        return state
    return sharding.shard_state(state, mesh, sharding.param_specs(state.params, mesh, rules))


class _SegmentedEpochs:
    """``run_epoch(state, epoch) -> (state, sums)`` for ``run_epochs``, running epochs in
    segments (:func:`make_segment`, one compiled program per segment length) cut every
    ``every`` steps, with the step callbacks due called between segments. The first epoch
    starts at step ``first_step`` of its epoch (a state from a mid-epoch checkpoint); without
    ``every``, later epochs run whole (``whole(state, epoch)``, the compiled epoch program).
    """

    def __init__(self, make_segment_fn, state, x, y, plan: EpochPlan, *, every, first_step,
                 callbacks, whole, zero: Sums, classification: bool, shardings, mesh):
        place = (lambda tree: parallel.replicate(mesh, tree)) if mesh is not None else (
            lambda tree: tree)
        order_fn = jax.jit(lambda key, epoch: epoch_order(key, epoch, plan))
        self.order = lambda key, epoch: place(order_fn(key, epoch))
        self.x, self.y, self.plan, self.every, self.first_step = x, y, plan, every, first_step
        self.callbacks, self.whole, self.classification = callbacks, whole, classification
        self.zero = place(zero)
        order = self.order(state.key, jnp.int32(0))
        begins = {first_step} | ({0} if every is not None else set())  # else whole epochs
        lengths = {length for begin in begins
                   for _, length in segment_bounds(begin, plan.num_batches, every)}
        self.programs = {length: xla_options.compile(
            xla_options.jit(make_segment_fn(length), donate_argnums=0, **shardings),
            state, self.zero, x, y, order, jnp.int32(0)) for length in lengths}

    def __call__(self, state, epoch):
        begin, self.first_step = self.first_step, 0
        if self.every is None and begin == 0:
            return self.whole(state, epoch)
        order, sums = self.order(state.key, epoch), self.zero
        for first, length in segment_bounds(begin, self.plan.num_batches, self.every):
            state, sums = self.programs[length](state, sums, self.x, self.y, order,
                                                jnp.int32(first))
            if first + length < self.plan.num_batches and self.every is not None:
                record = {"epoch": int(epoch) + 1, "step": int(state.step), **{
                    f"train_{name}": value
                    for name, value in sums.means(self.classification).items()}}
                call_step_callbacks(self.callbacks, first + length, record, state)
        return state, sums
