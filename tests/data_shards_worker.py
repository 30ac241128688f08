"""One process of a two-process ``jaxnet.app.run.train``; used by tests/test_data_shards.py.

``python tests/data_shards_worker.py COORDINATOR PROCESS_ID DATA_DIR RUN_DIR OUT.npz`` joins a
JAX cluster of 2 processes (2 CPU devices each, from XLA_FLAGS), trains on the MNIST-format
files in DATA_DIR, and writes to OUT.npz what this process loaded (its training rows, their
place in the training set) and the trained params; or, when loading fails, the error message.
"""

import sys

import numpy as np

from jaxnet import data_parallel
from jaxnet.data import DataError
from jaxnet.tensorfile import named_leaves

# a multi-process run holds out no validation rows (each process reads only its block)
CONFIG = {"dataset": "mnist", "hidden": (16,), "epochs": 2, "batch_size": 8, "lr": 1e-2,
          "validation_split": 0.0}


def main(coordinator, process_id, data_dir, run_dir, out_path):
    data_parallel.initialize(coordinator, 2, int(process_id))
    from jaxnet.app.run import RunConfig, train  # after initialize: nothing may start JAX before

    config = RunConfig(data_dir=data_dir, **CONFIG)
    try:
        state, history, _, dataset = train(config, run_dir if int(process_id) == 0 else None,
                                           progress=False)
    except DataError as error:
        np.savez(out_path, error=np.array(str(error)))
        return
    rows = dataset.train_rows
    results = {"x_train": dataset.x_train, "y_train": dataset.y_train,
               "rows": np.array([rows.start, rows.stop]), "num_train": dataset.num_train,
               "num_classes": dataset.num_classes,
               "train_loss": np.array([r["train_loss"] for r in history])}
    results.update((f"params/{name}", np.asarray(leaf))
                   for name, leaf in named_leaves(state.params))
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
