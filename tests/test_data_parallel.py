"""Data parallelism: meshes, sharded training equal to one device, multi-process runs.

The main pytest process has one CPU device. Runs on 8 simulated CPU devices happen in a fresh
process (tests/data_parallel_worker.py), because the device count is fixed when JAX's backend
starts; two processes forming one JAX cluster over 127.0.0.1 run ``jaxnet train``.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import safetensors.numpy
from jax.sharding import AbstractMesh, AxisType

import jaxnet as jn
from jaxnet import data_parallel
from jaxnet.checkpoint import read_checkpoint
from jaxnet.app.cli import main
from jaxnet.app.run import RunConfig, load_data, write_config
from support import CHILD_ENV, blobs, free_port, run_processes

TESTS = Path(__file__).parent


def eight_devices() -> AbstractMesh:
    """A mesh's shape without devices: enough for the batch-size arithmetic."""
    return AbstractMesh((8,), ("data",), axis_types=(AxisType.Auto,))


# --- in this process (one CPU device) -----------------------------------------------------------


def test_data_mesh_of_all_local_devices():
    mesh = data_parallel.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count() == 1
    assert mesh.axis_types == (AxisType.Auto,)
    assert data_parallel.data_mesh(1).devices.tolist() == jax.devices()
    assert data_parallel.data_mesh(jax.devices()).size == 1


@pytest.mark.parametrize("devices, message", [
    (2, "devices: asked for 2 devices but this process has only 1 cpu device "
        r"\(for simulated CPU devices set XLA_FLAGS=--xla_force_host_platform_device_count=2"),
    (0, "devices must be a positive integer, got 0"),
    ("4", "devices must be None, a positive integer or a sequence of jax devices; got '4'"),
    ([], "devices must be None, a positive integer or a sequence of jax devices; got \\[\\]"),
])
def test_data_mesh_rejects_bad_device_counts(devices, message):
    with pytest.raises(ValueError, match=message):
        data_parallel.data_mesh(devices)


def test_data_mesh_rejects_a_device_named_twice():
    with pytest.raises(ValueError, match="names a device twice"):
        data_parallel.data_mesh(jax.devices() * 2)


def test_batch_size_must_split_evenly_over_the_devices():
    data_parallel.check_batch_size(eight_devices(), 64)
    with pytest.raises(ValueError, match="batch_size 30 does not split evenly over 8 devices; use "
                                         "a multiple of 8, e.g. 24 or 32"):
        data_parallel.check_batch_size(eight_devices(), 30)
    with pytest.raises(ValueError, match="batch-size 5 does not split evenly over 8 devices; use "
                                         "a multiple of 8, e.g. 8$"):
        data_parallel.check_batch_size(eight_devices(), 5, "batch-size")
    assert data_parallel.round_up_to_devices(eight_devices(), 359) == 360


def test_rows_are_padded_and_split_by_process():
    mesh = data_parallel.data_mesh()
    assert data_parallel.padded_rows(203, mesh) == 203
    assert data_parallel.process_rows(203, mesh) == slice(0, 203)
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    placed = data_parallel.place_rows(mesh, x)
    np.testing.assert_array_equal(np.asarray(placed), x)
    assert placed.sharding.spec == jax.sharding.PartitionSpec("data")
    with pytest.raises(ValueError, match=r"supplies rows 0:6 of 6, that is 6, but local has 5"):
        data_parallel.shard_rows(mesh, x[:5], 6)


def test_replicate_copies_every_leaf_and_keeps_prng_keys():
    mesh = data_parallel.data_mesh()
    tree = {"w": jax.numpy.arange(3.0), "key": jax.random.key(5)}
    placed = data_parallel.replicate(mesh, tree)
    assert placed["w"].sharding == data_parallel.replicated(mesh)
    assert placed["w"].unsafe_buffer_pointer() != tree["w"].unsafe_buffer_pointer()
    np.testing.assert_array_equal(jax.random.key_data(placed["key"]),
                                  jax.random.key_data(tree["key"]))
    assert placed["key"].dtype == tree["key"].dtype


