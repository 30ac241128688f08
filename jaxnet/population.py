"""Population training: K networks trained at once, in one compiled program, by ``vmap``.

A population is K ``TrainState``s stacked on a leading member axis. Members differ in seed
(initialisation, dropout, and data order), in optimizer hyperparameters held in the optimizer
state (``optax.inject_hyperparams``: learning rate, weight decay, ...), in dropout rate and in
initial scale. All of these are arrays in the state, so new values never recompile.

Each epoch is one ``lax.scan`` over batches whose body is the ``vmap`` of
:func:`jaxnet.train.train_batch` over the members: the members' small matrix products become
batched ones, which is what makes many tiny networks fast on a CPU (one program, one dispatch
per epoch). A member whose loss becomes NaN keeps training (as NaN) without disturbing the
others: a sweep is expected to contain learning rates that diverge.

On a mesh (:func:`jaxnet.sharding.make_mesh`, ``fit_population(..., mesh=mesh)``) the members
are split over ``data`` (K must be a multiple of its size) and each member's params over
``fsdp`` and ``model`` by :func:`jaxnet.sharding.param_specs`, its optimizer state following
them (:func:`population_shardings`); the training data is whole on every device. The epoch is
compiled for that layout and XLA inserts the collectives; the results equal those on one
device up to float rounding.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxnet.data_parallel as data_parallel
import jaxnet.sharding as sharding
from jaxnet._xla import options as xla_options
from jaxnet.nn.layer import Layer, apply_child, init_child
from jaxnet.validate import positive_int
from jaxnet.losses import softmax_cross_entropy
from jaxnet.progress import make_progress
from jaxnet.train.callbacks import VALIDATION, best_index, default_mode
from jaxnet.train.engine import EpochPlan, Sums, epoch_order, run_epochs, scan_batches, take_rows
from jaxnet.train.fit import _check_data, make_evaluate
from jaxnet.train.state import LossFn, TrainState, init_train_state, train_batch


EPOCH_COPY_BYTES = 256 * 2**20  # largest shuffled copy of the epoch gathered at once


class Population(NamedTuple):
    """K training states on a leading member axis; a pytree.

    Attributes:
      members: a ``TrainState`` whose every leaf has a leading ``(K,)`` axis.
      drop_rate: ``(K,)`` float32 dropout rates replacing the network's own, or ``None``.
    """

    members: TrainState
    drop_rate: jax.Array | None = None

    @property
    def size(self) -> int:
        """K, the number of members."""
        return self.members.step.shape[0]

    def member(self, i: int) -> TrainState:
        """Member ``i``'s ``TrainState`` (usable with ``fit``, ``predict``, checkpoints)."""
        if not -self.size <= i < self.size:
            raise IndexError(f"Population.member: index {i} out of range for {self.size} members")
        return jax.tree.map(lambda leaf: leaf[i], self.members)


def set_hyperparams(opt_state: optax.OptState, values: Mapping[str, Any]) -> optax.OptState:
    """``opt_state`` with the named ``optax.inject_hyperparams`` values replaced.

    Args:
      opt_state: the state of an optimizer built with ``optax.inject_hyperparams``
        (possibly inside ``optax.chain``).
      values: hyperparameter name to value (a scalar, or traced under ``vmap``).

    Raises:
      ValueError: a name is not an injected hyperparameter of this optimizer; the message
        lists the ones it has.
    """
    is_injected = lambda node: isinstance(node, optax.InjectStatefulHyperparamsState)
    found: set[str] = set()

    def replace(node):
        if not is_injected(node):
            return node
        hyperparams = dict(node.hyperparams)
        for name in set(values) & set(hyperparams):
            hyperparams[name] = jnp.asarray(values[name], hyperparams[name].dtype)
            found.add(name)
        return node._replace(hyperparams=hyperparams)

    new_state = jax.tree.map(replace, opt_state, is_leaf=is_injected)
    if missing := sorted(set(values) - found):
        available = sorted({name for node in jax.tree.leaves(opt_state, is_leaf=is_injected)
                            if is_injected(node) for name in node.hyperparams})
        raise ValueError(
            f"set_hyperparams: {missing} not injected hyperparameters of this optimizer "
            f"(available: {available or 'none; build it with optax.inject_hyperparams'})")
    return new_state


