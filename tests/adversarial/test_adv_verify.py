"""Every file a run writes is recorded in its run_manifest.json (size and SHA-256) and verified
before it is used: a flipped byte, a file swapped for another of the same architecture, a
missing or an added file is refused by eval, predict, jaxnet.load_run (and so export),
restore_params and --resume, naming the file; nothing is changed."""

import json
import shutil
import warnings

import numpy as np
import pytest

from adv_helpers import FAST, digests, refused
from jaxnet import checkpoint, load_run
from jaxnet.app.cli import main
from jaxnet.run_manifest import (MANIFEST_FILE, RunVerificationError, UnverifiedRunWarning,
                                 seal_run, write_run_manifest)

RESULTS = ["config.json", "metrics.jsonl", "curves.png", "params.safetensors"]


@pytest.fixture
def copy(finished_run, tmp_path):
    """A copy of the finished run (without checkpoints), to damage."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    return out


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((3, 64), np.float32))
    return path


def commands(run, inputs):
    """The commands that read a finished run's results."""
    return {"eval": ["eval", run],
            "predict": ["predict", run, "--input", inputs, "--output", inputs.with_name("p.npy"),
                        "--no-progress"]}


def flip(path, at: int = -20):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_finished_run_lists_every_file_it_wrote(finished_run):
    manifest = json.loads((finished_run / MANIFEST_FILE).read_text())
    assert list(manifest["files"]) == RESULTS
    load_run(finished_run)  # verified, and no warning (warnings are errors here)


@pytest.mark.parametrize("name", RESULTS)
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_a_flipped_byte_in_any_file_is_refused(copy, inputs, capsys, name, command):
    flip(copy / name)
    before = digests(copy)
    err = refused(commands(copy, inputs)[command], capsys, copy / name)
    assert "SHA-256 does not match" in err and MANIFEST_FILE in err
    assert digests(copy) == before and not inputs.with_name("p.npy").exists()


def test_a_params_file_of_the_same_architecture_swapped_in_is_refused(copy, tmp_path, inputs,
                                                                        capsys):
    other = tmp_path / "other"
    assert main(["train", *FAST, "--seed", "1", "--out", str(other)]) == 0
    size = lambda run: (run / "params.safetensors").stat().st_size  # noqa: E731
    assert size(other) == size(copy)
    shutil.copy(other / "params.safetensors", copy / "params.safetensors")
    before = digests(copy)
    for argv in commands(copy, inputs).values():
        refused(argv, capsys, copy / "params.safetensors", "SHA-256 does not match")
    with pytest.raises(RunVerificationError, match=f"{copy}/params.safetensors: SHA-256"):
        load_run(copy)
    with pytest.raises(RunVerificationError, match=f"{copy}/params.safetensors: SHA-256"):
        load_run(copy / "params.safetensors")  # a params file alone, in its run directory
    with pytest.raises(checkpoint.CheckpointError, match=f"{copy}/params.safetensors: SHA-256"):
        checkpoint.restore_params(copy, load_run(other).params)
    assert digests(copy) == before


def test_a_missing_file_is_refused(copy, capsys):
    (copy / "curves.png").unlink()
    err = refused(["eval", copy], capsys, copy / "curves.png", MANIFEST_FILE)
    assert "missing" in err


def test_a_file_added_to_a_finished_run_is_refused(copy, capsys):
    shutil.copy(copy / "params.safetensors", copy / "model_state.safetensors")
    before = digests(copy)
    err = refused(["eval", copy], capsys, copy / "model_state.safetensors", MANIFEST_FILE)
    assert "added afterwards" in err
    assert digests(copy) == before


@pytest.mark.parametrize("damage", ["edit", "truncate", "format"])
def test_a_damaged_manifest_is_refused(copy, capsys, damage):
    manifest = copy / MANIFEST_FILE
    record = json.loads(manifest.read_text())
    if damage == "edit":  # a recorded checksum changed by hand, without the manifest's own
        record["files"]["params.safetensors"]["sha256"] = "0" * 64
        manifest.write_text(json.dumps(record))
    elif damage == "truncate":
        manifest.write_bytes(manifest.read_bytes()[:40])
    else:
        record["format_version"] = 99
        manifest.write_text(json.dumps(record))
    before = digests(copy)
    refused(["eval", copy], capsys, manifest)
    assert digests(copy) == before


def test_resume_verifies_the_config_it_continues(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--hidden", "8", "--checkpoint-every", "1",
                 "--no-progress", "--out", str(out)]) == 0
    (out / "params.safetensors").unlink()  # as if killed after its last checkpoint ...
    write_run_manifest(out, ["config.json"])  # ... when its manifest listed only config.json
    config = out / "config.json"
    config.write_text(config.read_text().replace('"epochs": 2', '"epochs": 3'))  # same size
    before = digests(out)
    refused(["train", "--resume", out], capsys, config, "SHA-256 does not match")
    assert digests(out) == before


def test_an_unfinished_run_is_not_read_as_a_result(copy, capsys):
    write_run_manifest(copy, ["config.json"])  # killed after params.safetensors, before the end
    before = digests(copy)
    refused(["eval", copy], capsys, copy / "params.safetensors", "has not finished",
            f"jaxnet train --resume {copy}")
    assert digests(copy) == before


def test_a_run_without_a_manifest_is_read_with_a_warning_and_can_be_sealed(copy, capsys):
    (copy / MANIFEST_FILE).unlink()  # as an older jaxnet wrote it
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        assert main(["eval", str(copy)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("jaxnet: warning: ") and err.count("\n") == 1
    assert f"{copy}: no {MANIFEST_FILE}" in err and "seal_run" in err
    with pytest.warns(UnverifiedRunWarning, match=f"{copy}: no {MANIFEST_FILE}"):
        load_run(copy)
    seal_run(copy)
    load_run(copy)  # verified now: no warning
    flip(copy / "params.safetensors")
    with pytest.raises(RunVerificationError, match="params.safetensors: SHA-256"):
        load_run(copy)
    with pytest.raises(FileExistsError, match=f"{MANIFEST_FILE}: already exists"):
        seal_run(copy)


def test_the_best_member_of_a_sweep_is_a_verified_run(finished_sweep):
    best = finished_sweep / "best"
    files = json.loads((best / MANIFEST_FILE).read_text())["files"]
    assert list(files) == ["config.json", "metrics.jsonl", "params.safetensors"]
    load_run(best)
