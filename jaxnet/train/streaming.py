"""Training on data larger than memory: memory-mapped arrays and iterables of batches.

The device loop stays: one compiled program (:func:`make_run_chunk`) runs a *chunk* of ``K``
steps, a ``lax.scan`` over a ``(K, batch, ...)`` stack, and a host thread (:class:`ChunkQueue`)
reads the next chunk from disk or from the iterable and ``jax.device_put``s it while the
current chunk computes. The queue is bounded and the host waits for chunk ``i - 1`` before it
dispatches chunk ``i + 1``, so at most a few chunks are alive at once, whatever the data's size.

Shapes stay static: a partial last batch is topped up with rows of weight zero, and a partial
last chunk with whole batches of weight zero, which the step skips (``lax.cond``), so neither
the optimizer nor the step count sees them.

Order: a memory-mapped ``(x, y)`` is cut into windows of ``K * batch`` consecutive rows (each
chunk reads one window, so reads stay local); ``shuffle="window"`` (default) permutes the windows and the rows within
each window every epoch, drawn from ``fold_in(fold_in(run_key, 2), epoch)``, so runs replay
exactly; ``"global"`` uses the resident ``fit``'s own permutation (the same batches, by random
reads); ``"none"`` keeps the file's order. An iterable is used in its own order, once per epoch.

The host side (what streams, the chunk sources, the thread) is :mod:`jaxnet.train.chunks`. A
streaming run streams its evaluation data too, arrays included, in order.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet._xla import options as xla_options
from jaxnet.losses import check_labels, is_model_loss, softmax_cross_entropy
from jaxnet.nn.layer import Layer, Params, State, state_or_empty
from jaxnet.precision import Policy, check_params, get_policy, get_training_policy
from jaxnet.progress import make_progress
from jaxnet.train.chunks import (THREAD_NAME, ChunkQueue, IterableSource, MemmapSource,  # noqa: F401
                                 _is_pair, default_chunk_steps, is_memmap, is_streaming,
                                 load_memmap)
from jaxnet.train.engine import EpochPlan, Metric, Sums, run_epochs, scan_batches
from jaxnet.train.setup import (as_arrays, initial_state, output_spec, rows_spec, task_metrics,
                                train_record)
from jaxnet.train.state import (ON_NAN, LossFn, TrainState, evaluate_batch, metric_names,
                                train_batch)
from jaxnet.validate import positive_int

__all__ = ["THREAD_NAME", "ChunkQueue", "IterableSource", "MemmapSource", "evaluate_streaming",
           "fit_streaming", "is_memmap", "is_streaming", "load_memmap", "make_evaluate_chunk",
           "make_run_chunk"]

SHUFFLES = ("window", "global", "none")


# --- the compiled programs ----------------------------------------------------------------

def make_run_chunk(net: Layer, optimizer: optax.GradientTransformation, loss: LossFn,
                   chunk_steps: int, batch_size: int, *, on_nan: str = "stop",
                   precision: str | Policy | None = None,
                   metrics: Mapping[str, Metric] | None = None, idle_steps: bool = True,
                   augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None):
    """``run_chunk(state, sums, xs, ys, weights) -> (state, sums)``: ``chunk_steps`` train
    steps (:func:`jaxnet.train.train_batch`) in one ``lax.scan``, adding to ``sums``.

    Shapes:
      xs: ``(chunk_steps, batch_size, *example)``; ys: ``(chunk_steps, batch_size, ...)``
      (either may be a pytree of such arrays); weights: ``(chunk_steps, batch_size)`` float32,
      0 for padding rows.

    ``idle_steps``: compile in the skip of batches whose weights are all 0 (a short chunk's
    filler), which then neither update the state nor count a step. ``augment(key, x) -> x``
    (:mod:`jaxnet.augment`) transforms each batch's inputs on the device (see
    :func:`jaxnet.train.train_batch`).
    """
    def step(state, batch, weights, zero):
        def train(state):
            return train_batch(net, optimizer, loss, state, *batch, weights, on_nan,
                               precision=precision, metrics=metrics, augment=augment)
        if not idle_steps:
            return train(state)
        return jax.lax.cond(jnp.sum(weights) > 0, train, lambda state: (state, zero), state)

    def run_chunk(state, sums, xs, ys, weights):
        plan = EpochPlan(chunk_steps * batch_size, batch_size, chunk_steps, weights)
        zero = jax.tree.map(jnp.zeros_like, sums)  # an idle step's sums: nothing
        return scan_batches(lambda state, batch, w: step(state, batch, w, zero), state,
                            (xs, ys), plan, sums)

    return run_chunk


def make_evaluate_chunk(net: Layer, loss: LossFn, chunk_steps: int, batch_size: int,
                        precision: str | Policy | None = None,
                        metrics: Mapping[str, Metric] | None = None):
    """``evaluate_chunk(params, model_state, sums, xs, ys, weights) -> sums`` (shapes as
    :func:`make_run_chunk`'s); batches of weight 0 add nothing."""
    def evaluate_chunk(params, model_state, sums, xs, ys, weights):
        def step(carry, batch, w):
            return carry, evaluate_batch(net, loss, params, model_state, *batch, w,
                                         precision=precision, metrics=metrics)

        plan = EpochPlan(chunk_steps * batch_size, batch_size, chunk_steps, weights)
        return scan_batches(step, (), (xs, ys), plan, sums)[1]

    return evaluate_chunk


def _drive(chunks: Iterator, run: Callable, carry, *, sums: Callable, depth: int,
           check=None, on_chunk: Callable | None = None):
    """Runs ``carry = run(carry, *chunk)`` over the device chunks.

    It waits for chunk ``i - 1``'s ``sums(carry)`` (which must not be donated) before it
    dispatches chunk ``i + 1``: dispatch is asynchronous, and without the wait the host would
    queue every chunk of the epoch on the device, each holding its data.
    """
    previous = None
    with ChunkQueue(chunks, depth, check) as device_chunks:
        for index, chunk in enumerate(device_chunks):
            carry = run(carry, *chunk)
            if previous is not None:
                jax.block_until_ready(previous)
                if on_chunk is not None:
                    on_chunk(index, previous)
            previous = sums(carry)
    return carry


def _source(data, batch_size: int, chunk_steps: int | None, shuffle: str, what: str):
    if _is_pair(data):
        x, y = as_arrays(tuple(data), lambda a: a if is_memmap(a) else np.asarray(a))
        rows = len(jax.tree.leaves(x)[0])
        steps = chunk_steps or default_chunk_steps((x, y), max(min(batch_size, rows), 1))
        return MemmapSource(x, y, batch_size, steps, shuffle, what)
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{what}: expected (x, y) arrays or an iterable of (x, y) batches, got "
                        f"{type(data).__name__}")
    return IterableSource(data, chunk_steps)


