"""The epoch driver shared by ``fit``, ``evaluate`` and ``fit_population``.

On the device: an epoch's shuffled order cut into fixed-size batches (the last one topped up
with real examples that carry weight zero, so every batch has one static shape and nothing
recompiles), one gather of the epoch's data, and a ``lax.scan`` over the batches that sums the
metrics and reports progress through ``jax.debug.callback``. On the host: :func:`run_epochs`,
the loop over epochs that times them, evaluates, builds the history records and calls the
callbacks with copies of the state they may keep. Callbacks every N steps need the host between
steps: the epoch then runs as segments of the same steps (:func:`segment_bounds`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.metrics import correct as correct_top_k
from jaxnet.train.shuffle import shuffled_order
from jaxnet.validate import positive_int


Metric = Callable[[jax.Array, jax.Array], jax.Array]  # (outputs, targets) -> (batch,) values


class Sums(NamedTuple):
    """Metric sums over examples (float32 scalars, or ``(K,)`` for K population members).

    ``extra`` holds the sums of user metrics by name (``None`` when there are none).
    """

    loss: jax.Array
    correct: jax.Array
    count: jax.Array
    skipped: jax.Array | None = None  # batches skipped for a non-finite loss (on_nan="skip" only)
    extra: dict[str, jax.Array] | None = None

    @staticmethod
    def zeros(count_skipped: bool = False, shape: tuple[int, ...] = (),
              metrics: Mapping[str, Metric] | None = None) -> Sums:
        zero = lambda: jnp.zeros(shape, jnp.float32)  # noqa: E731
        return Sums(zero(), zero(), zero(), zero() if count_skipped else None,
                    {name: zero() for name in metrics} if metrics else None)

    def __add__(self, other: Sums) -> Sums:  # None fields stay None: no work when not counted
        if self.extra is None:  # sums that track no metrics drop the step's (a population's)
            other = other._replace(extra=None)
        return jax.tree.map(jnp.add, self, other)

    def means(self, classification: bool = True) -> dict[str, float]:
        """``{"loss", ["accuracy",] *metrics}``: means over the examples counted (host floats).

        ``accuracy`` only for classification (integer labels, one logit per class)."""
        count = max(float(self.count), 1.0)
        means = {"loss": float(self.loss) / count}
        if classification:
            means["accuracy"] = float(self.correct) / count
        means.update({name: float(value) / count for name, value in (self.extra or {}).items()})
        return means


def is_classification(output: jax.ShapeDtypeStruct, targets) -> bool:
    """Whether outputs like ``output`` against ``targets`` are a classification task: integer
    labels with one more axis (the classes) on the outputs (never for pytrees of several)."""
    return (all(hasattr(a, "shape") and hasattr(a, "dtype") for a in (output, targets))
            and jnp.issubdtype(targets.dtype, jnp.integer)
            and len(output.shape) == len(targets.shape) + 1)


def batch_sums(logits: jax.Array, labels: jax.Array, losses: jax.Array,
               weights: jax.Array | None, metrics: Mapping[str, Metric] | None = None) -> Sums:
    """Weighted sums of loss and correct predictions for one batch.

    Args:
      logits: ``(batch, classes)`` outputs, or ``(batch, time, classes)`` for per-token labels;
      labels: ``(batch,)`` or ``(batch, time)`` integers (negative labels mark padded tokens,
        which count for nothing), or targets of another task, which count no correct
        predictions; losses: ``(batch,)``; weights: ``(batch,)`` or None.

    Per-token accuracy counts each example as the fraction of its real tokens predicted right.
    ``metrics`` are functions ``(logits, labels) -> (batch,)`` per-example values, summed with
    the same weights.
    """
    if weights is None:
        weights = jnp.ones(losses.shape, jnp.float32)
    if is_classification(logits, labels):
        right = correct_top_k(logits, labels).astype(jnp.float32)
        if labels.ndim > 1:  # per token: each example's fraction over its real tokens
            token_axes = tuple(range(1, labels.ndim))
            real = jnp.sum((labels >= 0).astype(jnp.float32), axis=token_axes)
            right = jnp.sum(right, axis=token_axes) / jnp.maximum(real, 1.0)
        correct = right
    else:
        correct = jnp.zeros(losses.shape, jnp.float32)
    extra = None
    if metrics:
        extra = {name: jnp.sum(weights * _per_example(name, fn(logits, labels), losses.shape))
                 for name, fn in metrics.items()}
    return Sums(jnp.sum(weights * losses.astype(jnp.float32)), jnp.sum(weights * correct),
                jnp.sum(weights), extra=extra)


def _per_example(name: str, values, shape) -> jax.Array:
    if jnp.shape(values) != shape:
        raise ValueError(f"metric {name!r}: expected one value per example, shape {shape}, got "
                         f"shape {tuple(jnp.shape(values))}")
    return jnp.asarray(values).astype(jnp.float32)


class EpochPlan(NamedTuple):
    """How ``n`` examples are cut into batches of ``batch_size``.

    Attributes:
      n, batch_size, num_batches: sizes (``num_batches = ceil(n / batch_size)``).
      weights: ``(num_batches, batch_size)`` float32, 0 for the padding of a partial last
        batch; ``None`` when ``batch_size`` divides ``n``.
    """

    n: int
    batch_size: int
    num_batches: int
    weights: np.ndarray | None

    @staticmethod
    def of(n: int, batch_size: int) -> EpochPlan:
        num_batches = max(math.ceil(n / batch_size), 1)
        weights = None
        if n % batch_size:
            weights = (np.arange(num_batches * batch_size) < n).astype(np.float32).reshape(
                num_batches, batch_size)
        return EpochPlan(n, batch_size, num_batches, weights)

    def batches(self, order, numpy=jnp):
        """``order`` (``(n,)`` indices) cut into ``(num_batches, batch_size)``, the last batch
        topped up from the start."""
        return numpy.resize(order, (self.num_batches * self.batch_size,)).reshape(
            self.num_batches, self.batch_size)


def epoch_order(run_key: jax.Array, epoch_index, plan: EpochPlan) -> jax.Array:
    """The ``(num_batches, batch_size)`` example indices of epoch ``epoch_index``: a shuffle
    drawn from ``fold_in(fold_in(run_key, 0), epoch_index)``, so any epoch replays exactly."""
    key = jax.random.fold_in(jax.random.fold_in(run_key, 0), epoch_index)
    return plan.batches(shuffled_order(key, plan.n))


def take_rows(data, indices: jax.Array):
    """``data`` (an array or a pytree of arrays with examples on axis 0) at ``indices``.

    One gather of a whole epoch followed by contiguous batches runs much faster on XLA:CPU
    than a gather per batch inside the loop (docs/performance.md, finding 1).
    """
    return jax.tree.map(lambda a: jnp.take(a, indices, axis=0, mode="clip"), data)


def scan_batches(step: Callable, carry, batches, plan: EpochPlan, sums: Sums, *,
                 progress: Callable | None = None, progress_every: int = 1,
                 pooled: Callable[[Sums], Sums] = lambda sums: sums, start=0):
    """``lax.scan`` of ``step(carry, batch, weights) -> (carry, Sums)`` over the epoch's batches.

    Args:
      batches: a pytree whose leaves have a leading ``(num_batches,)`` axis, or
        ``(length,)`` for a segment of the epoch: the plan's batches ``start .. start +
        length`` (``start`` an int32 scalar, traced or not).
      sums: the sums the batches' sums are added to (zeros, or those of earlier segments).
      progress: called on the host every ``progress_every`` steps with the step within the
        epoch and ``pooled(sums so far)``.

    Returns:
      ``(carry, sums)``.
    """
    length = jax.tree.leaves(batches)[0].shape[0]
    steps = jnp.arange(length, dtype=jnp.int32)
    weights = None if plan.weights is None else jnp.asarray(plan.weights)
    if length != plan.num_batches:  # a segment: its steps' indices and weights
        steps = steps + start
        if weights is not None:
            weights = jax.lax.dynamic_slice_in_dim(weights, start, length)

    def body(state, inputs):
        carry, sums = state
        i, batch, weights = inputs
        carry, batch_sums_ = step(carry, batch, weights)
        sums = sums + batch_sums_
        if progress is not None:
            jax.lax.cond((i + 1) % progress_every == 0,
                         lambda: jax.debug.callback(progress, i + 1, pooled(sums)), lambda: None)
        return (carry, sums), None

    (carry, sums), _ = jax.lax.scan(body, (carry, sums), (steps, batches, weights))
    return carry, sums


def kept_copy(tree):
    """A copy of ``tree``'s arrays that no later (donating) call can delete."""
    return jax.tree.map(jnp.copy, tree)


