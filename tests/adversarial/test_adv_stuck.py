"""No state a run can be left in blocks it for ever: a damaged newest checkpoint is reported
(not skipped until "a checkpoint of step N already exists"), a checkpoint renamed to another
step is refused, curves.png is written atomically (an error names it), a run killed as it
finishes resumes, and a failed start leaves no directory behind."""

import errno
import os
import shutil

import jax
import jax.numpy as jnp
import optax
import pytest

from adv_helpers import FAST, digests, make_fifo, refused
from jaxnet import checkpoint, init_train_state, tensorfile
from jaxnet.app import run
from jaxnet.app.cli import main
from jaxnet.models import mlp
from jaxnet.run_manifest import MANIFEST_FILE, write_run_manifest

EPOCHS_3 = ["train", "--epochs", "3", "--hidden", "16", "--checkpoint-every", "1",
            "--no-progress"]


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("adv_stuck") / "run"
    assert main([*EPOCHS_3, "--out", str(out)]) == 0
    return out


@pytest.fixture
def killed(three_checkpoints, tmp_path):
    """The run as if killed after its third checkpoint, before its params were written."""
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out, ignore=shutil.ignore_patterns(".lock"))
    (out / "params.safetensors").unlink()
    write_run_manifest(out, ["config.json"])
    return out


def newest(run_dir):
    return checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]


@pytest.mark.parametrize("damage", ["missing", "fifo", "directory"])
def test_a_newest_checkpoint_without_a_regular_manifest_is_reported(killed, capsys, damage):
    last = newest(killed)
    manifest = last / "manifest.json"
    manifest.unlink()
    if damage == "fifo":
        make_fifo(manifest)
    elif damage == "directory":
        manifest.mkdir()
    before = digests(killed)
    err = refused(["train", "--resume", killed], capsys, last, "not a complete checkpoint")
    assert "remove it" in err
    assert digests(killed) == before
    shutil.rmtree(last)  # as the message says: the run resumes from the one before
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    assert [p.name for p in checkpoint.list_checkpoints(killed / "checkpoints")][-1] == last.name


def test_save_checkpoint_names_an_incomplete_directory_in_its_way(tmp_path):
    net = mlp((), 2)
    state = init_train_state(net, optax.sgd(0.1), net.init(jax.random.key(0), jnp.zeros((1, 3))))
    first = checkpoint.save_checkpoint(tmp_path, state)
    (first / "manifest.json").unlink()
    with pytest.raises(FileExistsError, match=f"{first}: not a complete checkpoint"):
        checkpoint.save_checkpoint(tmp_path, state)
    assert checkpoint.incomplete_checkpoints(tmp_path) == [first]
    assert checkpoint.list_checkpoints(tmp_path) == []


def test_a_checkpoint_renamed_to_another_step_is_refused_naming_both(killed, capsys):
    last = newest(killed)
    step = int(last.name.split("-")[1])
    forged = last.with_name(f"ckpt-{step + 100:06d}")
    shutil.copytree(last, forged)
    before = digests(killed)
    err = refused(["train", "--resume", killed], capsys, forged / "manifest.json",
                  f"step {step},", f"named for step {step + 100}")
    assert "renamed or forged" in err
    assert digests(killed) == before


def test_curves_png_is_written_atomically_and_a_failure_names_it(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_fsync = os.fsync

    def full_disk_for_curves(fd):
        if ".curves.png." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(tensorfile.os, "fsync", full_disk_for_curves)
    refused(["train", *FAST, "--checkpoint-every", "1", "--out", out], capsys,
            out / "curves.png", "No space left on device")
    assert not (out / "curves.png").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".curves.png.")]
    monkeypatch.undo()  # the disk has room again: the run resumes and finishes
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert (out / "curves.png").stat().st_size > 0


def test_a_run_killed_between_its_params_and_its_manifest_resumes(killed):
    shutil.copy(newest(killed) / "state.safetensors", killed / "params.safetensors")  # any bytes
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    assert "params.safetensors" in (killed / MANIFEST_FILE).read_text()
    run.read_run(killed)  # verified


def test_a_start_that_fails_after_config_json_leaves_no_directory(tmp_path, capsys, monkeypatch):
    def fails(*args, **kwargs):
        raise ValueError("fit: batch_size must be a positive integer, got 0")

    monkeypatch.setattr(run, "fit", fails)  # after config.json and its manifest were written
    out = tmp_path / "new" / "run"
    refused(["train", *FAST, "--out", out], capsys, "--batch-size")
    assert not (tmp_path / "new").exists()