def _label_check(net, loss, params, example, what):
    """A host check of each chunk's integer labels (range), like the resident path's."""
    x, y = example
    if is_model_loss(loss) or not (hasattr(y, "dtype") and np.issubdtype(y.dtype, np.integer)):
        return None
    out = output_spec(net, params, x)
    if out.ndim != 2:
        return None
    return lambda chunk: check_labels(chunk[1], out.shape[-1], f"{what} labels")


# --- fit and evaluate ----------------------------------------------------------------------

class _Examples:
    """Examples per epoch for ``run_epochs``'s ``examples_per_second``, read when it divides:
    an iterable's size is known only once its epoch has run."""

    def __init__(self, source):
        self.source = source

    def __truediv__(self, seconds: float) -> float:
        return self.source.epoch_size()[0] / seconds


def _unsupported(what: str, **options) -> None:
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise ValueError(f"{what}: {', '.join(given)} cannot be combined with streaming data "
                         "(a memory-mapped array or an iterable of batches); pass arrays")


def fit_streaming(net: Layer, params: Params | TrainState, optimizer: optax.GradientTransformation,
                  train_data, *, epochs: int, batch_size: int = 128,
                  loss: LossFn = softmax_cross_entropy, eval_data=None,
                  model_state: State | None = None, key: jax.Array | None = None,
                  eval_batch_size: int = 1024, progress: bool | None = None,
                  progress_every: int | None = None,
                  on_epoch: Callable[[dict, TrainState], None] | None = None,
                  on_nan: str = "stop", precision: str | Policy | None = None,
                  mesh=None, num_examples: int | None = None,
                  metrics: Mapping[str, Metric] | None = None, validation_data=None,
                  validation_split: float | None = None, callbacks: Sequence[Any] = (),
                  chunk_steps: int | None = None, prefetch: int = 2,
                  shuffle: str = "window",
                  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                  rules=None) -> tuple[TrainState, list[dict]]:
    """:func:`jaxnet.train.fit` for data streamed to the device chunk by chunk.

    ``fit`` calls it for a memory-mapped ``train_data`` or an iterable of batches; the
    arguments and the history records are ``fit``'s (``mesh``, ``rules``, ``num_examples``
    and ``validation_split`` are not supported; ``progress_every`` is ignored: progress is
    reported once per chunk).

    Args:
      train_data: ``(x, y)`` arrays, typically memory-mapped (``np.load(path, mmap_mode="r")``,
        :func:`load_memmap`), or an iterable of ``(x, y)`` numpy batches (a list, a generator,
        a ``grain`` DataLoader), iterated once per epoch (a one-shot iterator allows one
        epoch). Its first batch's rows are the batch size (``batch_size`` is then ignored).
      eval_data, validation_data: arrays (moved to the device) or streaming data.
      chunk_steps: steps per compiled chunk (default: about 16 MiB of data, at most 64).
      prefetch: device chunks the host thread may hold ready (2: double buffering).
      shuffle: for ``(x, y)`` arrays: ``"window"``, ``"global"`` or ``"none"`` (module
        docstring).
      augment: ``augment(key, x) -> x`` applied to each training batch on the device
        (:mod:`jaxnet.augment`, e.g. ``random_flip``).

    Shapes:
      x: ``(n, *example)``; y: ``(n,)`` integer labels or ``(n, ...)`` targets; each chunk on
      the device: ``(chunk_steps, batch_size, *example)``.
    """
    positive_int("fit", "epochs", epochs)
    positive_int("fit", "batch_size", batch_size)
    positive_int("fit", "prefetch", prefetch)
    if chunk_steps is not None:
        positive_int("fit", "chunk_steps", chunk_steps)
    if on_nan not in ON_NAN:
        raise ValueError(f"fit: on_nan must be one of {', '.join(ON_NAN)}; got {on_nan!r}")
    if shuffle not in SHUFFLES:
        raise ValueError(f"fit: shuffle must be one of {', '.join(SHUFFLES)}; got {shuffle!r}")
    _unsupported("fit", mesh=mesh, rules=rules, num_examples=num_examples,
                 validation_split=validation_split)
    policy = get_training_policy(precision, "fit")
    check_params(policy, params.params if isinstance(params, TrainState) else params, "fit")
    source = _source(train_data, batch_size, chunk_steps, shuffle, "train_data")
    x1, y1 = source.example
    state = initial_state(net, optimizer, params, model_state, key, x1)
    metrics, classification = task_metrics(net, loss, metrics, state.params, x1, y1, "fit")
    names = metric_names(net, loss, metrics, state.params, state.model_state, x1, y1, True)
    check = _label_check(net, loss, state.params, source.example, "train_data")
    steps, rows = source.chunk_steps, source.batch_size
    zero = lambda: Sums.zeros(on_nan == "skip", metrics=names)  # noqa: E731

    start = time.perf_counter()
    run_chunk = xla_options.jit(make_run_chunk(net, optimizer, loss, steps, rows, on_nan=on_nan,
                                               precision=policy, metrics=metrics,
                                               idle_steps=source.has_idle_steps,
                                               augment=augment),
                                donate_argnums=0)  # not the sums: the host waits on them
    compiled = xla_options.compile(run_chunk, state, zero(), *_chunk_specs(x1, y1, steps, rows))
    evaluations = []
    for prefix, data in (("val", validation_data), ("test", eval_data)):
        if data is not None:  # arrays too: a streaming run's evaluation data may be large
            what = "eval_data" if prefix == "test" else "validation_data"
            evaluations.append(_streaming_evaluation(
                net, state, loss, prefix, _source(data, eval_batch_size, chunk_steps, "none",
                                                  what),
                policy, metrics, classification, prefetch))
    compile_seconds = time.perf_counter() - start

    done = 0
    if int(state.step):
        if source.steps_per_epoch is None:
            raise ValueError("fit: continuing from a TrainState needs the steps per epoch; pass "
                             "an iterable with a len()")
        done, rest = divmod(int(state.step), source.steps_per_epoch)
        if rest:
            raise ValueError(f"fit: the state is at step {int(state.step)}, inside epoch "
                             f"{done + 1} ({source.steps_per_epoch} steps per epoch); continue "
                             "from an epoch boundary")
    reporter = make_progress(progress, epochs, source.steps_per_epoch or 0, classification)

    def run_epoch(state, epoch):
        chunks = source.chunks(state.key, int(epoch))
        state, sums = _drive(chunks, lambda carry, *chunk: compiled(*carry, *chunk),
                             (state, zero()), sums=lambda carry: carry[1], depth=prefetch,
                             check=check,
                             on_chunk=lambda i, sums: reporter.update(i * steps, sums))
        if source.epoch_size()[1] == 0:
            raise ValueError(f"fit: train_data yielded no batches in epoch {int(epoch) + 1} (a "
                             "one-shot iterator allows one epoch; pass a re-iterable such as "
                             "a list or a grain DataLoader)")
        return state, sums

    def epoch_record(sums, epoch):
        return train_record(sums, epoch, source.epoch_size()[1], on_nan, classification)

    return run_epochs(state, run_epoch, first_epoch=done, epochs=epochs, reporter=reporter,
                      train_record=epoch_record,
                      evaluate=lambda state: {k: v for run in evaluations for k, v in run(state).items()},
                      examples=_Examples(source), compile_seconds=compile_seconds,
                      on_epoch=on_epoch, callbacks=callbacks)