def _member_values(name: str, values, size: int) -> jax.Array:
    array = np.asarray(values, np.float32)
    if array.shape != (size,):
        raise ValueError(f"init_population: {name} needs one value per member, shape ({size},); "
                         f"got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"init_population: {name} has values that are not finite: {array.tolist()}")
    return jnp.asarray(array)


def _member_sharding(mesh: Mesh, spec: PartitionSpec = PartitionSpec()) -> NamedSharding:
    """An array with a leading member axis: that axis split over ``data`` (when the mesh has
    it), the others by ``spec``."""
    axis = sharding.DATA_AXIS if sharding.DATA_AXIS in mesh.axis_names else None
    return NamedSharding(mesh, PartitionSpec(axis, *spec))


def population_shardings(population: Population, mesh: Mesh,
                         rules: sharding.ShardingRules | Mapping | None = None, *,
                         what: str = "population_shardings") -> Population:
    """The ``NamedSharding`` of every array of ``population`` on ``mesh``.

    The member axis is split over ``data``: each ``data`` group of devices holds ``K / data``
    members. Each member's params are laid out over ``fsdp`` and ``model`` by
    :func:`jaxnet.sharding.param_specs` (on one member's shapes), its optimizer state following
    them (:func:`jaxnet.sharding.state_specs`); every other array (model state, step, key, step
    counts, injected hyperparameters, dropout rates) is split by member only.

    Args:
      population: a :class:`Population`, or its ``jax.eval_shape`` (shapes are enough); every
        leaf has a leading ``(K,)`` member axis.
      mesh: from :func:`jaxnet.sharding.make_mesh` (a 1-D ``data_mesh`` splits members only).
      rules: :class:`jaxnet.sharding.ShardingRules` or ``{pattern: spec}`` overrides, for one
        member's params (dotted names and shapes without the member axis).
      what: the function named in error messages.

    Returns:
      A :class:`Population` like ``population`` whose leaves are ``NamedSharding``: a member
      param's is ``P("data", *its param_specs spec)``.

    Raises:
      ValueError: K is not a multiple of the mesh's ``data`` size, or ``rules`` do not fit
        (see :func:`jaxnet.sharding.param_specs`).
    """
    data = sharding.axis_size(mesh, sharding.DATA_AXIS)
    if population.size % data:
        raise ValueError(
            f"{what}: {population.size} members do not split over data={data} devices; use a "
            f"multiple of {data} members, or a mesh whose data size divides {population.size} "
            f"(e.g. make_mesh(data=1, fsdp=..., model=...))")
    member = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf)[1:], leaf.dtype),
                          population.members)
    specs = sharding.state_specs(member, sharding.param_specs(member.params, mesh, rules))
    members = jax.tree.map(lambda spec: _member_sharding(mesh, spec), specs,
                           is_leaf=lambda node: isinstance(node, PartitionSpec))
    return Population(members, None if population.drop_rate is None else _member_sharding(mesh))


def _check_rules(what: str, mesh: Mesh | None, rules) -> None:
    if rules is not None and mesh is None:
        raise ValueError(f"{what}: rules lay params out over a mesh; pass mesh too "
                         f"(jaxnet.sharding.make_mesh), or leave rules out")


def _placed_copy(tree, shardings):
    """``tree``'s arrays laid out by ``shardings`` (a matching tree) in buffers of their own,
    which a donating call may take: arrays already so laid out are copied, others placed by
    :func:`jaxnet.sharding.place` (host values cut, arrays on other devices moved)."""
    def leaf_copy(leaf, target: NamedSharding):
        if isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(target, leaf.ndim):
            return jnp.copy(leaf)
        return sharding.place(leaf, target)

    return jax.tree.map(leaf_copy, tree, shardings)


def _data_arrays(data: tuple[Any, Any], mesh: Mesh | None) -> tuple[jax.Array, jax.Array]:
    """``(x, y)`` on the default device, or with ``mesh`` whole on each of its devices."""
    if mesh is None:
        return tuple(map(jnp.asarray, data))
    return tuple(sharding.place(np.asarray(a), data_parallel.replicated(mesh)) for a in data)


