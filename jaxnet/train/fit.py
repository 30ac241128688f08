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
from jaxnet._xla import options as xla_options
from jaxnet.losses import check_labels, check_per_example, softmax_cross_entropy
from jaxnet.nn.layer import Layer, Params, State, state_or_empty
from jaxnet.progress import make_progress
from jaxnet.precision import Policy, apply_with_policy, check_params, get_policy, get_training_policy
from jaxnet.train.engine import (EpochPlan, Metric, Sums, batch_sums, epoch_order,
                                 is_classification, run_epochs, scan_batches, take_rows)
from jaxnet.train.setup import default_metrics, initial_state, output_spec, train_record
from jaxnet.train.state import ON_NAN, LossFn, TrainState, train_batch
from jaxnet.validate import positive_int


def make_epoch(net: Layer, optimizer: optax.GradientTransformation, loss: LossFn, n: int,
               batch_size: int, progress: Callable | None = None, progress_every: int = 0,
               on_nan: str = "stop", precision: str | Policy | None = None,
               batch_sharding: jax.sharding.Sharding | None = None,
               metrics: Mapping[str, Metric] | None = None):
    """A function ``epoch(state, x, y, epoch_index) -> (state, Sums)`` training one shuffled epoch.

    It is meant to be jitted whole (``fit`` does so, donating ``state``). When ``progress`` is
    given, it is called on the host every ``progress_every`` steps with
    ``(step_in_epoch, Sums so far)``. ``on_nan``, ``precision`` and ``metrics`` are passed to
    :func:`jaxnet.train.train_batch`. ``batch_sharding`` (data parallel, see
    :mod:`jaxnet.data_parallel`) lays out the gathered ``(batches, batch_size, ...)`` epoch so
    that each batch is split over the devices.

    Returns:
      ``(epoch, num_batches)``.
    """
    plan = EpochPlan.of(n, batch_size)

    def step(state, batch, weights):
        return train_batch(net, optimizer, loss, state, *batch, weights, on_nan, precision=precision,
                           metrics=metrics)

    def epoch(state, x, y, epoch_index):
        batches = take_rows((x, y), epoch_order(state.key, epoch_index, plan))
        if batch_sharding is not None:  # each step's batch split over the devices
            batches = jax.lax.with_sharding_constraint(batches, batch_sharding)
        return scan_batches(step, state, batches, plan, Sums.zeros(on_nan == "skip", metrics=metrics),
                            progress=progress, progress_every=progress_every)

    return epoch, plan.num_batches


def make_evaluate(net: Layer, loss: LossFn, n: int, batch_size: int,
                  precision: str | Policy | None = None,
                  batch_sharding: jax.sharding.Sharding | None = None,
                  metrics: Mapping[str, Metric] | None = None):
    """A function ``evaluate(params, model_state, x, y) -> Sums`` over all ``n`` examples in fixed batches.

    ``precision``: the forward pass's policy (see :mod:`jaxnet.precision`); the loss is computed
    on its output dtype (float32 logits). ``batch_sharding``: how each batch is split over the
    devices (data parallel). ``metrics``: ``{name: fn(outputs, y) -> (batch,)}``.
    """
    policy = get_policy(precision)
    plan = EpochPlan.of(n, batch_size)
    indices = plan.batches(np.arange(n), numpy=np)

    def evaluate(params, model_state, x, y):
        def step(carry, batch_indices, weights):
            xb, yb = take_rows((x, y), batch_indices)
            if batch_sharding is not None:
                xb, yb = jax.lax.with_sharding_constraint((xb, yb), batch_sharding)
            logits, _ = apply_with_policy(net, policy, params, model_state, xb, batch_ndim=1)
            losses = check_per_example(loss(logits, yb), xb.shape[0], "evaluate")
            return carry, batch_sums(logits, yb, losses, weights, metrics)

        return scan_batches(step, (), jnp.asarray(indices), plan, Sums.zeros(metrics=metrics))[1]

    return evaluate