def _chunk_specs(x1, y1, steps: int, rows: int):
    """The device chunks' specs, as ``device_put`` will make them."""
    stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct((steps, *a.shape), a.dtype),
                           rows_spec((x1, y1), rows))
    return (*stacked, jax.ShapeDtypeStruct((steps, rows), jnp.float32))


def _streaming_evaluation(net, template: TrainState, loss, prefix, source, policy, metrics,
                          classification, prefetch) -> Callable[[TrainState], dict]:
    """``state -> {"<prefix>_loss": ..., ...}`` over a streaming ``source``, compiled once
    (``template``: a state of the shapes to come)."""
    check = _label_check(net, loss, template.params, source.example,
                         {"test": "eval_data", "val": "validation_data"}.get(prefix, "data"))
    x1, y1 = source.example
    names = metric_names(net, loss, metrics, template.params, template.model_state, x1, y1, False)
    evaluate_chunk = xla_options.jit(make_evaluate_chunk(net, loss, source.chunk_steps,
                                                         source.batch_size, policy, metrics),
                                     forward_rows=source.batch_size)

    def evaluate_state(state):
        sums = _drive(source.chunks(None, 0),
                      lambda sums, *chunk: evaluate_chunk(state.params, state.model_state, sums,
                                                          *chunk),
                      Sums.zeros(metrics=names), sums=lambda sums: sums, depth=prefetch,
                      check=check)
        if source.epoch_size()[1] == 0:
            raise ValueError(f"{prefix or 'evaluate'}: the data yielded no batches (a one-shot "
                             "iterator allows one pass)")
        return {f"{prefix}_{name}": value for name, value in sums.means(classification).items()}

    return evaluate_state


