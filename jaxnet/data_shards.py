"""A multi-process run's data: each process reads only its block of the training set from disk.

In a run whose mesh spans several processes, process ``p`` supplies only the training rows
``data_parallel.process_rows(n, mesh, p)`` to the global array (see
:mod:`jaxnet.data_parallel`), so :func:`load_process_shard` reads only those rows from the
files (``train_rows=`` of the :mod:`jaxnet.data` loaders). The test set is read whole by every
process: evaluation replicates it on every device.

What needs the whole training set is combined over the processes with JAX
(``jax.experimental.multihost_utils.process_allgather``), never with communication of our own:

- the standardisation statistics: the float64 sum of each process's rows, then (with the global
  mean) the float64 sum of their squared deviations; the same two passes as
  :func:`jaxnet.data.standardize`, so the mean and std equal a one-process run's up to float64
  rounding (in practice bitwise once rounded to float32);
- the number of classes (the largest label of any process's rows or of the test set, plus 1);
- whether every process loaded its rows: a process whose files are damaged raises its
  ``DataError``, and the others raise one naming that process, instead of waiting for it.

>>> dataset, stats = load_process_shard("mnist", data_dir="/data/mnist", mesh=data_mesh())
>>> dataset.x_train.shape[0] == dataset.train_rows.stop - dataset.train_rows.start
True
"""

from __future__ import annotations

import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxnet import data_parallel
from jaxnet.data import DataError, Dataset, load_dataset


def spans_processes(mesh: Mesh | None) -> bool:
    """True when ``mesh`` holds devices of more than one process (a multi-process run)."""
    return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


def load_process_shard(name: str, *, mesh: Mesh, data_dir=None, path=None,
                       standardize: bool = True) -> tuple[Dataset, dict[str, float]]:
    """This process's block of the training set and the whole test set, standardised with the
    statistics of the WHOLE training set. Every process of the mesh must call it alike.

    Args:
      name, data_dir, path: the data set, as for :func:`jaxnet.data.load_dataset`.
      mesh: a mesh from :func:`jaxnet.data_parallel.data_mesh` spanning the processes.
      standardize: subtract the training set's mean and divide by its std (float32 results).

    Returns:
      ``(dataset, stats)``: ``dataset.x_train`` ``(stop - start, *example)`` float32 and
      ``y_train`` ``(stop - start,)`` int32 are rows ``dataset.train_rows`` of the
      ``dataset.train_examples`` training examples; ``num_classes`` is the whole data set's;
      ``stats = {"mean": m, "std": s}`` (0 and 1 when not standardised), as in
      :func:`jaxnet.app.run.load_data`.

    Raises:
      DataError: this process could not load its rows (its own message), another one could not
        (naming it), the processes see training or test sets of different sizes, or the
        training set's std is not > 0.
    """
    dataset = failure = None
    try:
        dataset = load_dataset(name, data_dir=data_dir, path=path,
                               train_rows=lambda n: data_parallel.process_rows(n, mesh))
    except DataError as error:  # raised after the gather below: the others must not wait for us
        failure = error
    mine = np.zeros(5) if dataset is None else np.array([
        1, dataset.num_train, len(dataset.x_test), dataset.num_classes - 1,
        dataset.x_train.sum(dtype=np.float64)])  # float32 values summed in float64
    loaded, n_train, n_test, top_label, sums = _gather(mine).T  # (processes,) each
    if failure is not None:
        raise failure
    if not loaded.all():
        raise DataError(f"{name}: process {int(np.flatnonzero(loaded == 0)[0])} could not load "
                        "its rows of the training set (see its error)")
    for what, counts in (("training", n_train), ("test", n_test)):
        if len(set(counts)) > 1:
            raise DataError(f"{name}: the processes see {what} sets of different sizes "
                            f"({', '.join(f'process {p}: {int(c)}' for p, c in enumerate(counts))}"
                            "); every process must read the same data set")
    n = dataset.num_train
    dataset = dataset._replace(num_classes=int(top_label.max()) + 1)
    if not standardize:
        return dataset, {"mean": 0.0, "std": 1.0}
    mean = sums.sum() / (n * _example_size(dataset))  # float64
    deviations = np.subtract(dataset.x_train, mean, dtype=np.float64)
    squares = _gather(np.array([np.square(deviations, out=deviations).sum()]))[:, 0]
    std = np.sqrt(squares.sum() / (n * _example_size(dataset)))
    if not std > 0:  # as jaxnet.data.standardize says it
        raise DataError(f"cannot standardize: x_train of shape {(n, *dataset.x_train.shape[1:])}"
                        f" has standard deviation {std}, expected > 0")
    mean, std = np.float32(mean), np.float32(std)
    standardized = dataset._replace(x_train=(dataset.x_train - mean) / std,
                                    x_test=(dataset.x_test - mean) / std)
    return standardized, {"mean": float(mean), "std": float(std)}


def _example_size(dataset: Dataset) -> int:
    return int(np.prod(dataset.x_train.shape[1:]))


def _gather(values: np.ndarray) -> np.ndarray:
    """Every process's ``values`` (k,) float64, as ``(processes, k)`` float64. Sent as their
    bits: without ``jax_enable_x64`` JAX would round float64 to float32."""
    bits = np.ascontiguousarray(values, np.float64).view(np.uint32)
    return np.asarray(multihost_utils.process_allgather(bits)).view(np.float64)