def init_population(net: Layer, optimizer: optax.GradientTransformation, x, *,
                    seeds: Sequence[int], hyperparams: Mapping[str, Sequence[float]] | None = None,
                    drop_rate: Sequence[float] | None = None,
                    init_scale: Sequence[float] | None = None, mesh: Mesh | None = None,
                    rules: sharding.ShardingRules | Mapping | None = None) -> Population:
    """K fresh members at step 0, initialised in one compiled program.

    Member ``i`` is what ``jaxnet.app.run.train`` starts from with ``seed=seeds[i]``: its init key
    and run key are ``jax.random.split(jax.random.key(seeds[i]))``. With ``mesh`` the members
    are created laid out by :func:`population_shardings`, each device computing only its
    shards, with the same values as without.

    Args:
      net: the network.
      optimizer: an optax transformation; per-member values need it built with
        ``optax.inject_hyperparams`` (e.g. ``inject_hyperparams(optax.adamw)(learning_rate=1e-3,
        weight_decay=0.0)``).
      x: an example batch (``x_train[:1]``), its shape, or a ``jax.ShapeDtypeStruct``.
      seeds: K integer seeds, one per member (repeats allowed: a hyperparameter sweep at one seed).
      hyperparams: injected hyperparameter name to K values.
      drop_rate: K dropout rates in ``[0, 1)`` replacing those of the network's Dropout layers
        (which must be built with a nonzero rate for the override to take effect).
      init_scale: K factors multiplying every initial parameter of each member.
      mesh: a ``jax.sharding.Mesh`` from :func:`jaxnet.sharding.make_mesh` to create the
        members on (K must be a multiple of its ``data`` size); ``None``: the default device.
      rules: with ``mesh``: how each member's params are laid out, as for
        :func:`jaxnet.sharding.param_specs`.

    Returns:
      A :class:`Population` of K members; every leaf has a leading ``(K,)`` axis.

    Raises:
      ValueError: bad seeds or per-member values, hyperparameters the optimizer does not
        inject, ``rules`` without ``mesh``, or K not a multiple of the mesh's ``data`` size.
    """
    _check_rules("init_population", mesh, rules)
    seeds = np.asarray(seeds)
    if seeds.ndim != 1 or seeds.size == 0 or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(f"init_population: seeds must be a non-empty list of integers; got "
                         f"{seeds.tolist()!r}")
    size = seeds.size
    values = {name: _member_values(name, v, size) for name, v in (hyperparams or {}).items()}
    scale = None if init_scale is None else _member_values("init_scale", init_scale, size)
    rates = None if drop_rate is None else _member_values("drop_rate", drop_rate, size)
    if rates is not None and not bool(jnp.all((rates >= 0) & (rates < 1))):
        raise ValueError(f"init_population: drop_rate values must be in [0, 1); got {rates.tolist()}")
    set_hyperparams(jax.eval_shape(optimizer.init, net.init(jax.random.key(0), x)),
                    {name: 0.0 for name in values})  # a clear error before compiling

    def one(seed, hyper, factor):
        init_key, run_key = jax.random.split(jax.random.key(seed))
        params, model_state = net.init_with_state(init_key, x)
        if factor is not None:
            params = jax.tree.map(lambda p: p * factor.astype(p.dtype), params)
        state = init_train_state(net, optimizer, params, model_state=model_state, key=run_key)
        return state._replace(opt_state=set_hyperparams(state.opt_state, hyper))

    build, inputs = jax.vmap(one), (jnp.asarray(seeds, jnp.int32), values, scale)
    if mesh is None:
        return Population(jax.jit(build)(*inputs), rates)
    shardings = population_shardings(Population(jax.eval_shape(build, *inputs), rates), mesh,
                                     rules, what="init_population")
    members = jax.jit(build, out_shardings=shardings.members)(*inputs)
    return Population(members, _placed_copy(rates, shardings.drop_rate))


def make_population_epoch(net: Layer, optimizer: optax.GradientTransformation, loss: LossFn,
                          n: int, batch_size: int, *, shared_order: bool = True,
                          progress: Callable | None = None, progress_every: int = 0,
                          precision: str | None = None):
    """A function ``epoch(population, x, y, epoch_index) -> (population, Sums)`` for K members.

    The returned ``Sums`` hold ``(K,)`` arrays, one entry per member. With ``shared_order`` all
    members see the batches in member 0's order (one gather of the epoch); otherwise each member
    shuffles with its own key, as it would alone, at the cost of K gathered copies of the epoch.
    ``progress`` is called on the host every ``progress_every`` steps with the step in the epoch
    and the sums over all members (NaN losses left out). When the shuffled copies of the epoch
    would take more than ``EPOCH_COPY_BYTES``, each step gathers its own batches instead.
    ``precision`` is passed to :func:`jaxnet.train.train_batch`.
    """
    plan = EpochPlan.of(n, batch_size)
    data_axis = None if shared_order else 0
    step = jax.vmap(lambda state, xb, yb, w, rate: train_batch(
        net, optimizer, loss, state, xb, yb, w, drop_rate=rate, precision=precision),
        in_axes=(0, data_axis, data_axis, None, 0))

    def epoch(population, x, y, epoch_index):
        members, rates = population
        if shared_order:  # (batches, batch)
            order = epoch_order(members.key[0], epoch_index, plan)
        else:  # (batches, K, batch)
            order = jnp.swapaxes(jax.vmap(epoch_order, (0, None, None))(
                members.key, epoch_index, plan), 0, 1)
        epoch_bytes = order.size * math.prod(x.shape[1:]) * x.dtype.itemsize
        if epoch_bytes <= EPOCH_COPY_BYTES:  # one gather of the whole epoch (fast), as in fit
            batches, fetch = take_rows((x, y), order), lambda batch: batch
        else:  # K shuffled copies would not fit comfortably: gather each step's batches
            batches, fetch = order, lambda indices: take_rows((x, y), indices)
        members, sums = scan_batches(
            lambda members, batch, weights: step(members, *fetch(batch), weights, rates),
            members, batches, plan, Sums.zeros(shape=members.step.shape),
            progress=progress, progress_every=progress_every, pooled=_pooled)
        return Population(members, rates), sums

    return epoch, plan.num_batches