def evaluate_streaming(net: Layer, params: Params, data, *, model_state: State | None = None,
                       loss: LossFn = softmax_cross_entropy, batch_size: int = 1024,
                       precision: str | Policy | None = None,
                       metrics: Mapping[str, Metric] | None = None,
                       chunk_steps: int | None = None, prefetch: int = 2,
                       mesh=None, rules=None) -> dict[str, float]:
    """:func:`jaxnet.train.evaluate` for a memory-mapped ``(x, y)`` or an iterable of
    ``(x, y)`` batches (see :func:`fit_streaming`), in order, chunk by chunk (``mesh`` and
    ``rules`` are not supported).

    Shapes:
      x: ``(n, *example)``; y: ``(n,)`` labels or ``(n, ...)`` targets (either may be a
      pytree of such arrays).

    Returns:
      ``{"loss": float, ["accuracy": float,] **metrics}``.
    """
    _unsupported("evaluate", mesh=mesh, rules=rules)
    check_params(get_policy(precision), params, "evaluate")
    model_state = state_or_empty(net, model_state, "evaluate")
    source = _source(data, batch_size, chunk_steps, "none", "data")
    metrics, classification = task_metrics(net, loss, metrics, params, *source.example,
                                           "evaluate")
    state = TrainState(params, model_state, None, None, None)
    run = _streaming_evaluation(net, state, loss, "", source, get_policy(precision), metrics,
                                classification, prefetch)
    return {name[1:]: value for name, value in run(state).items()}
