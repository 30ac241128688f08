"""Each process loads only its block of the training set (jaxnet.data_shards, fit's num_examples).

The row-range readers themselves are tested in tests/test_data.py. Here: the global statistics
in one process, ``fit`` on a process's rows, and (marked slow) two processes of one JAX cluster
over 127.0.0.1 running ``jaxnet.app.run.train`` (tests/data_shards_worker.py).
"""

import gzip
import json
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet import data_parallel, data_shards
from jaxnet.data import DataError
from jaxnet.app.run import RunConfig, load_data, train
from jaxnet.tensorfile import named_leaves
from data_shards_worker import CONFIG
from support import CHILD_ENV, blobs, free_port, run_processes

TESTS = Path(__file__).parent
N_TRAIN, N_TEST = 50, 10


def idx_file(path: Path, array: np.ndarray, gz: bool) -> None:
    content = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    content += array.tobytes()
    path.write_bytes(gzip.compress(content, mtime=0) if gz else content)


def mnist_dir(directory: Path) -> Path:
    """Four MNIST-format files: raw training images (read by seeking), the rest gzipped. Label
    6 appears only in rows 26:50, process 1's block on 2 x 2 devices."""
    rng = np.random.default_rng(1)
    directory.mkdir()
    labels = np.concatenate([rng.integers(0, 5, 26), rng.integers(0, 7, N_TRAIN - 26)])
    labels[-1] = 6
    files = {"train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, 6, 5)),
             "train-labels-idx1-ubyte.gz": labels,
             "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (N_TEST, 6, 5)),
             "t10k-labels-idx1-ubyte.gz": rng.integers(0, 5, N_TEST)}
    for name, array in files.items():
        idx_file(directory / name, array.astype(np.uint8), name.endswith(".gz"))
    return directory


# --- one process --------------------------------------------------------------------------------


def test_one_process_mesh_does_not_span_processes():
    assert not data_shards.spans_processes(data_parallel.data_mesh())
    assert not data_shards.spans_processes(None)


@pytest.mark.parametrize("standardize", [True, False])
def test_a_shard_of_one_process_equals_the_whole_data_set(tmp_path, standardize):
    """Through the gathers (of one process): the same rows, statistics and classes."""
    config = RunConfig(dataset="mnist", data_dir=str(mnist_dir(tmp_path / "m")),
                       standardize=standardize)
    whole, stats = load_data(config)
    shard, shard_stats = data_shards.load_process_shard(
        "mnist", mesh=data_parallel.data_mesh(), data_dir=config.data_dir,
        standardize=standardize)
    assert shard_stats == stats and shard.num_classes == whole.num_classes == 7
    assert (shard.train_rows, shard.num_train) == (slice(0, N_TRAIN), N_TRAIN)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(shard, name), getattr(whole, name), err_msg=name)
    assert shard.x_train.dtype == np.float32


def test_a_shard_of_constant_inputs_cannot_be_standardized(tmp_path):
    directory = mnist_dir(tmp_path / "m")
    idx_file(directory / "train-images-idx3-ubyte", np.full((N_TRAIN, 6, 5), 7, np.uint8), False)
    with pytest.raises(DataError, match=r"cannot standardize: x_train of shape \(50, 6, 5, 1\) "
                                        r"has standard deviation 0.0, expected > 0"):
        data_shards.load_process_shard("mnist", mesh=data_parallel.data_mesh(),
                                       data_dir=str(directory))


def test_fit_on_a_process_s_rows_equals_fit_on_all_of_them(key, rng):
    x, y = blobs(rng, n=50)
    net = jn.serial(jn.Dense(8), jn.relu, jn.Dense(3))
    params = net.init(key, x[:1])
    mesh = data_parallel.data_mesh(1)
    runs = [jn.fit(net, params, optax.adam(1e-2), (x, y), epochs=2, batch_size=16,
                   progress=False, mesh=mesh, num_examples=num_examples)
            for num_examples in (None, 50)]  # one process: its rows are all 50
    for a, b in zip(*(jax.tree.leaves(state.params) for state, _ in runs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="fit: num_examples is for a mesh"):
        jn.fit(net, params, optax.adam(1e-2), (x, y), epochs=1, num_examples=50)
    with pytest.raises(ValueError, match=r"supplies rows 0:60 of 60, that is 60, but local has "
                                         r"50"):
        jn.fit(net, params, optax.adam(1e-2), (x, y), epochs=1, batch_size=10, progress=False,
               mesh=mesh, num_examples=60)


# --- two processes, one JAX cluster -------------------------------------------------------------


def run_cluster(data_dir: Path, out: Path) -> list[dict]:
    """Runs tests/data_shards_worker.py as processes 0 and 1 (2 CPU devices each)."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = CHILD_ENV | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    for returncode, _, err in run_processes(
            [[sys.executable, str(TESTS / "data_shards_worker.py"), coordinator, str(i),
              str(data_dir), str(out / "run"), str(out / f"process-{i}.npz")] for i in (1, 0)],
            env):
        assert returncode == 0, err[-3000:]
    results = []
    for i in (0, 1):
        with np.load(out / f"process-{i}.npz", allow_pickle=False) as result:
            results.append(dict(result))
    return results


@pytest.mark.slow
def test_two_processes_each_load_only_their_rows_and_train_like_one(tmp_path):
    data_dir = mnist_dir(tmp_path / "mnist")
    processes = run_cluster(data_dir, tmp_path)
    config = RunConfig(data_dir=str(data_dir), **CONFIG)
    state, history, _, _ = train(config, tmp_path / "single", progress=False)

    # 50 rows padded to 52 over 4 devices: process 0 holds rows 0:26, process 1 rows 26:50
    whole = load_data(config)[0]  # standardised with the whole training set's statistics
    for process, rows in zip(processes, ([0, 26], [26, 50])):
        assert process["rows"].tolist() == rows and int(process["num_train"]) == N_TRAIN
        assert process["x_train"].shape == (rows[1] - rows[0], 6, 5, 1)  # only its block
        np.testing.assert_array_equal(process["x_train"], whole.x_train[slice(*rows)])
        np.testing.assert_array_equal(process["y_train"], whole.y_train[slice(*rows)])
        assert int(process["num_classes"]) == 7  # label 6 is only in process 1's rows
    recorded = [json.loads((run / "config.json").read_text())["data"]
                for run in (tmp_path / "run", tmp_path / "single")]
    assert recorded[0] == recorded[1]  # the same mean, std, classes and sizes
    for name, expected in named_leaves(state.params):
        for process in processes:
            np.testing.assert_allclose(process[f"params/{name}"], expected, rtol=1e-5,
                                       atol=1e-6, err_msg=name)
    np.testing.assert_allclose(processes[0]["train_loss"], [r["train_loss"] for r in history],
                               rtol=1e-5)


@pytest.mark.slow
def test_a_process_that_cannot_load_its_rows_stops_the_others_too(tmp_path):
    """The labels' gzip stream ends early, inside process 1's block only: process 0 reads its
    rows fine, then reports that process 1 failed instead of waiting for it."""
    data_dir = mnist_dir(tmp_path / "mnist")
    labels = data_dir / "train-labels-idx1-ubyte.gz"
    content = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(content[:-10], mtime=0))
    first, second = run_cluster(data_dir, tmp_path)
    assert str(first["error"]) == ("mnist: process 1 could not load its rows of the training "
                                   "set (see its error)")
    assert str(second["error"]) == (f"{labels}: truncated: shape (50,) of uint8 needs 58 bytes, "
                                    "the file has 48")