def evaluate(net: Layer, params: Params, data: tuple[Any, Any], *, model_state: State | None = None,
             loss: LossFn = softmax_cross_entropy, batch_size: int = 1024,
             precision: str | Policy | None = None,
             metrics: Mapping[str, Metric] | None = None) -> dict[str, float]:
    """Mean loss and metrics of ``net`` on ``data = (x, y)``, in evaluation mode.

    Args:
      data: ``x: (n, *example)``, ``y: (n,)`` integer labels (or targets for other losses).
      batch_size: examples per compiled batch; the last batch is padded and masked.
      precision: the forward pass's policy: ``None`` (no casts), ``"f32"``, ``"bf16"``,
        ``"f16"`` or a ``jaxnet.precision.Policy``.
      metrics: ``{name: fn(outputs, y) -> (batch,)}`` per-example values (see
        :mod:`jaxnet.metrics`); default: the task's (:func:`default_metrics`).

    Returns:
      ``{"loss": float, ["accuracy": float,] **metrics}``: accuracy for classification.

    A memory-mapped ``(x, y)`` or an iterable of ``(x, y)`` batches is streamed
    (:func:`jaxnet.train.streaming.evaluate_streaming`).
    """
    import jaxnet.train.streaming as streaming  # noqa: PLC0415 - kept with the dispatch
    if streaming.is_streaming(data):
        return streaming.evaluate_streaming(net, params, data, model_state=model_state, loss=loss,
                                            batch_size=batch_size, precision=precision,
                                            metrics=metrics)
    x, y = map(jnp.asarray, data)
    _check_data(net, params, x, y, "data")
    check_params(get_policy(precision), params, "evaluate")
    model_state = state_or_empty(net, model_state, "evaluate")
    rows = min(batch_size, x.shape[0])
    output = output_spec(net, params, x)
    metrics = default_metrics(output, y) if metrics is None else metrics
    fn = xla_options.jit(make_evaluate(net, loss, x.shape[0], rows, precision=precision,
                                       metrics=metrics), forward_rows=rows)
    return fn(params, model_state, x, y).means(is_classification(output, y))