def test_fit_on_a_one_device_mesh_equals_fit_without_one(key, rng):
    x, y = blobs(rng, n=50)
    net = jn.serial(jn.Dense(8), jn.relu, jn.Dense(3))
    params = net.init(key, x[:1])
    runs = [jn.fit(net, params, optax.adam(1e-2), (x, y), epochs=2, batch_size=16,
                   eval_data=(x, y), progress=False, mesh=mesh)
            for mesh in (None, data_parallel.data_mesh(1))]
    (plain, plain_history), (meshed, meshed_history) = runs
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(meshed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    strip = lambda h: [{k: v for k, v in r.items() if "second" not in k} for r in h]
    assert strip(plain_history) == strip(meshed_history)


def test_initialize_without_settings_is_a_one_process_run():
    assert data_parallel.initialize(environ={}) is False
    assert data_parallel.is_main_process()


@pytest.mark.parametrize("arguments, environ, message", [
    ((None, 2, None), {}, "missing `coordinator`, `process_id`"),
    ((None, None, None), {"JAXNET_COORDINATOR": "h:1"}, "missing `num_processes`, `process_id`"),
    (("localhost", 2, 0), {}, "coordinator must be HOST:PORT .*got 'localhost'"),
    (("localhost:99999", 2, 0), {}, "coordinator must be HOST:PORT"),
    (("h:1", 0, 0), {}, "num_processes must be a positive integer, got 0"),
    (("h:1", 2, 2), {}, r"process_id must be in \[0, 2\) for 2 processes, got 2"),
    ((None, None, None), {"JAXNET_COORDINATOR": "h:1", "JAXNET_NUM_PROCESSES": "two",
                          "JAXNET_PROCESS_ID": "0"},
     r"JAXNET_NUM_PROCESSES \(num_processes\) must be an integer, got 'two'"),
])
def test_initialize_rejects_incomplete_or_bad_settings(arguments, environ, message):
    with pytest.raises(ValueError, match=message):
        data_parallel.initialize(*arguments, environ=environ)


def test_run_config_records_devices():
    assert RunConfig().devices is None and RunConfig(devices=4).to_json()["devices"] == 4
    with pytest.raises(ValueError, match="devices must be a positive integer, got 0"):
        RunConfig(devices=0)


@pytest.mark.parametrize("argv, message", [
    (["--devices", "2"], "devices: asked for 2 devices but this process has only 1 cpu device"),
    (["--devices", "0"], "devices must be a positive integer, got 0"),
    (["--coordinator", "127.0.0.1:1"], "a multi-process run needs --coordinator, "
                                       "--num-processes and --process-id"),
])
def test_cli_device_and_cluster_errors_give_one_line(argv, message, tmp_path, capsys):
    assert main(["train", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run"),
                 *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("jaxnet: error:")
    assert not (tmp_path / "run" / "config.json").exists()


def test_config_json_records_where_a_run_ran(tmp_path):
    config = RunConfig(devices=1)
    dataset, stats = load_data(config)
    write_config(tmp_path, config, dataset, stats, data_parallel.data_mesh(config.devices))
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["config"]["devices"] == 1
    assert record["mesh"] == {"devices": 1, "processes": 1, "platform": "cpu",
                              "device_kind": "cpu"}


# --- 8 simulated CPU devices, in a fresh process ------------------------------------------------


@pytest.fixture(scope="module")
def eight_device_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("data_parallel")
    done = subprocess.run([sys.executable, str(TESTS / "data_parallel_worker.py"),
                           str(out / "results.npz"), str(out / "checkpoints")],
                          env=CHILD_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out / "results.npz", allow_pickle=False) as results:
        return dict(results)


def run_of(results, name):
    return {k[len(name) + 1:]: v for k, v in results.items() if k.startswith(name + "/")}


@pytest.mark.parametrize("devices", [2, 8])
def test_training_on_several_devices_equals_one_device(eight_device_runs, devices):
    assert int(eight_device_runs["devices"]) == 8
    one, many = run_of(eight_device_runs, "devices_1"), run_of(eight_device_runs,
                                                                f"devices_{devices}")
    assert set(one) == set(many) and "state.batch_norm_1.mean" in one  # BatchNorm state too
    for name in one:
        np.testing.assert_allclose(many[name], one[name], rtol=1e-5, atol=2e-6, err_msg=name)
    assert np.all(np.diff(one["train_loss"]) < 0)  # it learns: the comparison is not vacuous


def test_state_is_replicated_and_rows_are_split(eight_device_runs):
    assert "spec=P()" in str(eight_device_runs["sharding_8"])
    # 203 rows padded to 208, 26 on each of the 8 devices; padding rows are zeros
    assert eight_device_runs["placed_shard_shapes"].tolist() == [[26, 6]] * 8
    placed = eight_device_runs["placed_rows"]
    assert placed.shape == (208, 6) and not placed[203:].any() and placed[:203].all()


def test_each_device_computes_its_share_of_every_batch(eight_device_runs):
    """Without the batch layout, XLA computed every whole batch on every device."""
    shapes = eight_device_runs["dot_shapes"].tolist()
    assert [3, 32] in shapes  # the first layer on 24 / 8 examples
    assert not [row for row in shapes if row[0] == 24]  # never on a whole batch


@pytest.mark.parametrize("devices", [1, 4])
def test_a_checkpoint_saved_on_8_devices_continues_on_fewer(eight_device_runs, devices):
    whole = run_of(eight_device_runs, "devices_1")  # reference: 3 epochs on one device
    resumed = run_of(eight_device_runs, f"resumed_on_{devices}")  # 2 on 8 devices, 1 on these
    for name in resumed:
        expected = whole[name][-1:] if name.endswith(("loss", "accuracy")) else whole[name]
        np.testing.assert_allclose(resumed[name], expected, rtol=1e-5, atol=2e-6, err_msg=name)


def test_fit_rejects_a_batch_that_does_not_split_over_the_devices(eight_device_runs):
    assert str(eight_device_runs["error_batch_size"]) == (
        "fit: batch_size 24 does not split evenly over 5 devices; use a multiple of 5, e.g. "
        "20 or 25")


def test_cli_batch_size_error_on_eight_devices(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jaxnet.app.cli", "train", "--devices", "8",
                           "--batch-size", "30", "--no-progress", "--out", str(tmp_path / "run")],
                          env=CHILD_ENV | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr == ("jaxnet: error: --batch-size 30 does not split evenly over 8 devices; "
                           "use a multiple of 8, e.g. 24 or 32\n")


# --- two processes, one JAX cluster -------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """``jaxnet train`` as two processes of 2 CPU devices each (gloo collectives) equals one."""
    options = ["--epochs", "2", "--hidden", "32", "--no-progress", "--checkpoint-every", "1",
               "--validation-split", "0"]  # a multi-process run holds out no rows
    command = [sys.executable, "-m", "jaxnet.app.cli", "train", *options]
    env = CHILD_ENV | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    cluster = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    # Process 1 gets another --out: only process 0 may write anything.
    results = run_processes([[*command, *cluster, "--process-id", str(i), "--out",
                              str(tmp_path / f"cluster-{i}")] for i in (1, 0)], env)
    for returncode, _, err in results:
        assert returncode == 0, err[-3000:]
    assert "results:" not in results[0][1] and "results:" in results[1][1]  # process 0 reports
    subprocess.run([*command, "--out", str(tmp_path / "single")], env=CHILD_ENV, check=True,
                   capture_output=True, timeout=300)

    cluster_run, single_run = tmp_path / "cluster-0", tmp_path / "single"
    assert not (tmp_path / "cluster-1").exists()
    assert json.loads((cluster_run / "config.json").read_text())["mesh"] == {
        "devices": 4, "processes": 2, "platform": "cpu", "device_kind": "cpu"}
    load = lambda run: safetensors.numpy.load_file(str(run / "params.safetensors"))
    expected, actual = load(single_run), load(cluster_run)
    assert set(actual) == set(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    metrics = lambda run: [json.loads(line)
                           for line in (run / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(metrics(cluster_run), metrics(single_run), strict=True):
        np.testing.assert_allclose([a["train_loss"], a["test_loss"]],
                                   [b["train_loss"], b["test_loss"]], rtol=1e-5)
    # The checkpoints process 0 wrote hold the same state as the one-process run's
    for name in ("ckpt-000045", "ckpt-000090"):
        (got, _), (want, _) = (read_checkpoint(run / "checkpoints" / name)
                               for run in (cluster_run, single_run))
        for leaf in want:
            np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-5, atol=1e-6, err_msg=leaf)