def run_epochs(state, run_epoch: Callable, *, first_epoch: int, epochs: int, reporter,
               train_record: Callable[[Any, int], dict], evaluate: Callable | None,
               examples: int, compile_seconds: float,
               on_epoch: Callable[[dict, Any], None] | None = None,
               display: Callable[[dict], dict] = lambda record: record,
               callbacks: Sequence[Any] = ()) -> tuple[Any, list[dict]]:
    """The host's loop over epochs ``first_epoch .. epochs - 1``.

    Args:
      state: what ``run_epoch(state, epoch_index) -> (state, sums)`` trains (donated to it).
      train_record: ``(sums, epoch) -> {"train_loss": ..., ...}``; it reads the sums, which
        waits for the epoch, and may raise (a non-finite loss).
      evaluate: ``state -> {"test_loss": ..., ...}``, or ``None``.
      examples: examples trained on per epoch (for ``examples_per_second``).
      on_epoch: ``on_epoch(record, state)`` after each epoch, with a copy of the state.
      display: the record as the progress reporter shows it.
      callbacks: objects with ``on_epoch_end(record, state) -> bool`` (``True`` stops after
        this epoch) and optionally ``on_train_end(state) -> state`` (which may replace the
        final state, e.g. with the best one kept); they are called in order, before
        ``on_epoch``, and share one copy of the state with it. Step callbacks
        (:func:`step_interval`) are ``run_epoch``'s to call.

    Returns:
      ``(state, history)``: one record per epoch with ``epoch``, the train and test metrics,
      ``seconds`` and ``examples_per_second``; the first also has ``compile_seconds``.
    """
    history: list[dict] = []
    with reporter:
        for epoch in range(first_epoch, epochs):
            reporter.start_epoch(epoch + 1)
            start = time.perf_counter()
            state, sums = run_epoch(state, jnp.int32(epoch))
            record = {"epoch": epoch + 1, **train_record(sums, epoch)}
            train_seconds = time.perf_counter() - start
            if evaluate is not None:
                record.update(evaluate(state))
            record.update(seconds=time.perf_counter() - start,
                          examples_per_second=examples / train_seconds)
            if not history:
                record["compile_seconds"] = compile_seconds
            history.append(record)
            reporter.end_epoch(display(record))
            kept = kept_copy(state) if on_epoch is not None or callbacks else None
            stops = [bool(callback.on_epoch_end(record, kept)) for callback in callbacks
                     if hasattr(callback, "on_epoch_end")]
            if on_epoch is not None:  # after the callbacks: it may read what they keep
                on_epoch(record, kept)
            if any(stops):
                break
    for callback in callbacks:
        if hasattr(callback, "on_train_end"):
            state = callback.on_train_end(state)
    return state, history