def _check_data(net: Layer, params: Params, x, y, what: str) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: x has {x.shape[0]} examples but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: no examples")
    if jnp.issubdtype(y.dtype, jnp.integer):
        out = output_spec(net, params, x)
        if out.ndim == 2:
            check_labels(np.asarray(y), out.shape[-1], f"{what} labels")



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
        callbacks: Sequence[Any] = ()) -> tuple[TrainState, list[dict]]:
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
        (never for an epoch whose loss is not finite), with a copy of the state that it may
        keep.
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
        checkpoints).

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
        return streaming.fit_streaming(
            net, params, optimizer, train_data, epochs=epochs, batch_size=batch_size, loss=loss,
            eval_data=eval_data, model_state=model_state, key=key,
            eval_batch_size=eval_batch_size, progress=progress, progress_every=progress_every,
            on_epoch=on_epoch, on_nan=on_nan, precision=precision, mesh=mesh,
            num_examples=num_examples, metrics=metrics, validation_data=validation_data,
            validation_split=validation_split, callbacks=callbacks)
    positive_int("fit", "epochs", epochs)
    positive_int("fit", "batch_size", batch_size)
    if on_nan not in ON_NAN:
        raise ValueError(f"fit: on_nan must be one of {', '.join(ON_NAN)}; got {on_nan!r}")
    policy = get_training_policy(precision, "fit")
    check_params(policy, params.params if isinstance(params, TrainState) else params, "fit")
    x, y = map(jnp.asarray if mesh is None else np.asarray, train_data)  # a mesh: placed below
    (x, y), validation_data = _split_validation(x, y, validation_data, validation_split, mesh)
    n = x.shape[0] if num_examples is None else num_examples
    if num_examples is not None and mesh is None:
        raise ValueError("fit: num_examples is for a mesh (train_data then holds one "
                         "process's rows); pass mesh too, or the whole train_data alone")
    if x.shape[0] or num_examples is None:  # a process's block may be empty (padding only)
        _check_data(net, params.params if isinstance(params, TrainState) else params, x, y,
                    "train_data")
    state = initial_state(net, optimizer, params, model_state, key, x)
    output = output_spec(net, state.params, x[:1])
    metrics = default_metrics(output, y) if metrics is None else metrics
    classification = is_classification(output, y)
    batch_size = min(batch_size, n)
    shardings, epoch_layout, eval_layout = {}, None, None
    if mesh is not None:  # data parallel; the layout is described in jaxnet/data_parallel.py
        parallel.check_batch_size(mesh, batch_size, "fit: batch_size")
        place = parallel.place_rows if num_examples is None else (
            lambda m, a: parallel.shard_rows(m, a, n))
        x, y, state = place(mesh, x), place(mesh, y), parallel.replicate(mesh, state)
        shardings = {"out_shardings": parallel.replicated(mesh)}
        epoch_layout, eval_layout = parallel.row_sharding(mesh, 1), parallel.row_sharding(mesh)
    plan = EpochPlan.of(n, batch_size)
    reporter = make_progress(progress, epochs, plan.num_batches, classification)
    epoch_fn, _ = make_epoch(net, optimizer, loss, n, batch_size,
                             reporter.update if reporter.active else None,
                             progress_every or max(plan.num_batches // 50, 1), on_nan,
                             precision=policy, batch_sharding=epoch_layout, metrics=metrics)

    start = time.perf_counter()
    compiled = xla_options.jit(epoch_fn, donate_argnums=0, **shardings).lower(
        state, x, y, jnp.int32(0)).compile()
    evaluations = [_compile_evaluation(net, loss, prefix, data, eval_batch_size, policy, mesh,
                                       eval_layout, shardings, state, metrics, classification)
                   for prefix, data in (("val", validation_data), ("test", eval_data))
                   if data is not None]
    compile_seconds = time.perf_counter() - start

    done, rest = divmod(int(state.step), plan.num_batches)
    if rest:
        raise ValueError(f"fit: the state is at step {int(state.step)}, inside epoch {done + 1} "
                         f"({plan.num_batches} steps per epoch); continue from an epoch boundary")
    return run_epochs(state, lambda state, epoch: compiled(state, x, y, epoch),
                      first_epoch=done, epochs=epochs, reporter=reporter,
                      train_record=lambda sums, epoch: train_record(sums, epoch, plan.num_batches, on_nan,
                                                                     classification),
                      evaluate=lambda state: {k: v for run in evaluations for k, v in run(state).items()},
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
    held = int(round(x.shape[0] * validation_split))
    if not 0 < held < x.shape[0]:
        raise ValueError(f"fit: validation_split={validation_split} of {x.shape[0]} examples "
                         f"leaves {held} for validation and {x.shape[0] - held} for training")
    return (x[:-held], y[:-held]), (x[-held:], y[-held:])


def _compile_evaluation(net, loss, prefix, eval_data, eval_batch_size, policy, mesh, eval_layout,
                        shardings, state, metrics, classification) -> Callable[[TrainState], dict]:
    """``state -> {"<prefix>_loss": ..., ...}``, compiled for ``eval_data``."""
    x_eval, y_eval = map(jnp.asarray if mesh is None else np.asarray, eval_data)
    _check_data(net, state.params, x_eval, y_eval, "eval_data" if prefix == "test" else
                "validation_data")
    eval_size = min(eval_batch_size, x_eval.shape[0])
    if mesh is not None:  # whole on every device; each batch split over them (masked padding)
        x_eval, y_eval = parallel.replicate(mesh, (x_eval, y_eval))
        eval_size = parallel.round_up_to_devices(mesh, eval_size)
    compiled = xla_options.jit(make_evaluate(net, loss, x_eval.shape[0], eval_size,
                                             precision=policy, batch_sharding=eval_layout,
                                             metrics=metrics),
                               forward_rows=eval_size, **shardings).lower(
        state.params, state.model_state, x_eval, y_eval).compile()

    def evaluate_state(state):
        means = compiled(state.params, state.model_state, x_eval, y_eval).means(classification)
        return {f"{prefix}_{name}": value for name, value in means.items()}

    return evaluate_state