def _pooled(sums: Sums) -> Sums:
    """Sums over the members whose loss is finite (for the progress bar)."""
    finite = jnp.isfinite(sums.loss)
    return Sums(*(jnp.sum(jnp.where(finite, s, 0.0)) for s in sums[:3]))


def _per_member(sums: Sums) -> dict[str, list[float]]:
    count = np.maximum(np.asarray(sums.count, np.float64), 1.0)
    return {"loss": (np.asarray(sums.loss, np.float64) / count).tolist(),
            "accuracy": (np.asarray(sums.correct, np.float64) / count).tolist()}


def fit_population(net: Layer, population: Population, optimizer: optax.GradientTransformation,
                   train_data: tuple[Any, Any], *, epochs: int, batch_size: int = 128,
                   loss: LossFn = softmax_cross_entropy, eval_data: tuple[Any, Any] | None = None,
                   shared_order: bool = True, eval_batch_size: int = 1024,
                   progress: bool | None = None, progress_every: int | None = None,
                   on_epoch: Callable[[dict, Population], None] | None = None,
                   precision: str | None = None,
                   validation_data: tuple[Any, Any] | None = None, mesh: Mesh | None = None,
                   rules: sharding.ShardingRules | Mapping | None = None
                   ) -> tuple[Population, list[dict]]:
    """Trains every member of ``population``, each epoch one compiled program for all of them.

    Args:
      net: the network every member shares.
      population: from :func:`init_population` (or a previous ``fit_population``; then
        ``epochs`` counts the epochs already done).
      optimizer: the optimizer ``population`` was initialised with.
      train_data: ``(x, y)`` with ``x (n, *example)``, ``y (n,)``; shared by all members.
      epochs: total number of epochs.
      batch_size: examples per step for each member (capped at ``n``).
      loss: per-example loss ``(logits, y) -> (batch,)``.
      eval_data: optional test ``(x, y)``, evaluated for every member after each epoch.
      shared_order: all members see the same batches (member 0's shuffle); ``False`` shuffles
        each member with its own key, exactly as ``fit`` would train it alone.
      eval_batch_size: examples per compiled evaluation batch.
      progress: show a progress bar (default: when stderr is a terminal).
      progress_every: steps between progress updates (default: ~50 per epoch).
      on_epoch: called as ``on_epoch(record, population)`` after each epoch.
      precision: ``None``, ``"f32"`` or ``"bf16"``, as in :func:`jaxnet.train.fit`.
      validation_data: optional held-out ``(x, y)`` to choose members and epochs on
        (:func:`best_member`), evaluated for every member after each epoch.
      mesh: a ``jax.sharding.Mesh`` from :func:`jaxnet.sharding.make_mesh` to train on: the
        members split over ``data`` (K must be a multiple of its size), each member's params
        and optimizer state over ``fsdp`` and ``model`` (:func:`population_shardings`), the
        data whole on every device. ``population`` may be on the default device, on the mesh
        (``init_population(..., mesh=mesh)``) or on another mesh; the returned one is laid
        out on ``mesh``. ``None``: the default device.
      rules: with ``mesh``: how each member's params are laid out, as for
        :func:`jaxnet.sharding.param_specs` (e.g. ``ShardingRules(fsdp_min_size=...)``).

    Returns:
      ``(population, history)``: one dict per epoch with ``epoch``, per-member lists
      ``train_loss, train_accuracy[, val_loss, val_accuracy][, test_loss, test_accuracy]``
      (length K; NaN for a member that diverged), ``seconds`` and ``examples_per_second``
      (over all members); the first also has ``compile_seconds``.

    Raises:
      ValueError: data that does not fit the network, members at different steps or off an
        epoch boundary, ``rules`` without ``mesh``, or K not a multiple of the mesh's ``data``
        size (the message names both).
    """
    _check_rules("fit_population", mesh, rules)
    x, y = _data_arrays(train_data, mesh)
    first = population.member(0)
    _check_data(net, first.params, x, y, "train_data")
    n = x.shape[0]
    batch_size = min(batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    done, rest = divmod(int(first.step), steps_per_epoch)
    if rest or bool(jnp.any(population.members.step != first.step)):
        raise ValueError(f"fit_population: the members must all be at one epoch boundary "
                         f"({steps_per_epoch} steps per epoch); steps are "
                         f"{np.asarray(population.members.step).tolist()}")
    progress_every = progress_every or max(steps_per_epoch // 50, 1)
    reporter = make_progress(progress, epochs, steps_per_epoch)
    epoch_fn, _ = make_population_epoch(
        net, optimizer, loss, n, batch_size, shared_order=shared_order,
        progress=reporter.update if reporter.active else None, progress_every=progress_every,
        precision=precision)
    if mesh is None:  # a copy: the epochs donate it
        population, shardings, layout = jax.tree.map(jnp.copy, population), None, {}
    else:  # a copy laid out on the mesh, the epoch compiled for it: XLA inserts the collectives
        shardings = population_shardings(population, mesh, rules, what="fit_population")
        replicated = data_parallel.replicated(mesh)
        population = _placed_copy(population, shardings)
        layout = {"in_shardings": (shardings, replicated, replicated, replicated),
                  "out_shardings": (shardings, _member_sharding(mesh))}

    start = time.perf_counter()
    compiled = xla_options.compile(xla_options.jit(epoch_fn, donate_argnums=0, **layout),
                                   population, x, y, jnp.int32(0))
    evaluations = [_compile_member_evaluation(net, loss, data, eval_batch_size, precision,
                                              population, prefix, shardings)
                   for prefix, data in (("val", validation_data), ("test", eval_data))
                   if data is not None]
    compile_seconds = time.perf_counter() - start

    def train_record(sums, epoch):
        train = _per_member(sums)  # waits for the epoch
        return {"train_loss": train["loss"], "train_accuracy": train["accuracy"]}

    return run_epochs(population, lambda population, epoch: compiled(population, x, y, epoch),
                      first_epoch=done, epochs=epochs, reporter=reporter,
                      train_record=train_record,
                      evaluate=lambda population: {k: v for run in evaluations
                                                   for k, v in run(population).items()},
                      examples=n * population.size, compile_seconds=compile_seconds,
                      on_epoch=on_epoch, display=_summary_record)


def _compile_member_evaluation(net, loss, eval_data, eval_batch_size, precision,
                               population: Population, prefix: str,
                               shardings: Population | None = None
                               ) -> Callable[[Population], dict]:
    """``population -> {"<prefix>_loss": [...], "<prefix>_accuracy": [...]}``, compiled for
    ``eval_data``; with ``shardings`` (from :func:`population_shardings`) for that layout, the
    data whole on every device."""
    mesh = None if shardings is None else shardings.members.step.mesh
    x_eval, y_eval = _data_arrays(eval_data, mesh)
    _check_data(net, population.member(0).params, x_eval, y_eval,
                "eval_data" if prefix == "test" else "validation_data")
    evaluate = make_evaluate(net, loss, x_eval.shape[0], min(eval_batch_size, x_eval.shape[0]),
                             precision=precision)
    layout = {} if mesh is None else {
        "in_shardings": (shardings.members.params, shardings.members.model_state,
                         data_parallel.replicated(mesh), data_parallel.replicated(mesh)),
        "out_shardings": _member_sharding(mesh)}
    compiled = xla_options.jit(jax.vmap(evaluate, (0, 0, None, None)), **layout).lower(
        population.members.params, population.members.model_state, x_eval, y_eval).compile()

    def evaluate_members(population):
        means = _per_member(compiled(population.members.params, population.members.model_state,
                                     x_eval, y_eval))
        return {f"{prefix}_{name}": values for name, values in means.items()}

    return evaluate_members


def _finite_mean(values: list[float]) -> float:
    finite = np.asarray(values)[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _summary_record(record: dict) -> dict:
    """The epoch's record with each metric the mean over members with finite values (for the bar)."""
    return {k: _finite_mean(v) if isinstance(v, list) else v for k, v in record.items()}


def chosen_epochs(history: list[dict], metric: str | Sequence[str] = VALIDATION
                  ) -> list[int | None]:
    """Each member's chosen epoch (1-based): its best by ``metric``, as ``jaxnet train`` keeps a
    run's best epoch (:class:`jaxnet.train.callbacks.EarlyStopping`); ``None`` for a member
    whose values are never finite.

    Args:
      history: from :func:`fit_population` with ``validation_data``.
      metric: a per-member key of the records, or several compared in order, ties on one
        broken by the next (``("val_accuracy", "val_loss")``); highest accuracy, lowest
        anything else. The default: the validation loss. Test metrics are refused: they are for reporting the chosen
        model only, never for choosing it.

    Raises:
      ValueError: a ``metric`` is missing from the history, or names test metrics.
    """
    keys = _monitored(history, metric)
    modes = [default_mode(key) for key in keys]
    members = len(history[-1][keys[0]])
    chosen = []
    for member in range(members):
        rows = [[float(record[key][member]) for key in keys] for record in history]
        best = best_index(rows, modes)
        chosen.append(None if best is None else history[best].get("epoch", best + 1))
    return chosen


def best_member(history: list[dict], metric: str | Sequence[str] = VALIDATION) -> int:
    """Index of the member whose chosen epoch (:func:`chosen_epochs`) is the best of all: by
    default the one with the lowest validation loss.

    Members whose values are never finite are never chosen; of equal members, the first.

    Raises:
      ValueError: ``metric`` is not in the history or names test metrics, or every member's
        values are NaN or infinite.
    """
    keys = _monitored(history, metric)
    epochs = chosen_epochs(history, keys)
    by_epoch = {record.get("epoch", i + 1): record for i, record in enumerate(history)}
    rows = [[math.nan] * len(keys) if epoch is None else
            [float(by_epoch[epoch][key][member]) for key in keys]
            for member, epoch in enumerate(epochs)]
    best = best_index(rows, [default_mode(key) for key in keys])
    if best is None:
        raise ValueError(f"best_member: every member's {', '.join(keys)} is NaN or infinite")
    return best


def _monitored(history: list[dict], metric: str | Sequence[str]) -> tuple[str, ...]:
    keys = (metric,) if isinstance(metric, str) else tuple(metric)
    if tested := [key for key in keys if key.startswith("test_")]:
        raise ValueError(f"best_member: {tested[0]!r} is a test metric; choose by validation "
                         "metrics (fit_population(validation_data=...)) and report the test "
                         "metrics of the chosen member only")
    have = sorted(k for k, v in (history[-1] if history else {}).items() if isinstance(v, list))
    if missing := [key for key in keys if key not in have]:
        raise ValueError(f"best_member: no per-member {missing[0]!r} in the history (has "
                         f"{have}); pass validation_data to fit_population")
    return keys


@dataclasses.dataclass(frozen=True, repr=False)
class Ensemble(Layer):
    """``members`` copies of ``net`` whose class probabilities are averaged.

    Params (and state) are ``net``'s with a leading ``(members,)`` axis, as in
    ``Population.members.params``. The output is ``log(mean_k softmax(net_k(x)))``, shape
    ``(*batch, classes)``: log-probabilities, so they serve as logits (``softmax`` of them is
    the mean probability, ``argmax`` the ensemble's prediction, cross-entropy the ensemble's
    negative log-likelihood). ``jaxnet.predict(Ensemble(net, K), population.members.params, x,
    proba=True)`` is the ensemble's prediction.
    """

    net: Layer
    members: int
    kind: ClassVar[str] = "ensemble"

    def __post_init__(self):
        positive_int("Ensemble", "members", self.members)

    def children(self):
        return (("", self.net),)

    def init_params(self, key, x):
        keys = jax.random.split(key, self.members)
        return jax.vmap(lambda k: init_child(self.net, "", k, x)[:2])(keys)

    def forward(self, params, state, x, *, train, key):
        keys = jax.random.split(key, self.members) if train and key is not None else None
        logits, new_state = jax.vmap(
            lambda p, s, k: apply_child(self.net, "", p, s, x, train=train, key=k))(params, state, keys)
        log_mean = jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1), axis=0)
        return log_mean - math.log(self.members), new_state