# --- every N steps: an epoch run in segments ----------------------------------------------------

def step_interval(callbacks: Sequence[Any]) -> int | None:
    """The steps between the points where ``callbacks`` must be called: the greatest common
    divisor of the ``every_steps`` of those that have one (``None`` when none has).

    A callback with ``every_steps = N`` has ``on_step_end(step, record, state)``, called after
    steps ``N, 2N, ...`` of every epoch (counted from the epoch's start; its end is
    ``on_epoch_end``'s) with the global step, ``{"epoch", "step", "train_loss", ...}`` (the
    means over the epoch's steps so far) and a copy of the state it may keep.
    """
    every = []
    for callback in callbacks:
        if getattr(callback, "every_steps", None) is None:
            continue
        name = type(callback).__name__
        every.append(positive_int(name, "every_steps", callback.every_steps))
        if not callable(getattr(callback, "on_step_end", None)):
            raise TypeError(f"{name}: has every_steps={callback.every_steps} but no "
                            "on_step_end(step, record, state) method")
    return math.gcd(*every) if every else None


def segment_bounds(start: int, stop: int, every: int | None) -> list[tuple[int, int]]:
    """``[(first, length), ...]``: steps ``start .. stop - 1`` of an epoch cut after every
    multiple of ``every`` (one segment when ``every`` is ``None``)."""
    cuts = [start, *(k for k in range(start + 1, stop) if every and k % every == 0), stop]
    return [(a, b - a) for a, b in zip(cuts, cuts[1:])]


def call_step_callbacks(callbacks: Sequence[Any], step_in_epoch: int, record: dict,
                        state) -> None:
    """Calls ``on_step_end(record["step"], record, state)`` of the callbacks due after step
    ``step_in_epoch`` of the epoch, with one copy of ``state`` that they may keep."""
    due = [c for c in callbacks if getattr(c, "every_steps", None) is not None
           and step_in_epoch % c.every_steps == 0]
    if due:
        kept = kept_copy(state)
        for callback in due:
            callback.on_step_end(record["step"], record, kept)
