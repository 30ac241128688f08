"""The kill -9 campaign: ``jaxnet train`` (a small MLP on digits, a checkpoint every epoch, the
two newest kept, so every save also prunes) is SIGKILLed at random moments (start-up and
restore, training, checkpoint writes and pruning, the final writes), resumed processes
included, then resumed until it finishes; its params must equal an uninterrupted run's, bit
for bit, and its metrics apart from timings.

Slow (minutes): ``pytest tests/adversarial/test_adv_kill.py -m slow -s`` runs three schedules
and prints what each did; ``python tests/adversarial/test_adv_kill.py [SCHEDULES]`` runs the
whole campaign (10 schedules by default) and prints the counts.
"""

import collections
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.numpy

from adv_helpers import CLI, quiet_env
from jaxnet.run_manifest import MANIFEST_FILE
from jaxnet.tensorfile import load_metadata

EPOCHS = 8
KEEP = 2  # checkpoints kept: every save from the third on prunes one
TRAIN = [*CLI, "train", "--epochs", str(EPOCHS), "--hidden", "32", "--checkpoint-every", "1",
         "--keep-checkpoints", str(KEEP), "--no-progress"]
MOMENTS = ("start-up", "training", "checkpoint", "pruning", "end")
WAIT = 300  # seconds a process may take to reach a moment (a loaded machine)


def finished(run: Path) -> bool:
    try:
        return "params.safetensors" in json.loads((run / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError):
        return False


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def entries(directory: Path) -> list[str]:
    try:
        return [p.name for p in directory.iterdir()]
    except OSError:
        return []


def command(run: Path) -> list[str]:
    """Resume once config.json exists; before, the run had not started: start it again
    (``--force``: a kill can leave a temporary config.json behind)."""
    if (run / "config.json").exists():
        return [*TRAIN[:len(CLI) + 1], "--resume", str(run), "--no-progress"]
    return [*TRAIN, "--force", "--out", str(run)]


def reached(moment: str, run: Path, epochs_before: int, rng: random.Random):
    """A test of whether ``moment`` has come, for a process started when ``run`` had
    ``epochs_before`` lines of metrics."""
    if moment == "start-up":
        deadline = time.monotonic() + rng.uniform(0, 4)  # JAX's start-up, the restore
        return lambda: time.monotonic() >= deadline
    if moment == "training":
        target = epochs_before + rng.randint(0, 2)
        return lambda: lines(run / "metrics.jsonl") > target
    if moment == "checkpoint":  # a save's temporary directory, or a pruned one's
        return lambda: any(n.startswith(".ckpt-") for n in entries(run / "checkpoints"))
    if moment == "pruning":  # a new checkpoint is in place, the oldest not yet deleted
        return lambda: len(complete(run)) > KEEP
    return lambda: any(n.startswith((".curves", ".params", "params", "curves"))
                       for n in entries(run))


def kill_at(moment: str, run: Path, rng: random.Random) -> dict:
    """Starts the run's next process and SIGKILLs it at ``moment`` (plus a random fraction of
    an epoch); what it left behind, or that it finished first."""
    process = subprocess.Popen(command(run), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=quiet_env())
    come, deadline = reached(moment, run, lines(run / "metrics.jsonl"), rng), time.monotonic() + WAIT
    while process.poll() is None and not come() and time.monotonic() < deadline:
        time.sleep(0.0005)
    time.sleep({"checkpoint": rng.uniform(0, 0.01), "pruning": 0, "end": rng.uniform(0, 0.01)}
               .get(moment, rng.uniform(0, 0.05)))
    process.kill()
    stderr = process.communicate()[1]
    if process.returncode != -9:
        assert process.returncode == 0, stderr
        return {"moment": moment, "killed": False}
    leftovers = sorted(n for n in entries(run / "checkpoints") + entries(run)
                       if n.startswith(".") and n != ".lock")
    return {"moment": moment, "killed": True, "metrics": lines(run / "metrics.jsonl"),
            "leftovers": leftovers, "checkpoints": len(complete(run))}


def complete(run: Path) -> list[str]:
    return [n for n in entries(run / "checkpoints") if n.startswith("ckpt-")]


def strip_times(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if "second" not in k}
            for line in path.read_text().splitlines()]


def campaign(root: Path, seed: int, whole: Path) -> list[dict]:
    """One kill schedule: 2 to 5 kills at random moments, then resumes until finished;
    asserts the result equals ``whole``'s. Returns what each kill did."""
    rng, run = random.Random(seed), root / f"killed-{seed}"
    events = [kill_at(rng.choice(MOMENTS), run, rng) for _ in range(rng.randint(2, 5))
              if not finished(run)]
    for _ in range(5):
        if finished(run):
            break
        done = subprocess.run(command(run), capture_output=True, text=True, timeout=WAIT,
                              env=quiet_env())
        assert done.returncode == 0, done.stderr
    assert finished(run)
    assert params_bytes(run) == params_bytes(whole)
    assert strip_times(run / "metrics.jsonl") == strip_times(whole / "metrics.jsonl")
    return events


def params_bytes(run: Path) -> tuple[dict, dict]:
    """The final params, each tensor's dtype, shape and bytes, and the file's metadata. (Not
    the file's bytes: safetensors writes the metadata's keys in an order that varies from
    process to process.)"""
    tensors = safetensors.numpy.load_file(str(run / "params.safetensors"))
    return ({name: (a.dtype.str, a.shape, a.tobytes()) for name, a in tensors.items()},
            load_metadata(run / "params.safetensors"))


def uninterrupted(root: Path) -> Path:
    whole = root / "whole"
    done = subprocess.run([*TRAIN, "--out", str(whole)], timeout=WAIT, capture_output=True,
                          text=True, env=quiet_env())
    assert done.returncode == 0, done.stderr
    return whole


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return uninterrupted(tmp_path_factory.mktemp("kill_campaign"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))  # the suite's share; the script runs as many as asked
def test_killed_at_random_moments_the_run_resumes_to_the_same_bits(whole, seed):
    events = campaign(whole.parent, seed, whole)
    print(f"schedule {seed}:", events)


def summary(events: list[dict]) -> str:
    kills = [e for e in events if e["killed"]]
    by_moment = collections.Counter(e["moment"] for e in kills)
    during_save = sum(any(".tmp" in n for n in e["leftovers"]) for e in kills)
    during_prune = sum(any(".deleting" in n for n in e["leftovers"]) or e["checkpoints"] > KEEP
                       for e in kills)
    return (f"{len(kills)} kills ({dict(by_moment)}), {len(events) - len(kills)} processes "
            f"finished before their kill; {during_save} left a temporary file or directory "
            f"(killed while writing), {during_prune} a checkpoint not yet or half deleted (killed "
            "while pruning)")


if __name__ == "__main__":
    import tempfile

    schedules = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        reference, everything = uninterrupted(root), []
        for seed in range(schedules):
            events = campaign(root, seed, reference)
            everything += events
            print(f"schedule {seed}: bitwise equal after {summary(events)}", flush=True)
        print(f"all {schedules} schedules bitwise equal; {summary(everything)}")
