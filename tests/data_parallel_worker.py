"""Runs data-parallel training on 8 simulated CPU devices; used by tests/test_data_parallel.py.

The number of CPU devices is fixed when JAX's backend starts, so these runs happen in a fresh
process: ``python tests/data_parallel_worker.py OUT.npz``. The results (loss trajectories and
final params of each run, error messages) are written to ``OUT.npz`` for the test to compare.
"""

import re
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before anything starts the backend
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxnet as jn  # noqa: E402
from jaxnet import data_parallel  # noqa: E402
from jaxnet.checkpoint import restore_checkpoint, save_checkpoint  # noqa: E402
from jaxnet.losses import softmax_cross_entropy  # noqa: E402
from jaxnet.tensorfile import named_leaves  # noqa: E402
from jaxnet.train import init_train_state, make_epoch  # noqa: E402

N, FEATURES, CLASSES, BATCH = 203, 6, 4, 24  # padded to 208 on 8 devices; last batch masked


def problem():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(CLASSES, FEATURES)) * 2
    y = rng.integers(0, CLASSES, size=N + 50).astype(np.int32)
    x = (centers[y] + rng.normal(size=(N + 50, FEATURES))).astype(np.float32)
    return (x[:N], y[:N]), (x[N:], y[N:])


# BatchNorm (statistics over the whole batch) and Dropout (masks drawn for the whole batch) are
# the layers that would notice a batch split wrongly. No bias before BatchNorm: its gradient is
# zero up to rounding, which a normalising optimizer would turn into full-size random steps.
NET = jn.serial(jn.Dense(32, use_bias=False), jn.BatchNorm(), jn.relu, jn.Dropout(0.1),
                jn.Dense(CLASSES))
OPTIMIZER = optax.sgd(0.05, momentum=0.9)


def train(params, model_state, train_data, eval_data, epochs, mesh, on_epoch=None):
    return jn.fit(NET, params, OPTIMIZER, train_data, epochs=epochs, batch_size=BATCH,
                  model_state=model_state, eval_data=eval_data, eval_batch_size=16,
                  key=jax.random.key(3), progress=False, mesh=mesh, on_epoch=on_epoch)


def record(results, name, state, history):
    results[f"{name}/train_loss"] = np.array([r["train_loss"] for r in history])
    results[f"{name}/test_loss"] = np.array([r["test_loss"] for r in history])
    results[f"{name}/test_accuracy"] = np.array([r["test_accuracy"] for r in history])
    for leaf_name, leaf in named_leaves({"params": state.params, "state": state.model_state}):
        results[f"{name}/{leaf_name}"] = np.asarray(leaf)
    results[f"{name}/step"] = np.asarray(state.step)


def dot_shapes(params, model_state, train_data):
    """The output shapes of the matrix products in the compiled 8-device epoch."""
    mesh = data_parallel.data_mesh(8)
    epoch, _ = make_epoch(NET, OPTIMIZER, softmax_cross_entropy, N, BATCH,
                          batch_sharding=data_parallel.row_sharding(mesh, 1))
    state = data_parallel.replicate(mesh, init_train_state(NET, OPTIMIZER, params,
                                                           model_state=model_state))
    x, y = (data_parallel.place_rows(mesh, a) for a in train_data)
    hlo = jax.jit(epoch, out_shardings=data_parallel.replicated(mesh)).lower(
        state, x, y, np.int32(0)).compile().as_text()
    return np.array(sorted({tuple(map(int, m.split(","))) for m in
                            re.findall(r"= f32\[(\d+,\d+)\]\S* dot\(", hlo)}))


def main(out_path, checkpoints):
    train_data, eval_data = problem()
    params, model_state = NET.init_with_state(jax.random.key(0), train_data[0][:1])
    results = {"devices": np.array(len(jax.devices()))}
    saved = []

    def save_epoch_2(record, state):  # the checkpoint a run on 8 devices writes after 2 epochs
        if record["epoch"] == 2:
            saved.append(save_checkpoint(checkpoints, state, metadata={"history": [record]}))

    for count in (1, 2, 8):
        mesh = None if count == 1 else data_parallel.data_mesh(count)
        state, history = train(params, model_state, train_data, eval_data, 3, mesh,
                               save_epoch_2 if count == 8 else None)
        record(results, f"devices_{count}", state, history)
    results["sharding_8"] = np.array(str(state.params["dense_1"]["w"].sharding))

    for count in (1, 4):  # restored on 1 and on 4 devices, trained for the third epoch
        restored, _ = restore_checkpoint(saved[0], jax.eval_shape(lambda: state))
        mesh = None if count == 1 else data_parallel.data_mesh(count)
        resumed, more = train(restored, None, train_data, eval_data, 3, mesh)
        record(results, f"resumed_on_{count}", resumed, more)

    try:  # 24 examples per batch do not split over 5 devices
        train(params, model_state, train_data, eval_data, 1,
              data_parallel.data_mesh(jax.devices()[:5]))
    except ValueError as error:
        results["error_batch_size"] = np.array(str(error))
    results["dot_shapes"] = dot_shapes(params, model_state, train_data)
    placed = data_parallel.place_rows(data_parallel.data_mesh(8), train_data[0])
    results["placed_rows"] = np.asarray(placed)
    results["placed_shard_shapes"] = np.array([s.data.shape for s in placed.addressable_shards])
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
