"""A new run or sweep never lands on another one, nor on foreign files; --force replaces only an
old run's (or sweep's) own files."""

import json
import shutil

from adv_helpers import FAST, digests, refused
from jaxnet.app.cli import main
from jaxnet.run_manifest import write_run_manifest

SWEEP = ["sweep", "--hidden", "8", "--epochs", "1", "--seeds", "1", "--shared-order",
         "--no-progress"]


def test_train_refuses_a_directory_with_foreign_files_even_with_force(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    before = digests(out)
    err = refused(["train", *FAST, "--out", out], capsys, out, "notes.txt")
    assert "not empty" in err
    refused(["train", *FAST, "--force", "--out", out], capsys, out, "notes.txt")
    assert digests(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # no .lock left either


def test_train_refuses_an_existing_run_without_force(finished_run, capsys):
    before = digests(finished_run)
    err = refused(["train", *FAST, "--out", finished_run], capsys, finished_run, "--force")
    assert "already holds a run" in err
    assert digests(finished_run) == before


def test_train_force_replaces_only_the_old_runs_files(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / ".params.safetensors.abcd_123.tmp").write_bytes(b"left by a kill")
    assert main(["train", "--epochs", "1", "--hidden", "8", "--no-progress", "--force",
                 "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["config"]["hidden"] == [8]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (out / ".params.safetensors.abcd_123.tmp").exists()


def test_force_keeps_a_run_with_foreign_files(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "analysis.ipynb").write_text("{}")
    before = digests(out)
    refused(["train", *FAST, "--force", "--out", out], capsys, out, "analysis.ipynb")
    assert digests(out) == before


def test_train_into_a_sweep_and_sweep_into_a_run_are_refused(finished_run, finished_sweep,
                                                               capsys):
    sweep_before, run_before = digests(finished_sweep), digests(finished_run)
    for force in ([], ["--force"]):
        err = refused(["train", *FAST, *force, "--out", finished_sweep], capsys, finished_sweep,
                      "sweep.json")
        assert "holds a sweep" in err
        err = refused([*SWEEP, *force, "--out", finished_run], capsys, finished_run,
                      "config.json")
        assert "holds a run" in err
    assert digests(finished_sweep) == sweep_before and digests(finished_run) == run_before


def test_sweep_refuses_an_old_sweep_unless_forced(finished_sweep, tmp_path, capsys):
    before = digests(finished_sweep)
    err = refused([*SWEEP, "--out", finished_sweep], capsys, finished_sweep, "--force")
    assert "already holds a sweep" in err
    assert digests(finished_sweep) == before
    out = tmp_path / "sweep"
    shutil.copytree(finished_sweep, out)
    assert main([*SWEEP, "--seeds", "2", "--force", "--out", str(out)]) == 0
    assert len(json.loads((out / "sweep.json").read_text())["members"]) == 2


def test_resume_still_continues_its_own_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--hidden", "8", "--checkpoint-every", "1",
                 "--no-progress", "--out", str(out)]) == 0
    (out / "params.safetensors").unlink()  # as if killed after its last checkpoint, when ...
    write_run_manifest(out, ["config.json"])  # ... its manifest listed only config.json
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert (out / "params.safetensors").is_file()


def test_resume_takes_no_force(finished_run, capsys):
    before = digests(finished_run)
    refused(["train", "--resume", finished_run, "--force"], capsys, "--force")
    assert digests(finished_run) == before
