"""``jaxnet train --mesh data=2,fsdp=2,model=2``: a sharded run on 8 simulated CPU devices, its
Orbax checkpoints, resume after SIGKILL, and the flag's errors (one line, exit status 2)."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxnet.app.cli import main
from jaxnet.tensorfile import load_params
from jaxnet.trees import named_leaves
from support import CHILD_ENV, free_port, run_processes

EIGHT = CHILD_ENV | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
TRAIN = [sys.executable, "-m", "jaxnet.app.cli", "train", "--mesh", "data=2,fsdp=2,model=2",
         "--hidden", "64,64", "--batch-size", "64", "--checkpoint-every", "1",
         "--keep-checkpoints", "2", "--no-progress"]


def params_of(run_dir) -> dict[str, np.ndarray]:
    return dict(named_leaves(load_params(run_dir / "params.safetensors")))


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mesh") / "run"
    done = subprocess.run([*TRAIN, "--epochs", "6", "--out", str(run_dir)], env=EIGHT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_a_mesh_run_records_its_axes_and_saves_sharded_checkpoints(whole_run):
    config = json.loads((whole_run / "config.json").read_text())
    assert config["config"]["mesh"] == "data=2,fsdp=2,model=2"
    assert config["mesh"]["axes"] == {"data": 2, "fsdp": 2, "model": 2}
    checkpoints = sorted(p.name for p in (whole_run / "checkpoints").iterdir())
    assert checkpoints == ["ckpt-000105", "ckpt-000126"]  # 21 steps an epoch, the newest 2
    newest = whole_run / "checkpoints" / "ckpt-000126"
    assert (newest / "commit_success.txt").is_file() and (newest / "state").is_dir()
    records = [json.loads(line) for line in (whole_run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and records[-1]["train_loss"] < records[0]["train_loss"]
    assert max(r["val_accuracy"] for r in records) > 0.8


@pytest.mark.slow
def test_a_killed_mesh_run_resumes_to_the_same_params(whole_run, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen([*TRAIN, "--epochs", "6", "--out", str(run_dir)], env=EIGHT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    first = run_dir / "checkpoints" / "ckpt-000021" / "commit_success.txt"
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, err[-3000:]
    assert not (run_dir / "params.safetensors").exists()  # killed before the end
    done = subprocess.run([sys.executable, "-m", "jaxnet.app.cli", "train", "--resume",
                           str(run_dir), "--no-progress"], env=EIGHT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, whole = params_of(run_dir), params_of(whole_run)
    assert set(resumed) == set(whole)
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)


@pytest.mark.slow
def test_two_processes_train_a_sharded_mesh_like_one(tmp_path):
    """Two processes of 2 CPU devices each (gloo) on one 2x2 data x fsdp mesh, the same --out:
    every checkpoint holds a store of each process's shards; the params equal a one-process
    run's on 4 devices."""
    command = [sys.executable, "-m", "jaxnet.app.cli", "train", "--mesh", "data=2,fsdp=2",
               "--hidden", "64,64", "--batch-size", "64", "--epochs", "2", "--no-progress",
               "--checkpoint-every", "1", "--validation-split", "0"]  # a multi-process run: 0
    cluster = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    out, single = tmp_path / "cluster", tmp_path / "single"
    results = run_processes([[*command, *cluster, "--process-id", str(i), "--out", str(out)]
                             for i in (1, 0)],
                            CHILD_ENV | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    for returncode, _, err in results:
        assert returncode == 0, err[-3000:]
    assert "results:" not in results[0][1] and "results:" in results[1][1]  # process 0 reports
    subprocess.run([*command, "--out", str(single)], check=True, capture_output=True, timeout=300,
                   env=CHILD_ENV | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:
        stores = sorted(p.name for p in (checkpoint / "state").iterdir()
                        if p.name.startswith("ocdbt.process_"))
        assert stores == ["ocdbt.process_0", "ocdbt.process_1"], checkpoint
    assert json.loads((out / "config.json").read_text())["mesh"]["processes"] == 2
    actual, expected = params_of(out), params_of(single)
    assert set(actual) == set(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_several_processes_sharding_params_need_one_out_directory():
    from jaxnet.app.cli import UsageError, _shard_dir
    from jaxnet.app.run import RunConfig

    class Args:
        out = None

    with pytest.raises(UsageError, match="--mesh fsdp=2 shards the params over the processes: "
                                         "give every process the same --out"):
        _shard_dir(Args(), RunConfig(mesh="fsdp=2"))
    assert _shard_dir(Args(), RunConfig(mesh="data=2")) is None  # data parallel: process 0 writes


@pytest.mark.parametrize("flags, message", [
    (["--mesh", "data=2,pipeline=4"], "jaxnet: error: --mesh must be AXIS=SIZE pairs joined by "
     "commas, axes among data, fsdp, model (each once), sizes positive integers, e.g. "
     "data=2,fsdp=4; got 'data=2,pipeline=4'"),
    (["--mesh", "fsdp=2", "--devices", "1"], "jaxnet: error: --mesh fsdp=2 and --devices 1 "
     "cannot be combined: the mesh's sizes cover every device"),
    (["--mesh", "fsdp=2,model=2"], "jaxnet: error: make_mesh: fsdp=2 x model=2 = 4 does not "
     "divide the 1 cpu device"),
])
def test_mesh_errors_are_one_line(flags, message, tmp_path, capsys):
    assert main(["train", *flags, "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == message + "\n"
    assert not (tmp_path / "run").exists()
