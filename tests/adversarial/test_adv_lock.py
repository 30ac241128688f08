"""One writer per run directory: a lock held for the whole train, resume or sweep, released by
the operating system when the process dies."""

import json
import os
import signal
import subprocess
import time

import safetensors.numpy

from adv_helpers import CLI, FAST, digests, one_line_error, quiet_env, refused
from jaxnet.app.cli import main
from jaxnet.app.rundir import LOCK_FILE, RunLock

LONG = ["train", "--epochs", "400", "--batch-size", "8", "--hidden", "16", "--no-progress"]


def _start_long_run(out):
    """A ``jaxnet train`` in another process that holds ``out``'s lock for many seconds."""
    process = subprocess.Popen([*CLI, *LONG, "--out", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=quiet_env())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # locked once the pid is in the lock file
        lock = out / LOCK_FILE
        if lock.exists() and lock.read_text().strip() == str(process.pid):
            return process
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the first jaxnet train never took the lock")


def test_a_second_train_on_the_same_directory_is_refused_and_the_first_completes(tmp_path, capsys):
    out = tmp_path / "run"
    first = _start_long_run(out)
    try:
        err = refused(["train", *FAST, "--out", out], capsys, out, f"(pid {first.pid})")
        assert "is in use by another jaxnet process" in err
        assert first.poll() is None, "the refused writer must not disturb the running one"
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["epochs"] == 400 and record["config"]["hidden"] == [16]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 401))
    assert safetensors.numpy.load_file(str(out / "params.safetensors"))["dense_1.w"].shape == (64, 16)


def test_a_killed_writer_leaves_no_stuck_lock(tmp_path, capsys):
    out = tmp_path / "run"
    first = _start_long_run(out)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # killed once training started: a partial run is left
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)  # reaped, its pipes closed
    assert first.returncode == -signal.SIGKILL
    # the kill left a partial run: refused without --force, replaced with it
    assert main(["train", *FAST, "--out", str(out)]) == 2
    one_line_error(capsys.readouterr().err, out, "--force")
    assert main(["train", *FAST, "--force", "--out", str(out)]) == 0
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_resume_and_sweep_take_the_same_lock(finished_run, tmp_path, capsys):
    before = digests(finished_run)
    with RunLock(finished_run):  # another open file description: as another process would
        err = refused(["train", "--resume", finished_run], capsys, finished_run,
                      f"(pid {os.getpid()})")
        assert "in use by another jaxnet process" in err
    assert digests(finished_run) == before
    sweep_dir = tmp_path / "sweep"
    with RunLock(sweep_dir):
        refused(["sweep", "--epochs", "1", "--seeds", "1", "--hidden", "8", "--no-progress",
                 "--out", sweep_dir], capsys, sweep_dir, "in use by another jaxnet process")
    assert sorted(p.name for p in sweep_dir.iterdir()) == [LOCK_FILE]


def test_the_lock_is_released_when_the_holder_exits(tmp_path):
    with RunLock(tmp_path / "d"):
        pass
    with RunLock(tmp_path / "d") as lock:  # taken again at once
        assert (tmp_path / "d" / LOCK_FILE).read_text().strip() == str(os.getpid())
        assert lock.fd is not None
