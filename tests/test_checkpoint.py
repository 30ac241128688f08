import errno
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxnet as jn
from jaxnet import checkpoint, train
from jaxnet.losses import softmax_cross_entropy
from jaxnet.app import run
from jaxnet.checkpoint import CheckpointError
from jaxnet.run_manifest import manifest_digest, write_run_manifest
from jaxnet.app.cli import main
from jaxnet.tensorfile import named_leaves


def blobs(rng, n=48, classes=3, features=5):
    centers = rng.normal(size=(classes, features)) * 3
    labels = rng.integers(0, classes, size=n)
    x = centers[labels] + rng.normal(size=(n, features))
    return x.astype(np.float32), labels.astype(np.int32)


def bn_mlp(classes=3, width=8):
    return jn.serial(jn.Dense(width), jn.BatchNorm(), jn.relu, jn.Dense(classes))


def make_optimizer():
    return optax.chain(optax.add_decayed_weights(1e-4),
                       optax.adam(optax.cosine_decay_schedule(1e-2, 100)))


def trained_state(key, rng, net=None, optimizer=None, epochs=1):
    """A TrainState after some training: params, BatchNorm state, Adam moments, step, key."""
    net = net or bn_mlp()
    x, y = blobs(rng)
    params, model_state = net.init_with_state(key, x[:1])
    state, _ = train.fit(net, params, optimizer or make_optimizer(), (x, y), epochs=epochs,
                         batch_size=16, model_state=model_state, key=jax.random.key(7),
                         progress=False)
    return state


def assert_states_equal(a, b, rtol=0.0):
    """Bit for bit by default; ``rtol``: floats may differ by rounding (different programs)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert u.dtype == v.dtype and u.shape == v.shape
        if jnp.issubdtype(u.dtype, jax.dtypes.prng_key):
            u, v = jax.random.key_data(u), jax.random.key_data(v)
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=rtol)


def rewrite_manifest(ckpt: Path, change) -> None:
    """Edits a checkpoint's manifest and re-signs it, as a consistent (but wrong) writer would."""
    manifest = json.loads((ckpt / checkpoint.MANIFEST_FILE).read_text())
    change(manifest)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (ckpt / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest))


def resign_tensor_file(ckpt: Path) -> None:
    """Makes the manifest's size and checksum agree with the tensor file as it now is."""
    data = (ckpt / checkpoint.TENSOR_FILE).read_bytes()
    rewrite_manifest(ckpt, lambda m: m["tensor_file"].update(
        bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))


@pytest.fixture(scope="module")
def state():
    """Shared by the tests (which never donate or change it): one compilation of fit."""
    return trained_state(jax.random.key(0), np.random.default_rng(0))


# --- format -------------------------------------------------------------------------------------


def test_a_train_state_round_trips_bit_for_bit(state, tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, state, metadata={"epoch": 1})
    assert path == tmp_path / f"ckpt-{int(state.step):06d}"
    restored, manifest = checkpoint.restore_checkpoint(path, state)
    assert_states_equal(restored, state)
    assert manifest["step"] == int(state.step) and manifest["metadata"] == {"epoch": 1}
    # an abstract template (no arrays computed) restores the same
    abstract, _ = checkpoint.restore_checkpoint(path, jax.eval_shape(lambda: state))
    assert_states_equal(abstract, state)


def test_the_files_are_readable_safetensors_and_json(state, tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, state, metadata={"config": {"lr": 0.01}})
    tensors = safetensors.numpy.load_file(str(path / "state.safetensors"))
    assert {"params.dense_1.w", "params.batch_norm_1.scale", "model_state.batch_norm_1.mean",
            "opt_state.1.0.mu.dense_1.w", "opt_state.1.0.count", "opt_state.1.1.count", "step",
            "key"} <= set(tensors)
    np.testing.assert_array_equal(tensors["params.dense_1.w"], state.params["dense_1"]["w"])
    np.testing.assert_array_equal(tensors["key"], jax.random.key_data(state.key))
    assert tensors["step"].shape == () and tensors["step"] == int(state.step)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "jaxnet-checkpoint" and manifest["format_version"] == 1
    assert manifest["tensor_file"]["sha256"] == hashlib.sha256(
        (path / "state.safetensors").read_bytes()).hexdigest()
    assert set(manifest["versions"]) >= {"jaxnet", "jax", "optax"}
    leaves = {leaf["name"]: leaf for leaf in manifest["leaves"]}
    assert leaves["params.dense_1.w"] == {"name": "params.dense_1.w", "shape": [5, 8],
                                          "dtype": "float32"}
    assert leaves["key"]["key_impl"] == "threefry2x32" and leaves["key"]["shape"] == [2]
    assert list(leaves) == [name for name, _ in named_leaves(state)]  # in tree order


def test_only_the_newest_checkpoints_are_kept(state, tmp_path):
    for step in range(1, 6):
        checkpoint.save_checkpoint(tmp_path, state._replace(step=jnp.int32(step)), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-000004", "ckpt-000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000004", "ckpt-000005"]
    assert checkpoint.latest_checkpoint(tmp_path).name == "ckpt-000005"
    assert checkpoint.latest_checkpoint(tmp_path / "none") is None


def test_a_checkpoint_is_never_overwritten(state, tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, state)
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match=f"{path}: a checkpoint of step"):
        checkpoint.save_checkpoint(tmp_path, state)
    assert (path / "manifest.json").read_bytes() == before


def test_what_a_killed_writer_leaves_is_never_picked_up(state, tmp_path):
    good = checkpoint.save_checkpoint(tmp_path, state)
    later = state._replace(step=state.step + 1)
    # a save killed before its rename, and a directory of the right name without its manifest
    half = tmp_path / f".ckpt-{int(later.step):06d}.x1y2.tmp"
    half.mkdir()
    (half / "state.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / "ckpt-999999").mkdir()
    (tmp_path / "ckpt-999999" / "state.safetensors").write_bytes(b"\x00" * 10)
    assert checkpoint.list_checkpoints(tmp_path) == [good]
    checkpoint.save_checkpoint(tmp_path, later)
    assert not half.exists()  # the next save clears the leftovers


def test_a_full_disk_at_any_point_never_damages_the_previous_checkpoint(state, tmp_path,
                                                                         monkeypatch):
    root = tmp_path / "checkpoints"
    previous = checkpoint.save_checkpoint(root, state)
    shutil.copytree(root, tmp_path / "scratch")
    later = state._replace(step=state.step + 1)
    real = {name: getattr(os, name) for name in ("fsync", "replace", "rename")}
    calls = []

    def patched(name, fail_at):
        def operation(*args):
            calls.append(name)
            if len(calls) == fail_at:
                if name == "fsync" and stat.S_ISREG(os.fstat(args[0]).st_mode):
                    os.ftruncate(args[0], os.fstat(args[0]).st_size // 2)  # half written
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real[name](*args)
        return operation

    with monkeypatch.context() as m:  # count the file-system operations of one save
        for name in real:
            m.setattr(os, name, patched(name, fail_at=0))
        new = checkpoint.save_checkpoint(tmp_path / "scratch", later, keep=1)
    operations = len(calls)  # fsync, rename into place, fsync the directory; prune
    assert operations >= 8 and new.is_dir()

    for fail_at in range(1, operations + 1):
        calls.clear()
        with monkeypatch.context() as m:
            for name in real:
                m.setattr(os, name, patched(name, fail_at))
            with pytest.raises(OSError) as info:
                checkpoint.save_checkpoint(root, later, keep=1)
        assert info.value.errno == errno.ENOSPC, (fail_at, calls)
        listed = checkpoint.list_checkpoints(root)
        assert previous in listed, (fail_at, calls)
        for path in listed:  # whatever is listed is complete
            checkpoint.restore_checkpoint(path, state)
        restored, _ = checkpoint.restore_checkpoint(previous, state)
        assert_states_equal(restored, state)
        if listed == [previous]:
            assert "earlier checkpoints are untouched" in str(info.value)
            assert [p.name for p in root.iterdir()] == [previous.name]  # no leftovers
        for path in listed:
            if path != previous:
                shutil.rmtree(path)


# --- validation ---------------------------------------------------------------------------------


def _truncate(ckpt):
    data = (ckpt / "state.safetensors").read_bytes()
    (ckpt / "state.safetensors").write_bytes(data[:len(data) // 2])


def _flip(ckpt):
    data = bytearray((ckpt / "state.safetensors").read_bytes())
    data[-3] ^= 0x10
    (ckpt / "state.safetensors").write_bytes(bytes(data))


def _disagree(ckpt):
    tensors = safetensors.numpy.load_file(str(ckpt / "state.safetensors"))
    tensors["params.dense_1.b"] = np.zeros(3, np.float32)
    tensors["extra"] = np.zeros(1, np.float32)
    del tensors["step"]
    (ckpt / "state.safetensors").write_bytes(safetensors.numpy.save(tensors))
    resign_tensor_file(ckpt)


@pytest.mark.parametrize("damage, file, message", [
    (_truncate, "state.safetensors", r"bytes, the manifest says \d+ \(truncated or replaced\)"),
    (_flip, "state.safetensors", "SHA-256 does not match the manifest"),
    (lambda c: rewrite_manifest(c, lambda m: m["tensor_file"].update(sha256="0" * 64)),
     "state.safetensors", "SHA-256 does not match the manifest"),
    (lambda c: (c / "manifest.json").write_text(
        (c / "manifest.json").read_text().replace('"step": ', '"step": 1')),
     "manifest.json", "SHA-256 does not match its contents"),
    (_disagree, "state.safetensors", r"the tensors disagree with .*manifest.json: missing step; "
     r"unexpected extra \(not in the manifest\); mis-shaped params.dense_1.b: \(3,\) float32 in "
     r"the checkpoint, \(8,\) float32 expected"),
    (lambda c: rewrite_manifest(c, lambda m: m.update(format_version=2)),
     "manifest.json", r"format version 2 is newer than this jaxnet reads \(1\); upgrade jaxnet"),
    (lambda c: (c / "manifest.json").write_bytes(b"\xff{not json"), "manifest.json",
     "not valid JSON"),
    (lambda c: (c / "manifest.json").write_text('{"format": "other"}'), "manifest.json",
     "not a jaxnet checkpoint manifest"),
    (lambda c: (c / "manifest.json").unlink(), "manifest.json", "missing; .* is not a complete"),
    (lambda c: (c / "state.safetensors").unlink(), "state.safetensors", "cannot read"),
    (lambda c: rewrite_manifest(c, lambda m: m["tensor_file"].update(name="../../etc/passwd")),
     "manifest.json", "tensor_file must hold a plain file name"),
])
def test_a_damaged_checkpoint_is_a_checkpoint_error_naming_file_and_problem(state, tmp_path,
                                                                            damage, file, message):
    path = checkpoint.save_checkpoint(tmp_path, state)
    damage(path)
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint.restore_checkpoint(path, state)
    assert str(info.value).startswith(str(path / file))
    assert isinstance(info.value, ValueError)


def test_a_checkpoint_of_another_architecture_lists_what_differs(state, tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, state)
    other_net = jn.serial(jn.Dense(8), jn.relu, jn.Dense(4), jn.relu, jn.Dense(3))
    other = jax.eval_shape(lambda: train.init_train_state(
        other_net, make_optimizer(), other_net.init(jax.random.key(0), jnp.zeros((1, 5)))))
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore_checkpoint(path, other)
    message = str(info.value)
    assert message.startswith(f"{path}: does not fit the model: ")
    assert "missing params.dense_3.b, params.dense_3.w" in message
    assert "unexpected params.batch_norm_1.bias, params.batch_norm_1.scale" in message
    assert "mis-shaped params.dense_2.b: (3,) float32 in the checkpoint, (4,) float32 expected" in message
    assert "model_state.batch_norm_1.mean" in message and "opt_state.1.0.nu.dense_2.w" in message


def test_a_checkpoint_of_another_optimizer_is_refused(state, tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, state)
    sgd = train.init_train_state(bn_mlp(), optax.sgd(0.1, momentum=0.9), state.params,
                                 model_state=state.model_state)
    with pytest.raises(CheckpointError, match=r"missing opt_state.0.trace.batch_norm_1.bias.*; "
                                              r"unexpected opt_state.1.0.count, "
                                              r"opt_state.1.0.mu.batch_norm_1.bias"):
        checkpoint.restore_checkpoint(path, sgd)


def test_partial_restore_reports_exactly_what_was_restored(state, tmp_path, key):
    path = checkpoint.save_checkpoint(tmp_path, state)
    # fine-tuning: same body, a new 5-class head, no BatchNorm
    target = jn.serial(jn.Dense(8), jn.relu, jn.Dense(5), jn.relu, jn.Dense(2))
    template = target.init(key, jnp.zeros((1, 5)))
    with pytest.raises(CheckpointError, match="params do not fit the model.*pass partial=True"):
        checkpoint.restore_params(path, template)
    params, report = checkpoint.restore_params(path, template, partial=True)
    assert report.restored == ("dense_1.b", "dense_1.w")
    assert report.missing == ("dense_3.b", "dense_3.w")
    assert report.unexpected == ("batch_norm_1.bias", "batch_norm_1.scale")
    assert report.mismatched == (
        "dense_2.b: (3,) float32 in the checkpoint, (5,) float32 expected",
        "dense_2.w: (8, 3) float32 in the checkpoint, (8, 5) float32 expected")
    np.testing.assert_array_equal(params["dense_1"]["w"], state.params["dense_1"]["w"])
    np.testing.assert_array_equal(params["dense_3"]["w"], template["dense_3"]["w"])
    same, full = checkpoint.restore_params(path, state.params)
    assert full.restored and not (full.missing or full.unexpected or full.mismatched)
    assert_states_equal(same, state.params)


# --- numerical faults ---------------------------------------------------------------------------


def nan_after(steps: int):
    """A learning rate that becomes NaN at optimizer step ``steps``: the params follow."""
    return lambda count: jnp.where(count < steps, 0.05, jnp.nan)


def test_a_nan_epoch_stops_before_its_on_epoch(key, rng):
    x, y = blobs(rng, n=64)
    net = jn.serial(jn.Dense(8), jn.relu, jn.Dense(3))
    seen = []
    with pytest.raises(FloatingPointError, match=r"loss became nan in epoch 3 \(steps 9-12\)"):
        train.fit(net, net.init(key, x[:1]), optax.sgd(nan_after(9)), (x, y), epochs=5,
                  batch_size=16, progress=False, on_epoch=lambda record, s: seen.append(record))
    assert [r["epoch"] for r in seen] == [1, 2]


def test_skip_leaves_out_non_finite_batches_inside_the_compiled_step(key, rng):
    x, y = blobs(rng, n=64)
    net = jn.serial(jn.Dense(8), jn.relu, jn.Dense(3))
    params = net.init(key, x[:1])
    fit = lambda data, on_nan: train.fit(net, params, optax.adam(1e-2), data, epochs=3,
                                         batch_size=16, progress=False, on_nan=on_nan)
    clean_stop, _ = fit((x, y), "stop")
    clean_skip, history = fit((x, y), "skip")
    # nothing to skip: the same numbers up to rounding (the check changes XLA's fusion choices)
    assert_states_equal(clean_stop, clean_skip, rtol=1e-6)
    assert [r["skipped_batches"] for r in history] == [0, 0, 0]
    x_bad = x.copy()
    x_bad[5, 0] = np.nan  # one example: one batch per epoch
    state, history = fit((x_bad, y), "skip")
    assert [r["skipped_batches"] for r in history] == [1, 1, 1]
    assert all(np.isfinite(r["train_loss"]) for r in history)
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(state.params))
    assert int(state.step) == 12


def test_the_nan_check_is_compiled_in_only_when_skipping(key, rng):
    x, y = blobs(rng, n=32)
    net = jn.serial(jn.Dense(8), jn.relu, jn.Dense(3))
    state = train.init_train_state(net, optax.sgd(0.1), net.init(key, x[:1]))

    def program(on_nan):
        epoch, _ = train.make_epoch(net, optax.sgd(0.1), softmax_cross_entropy, 32, 16,
                                    on_nan=on_nan)
        return jax.jit(epoch).lower(state, x, y, jnp.int32(0)).as_text()

    # one test of the mean loss and one per updated param (sgd's state holds no floats); the
    # others are log_softmax's
    assert program("skip").count("is_finite") == (program("stop").count("is_finite") + 1
                                                  + len(jax.tree.leaves(state.params)))
    with pytest.raises(ValueError, match="on_nan must be one of stop, skip; got 'ignore'"):
        train.fit(net, state.params, optax.sgd(0.1), (x, y), epochs=1, on_nan="ignore")


# --- exact resume -------------------------------------------------------------------------------


def test_resuming_from_a_checkpoint_replays_the_run_bitwise(key, rng, tmp_path):
    x, y = blobs(rng, n=50)  # 4 batches of 16, the last one masked
    net = jn.serial(jn.Dense(16), jn.Dropout(0.2), jn.relu, jn.Dense(3))  # uses the step keys
    params = net.init(key, x[:1])
    fit = lambda start, **kw: train.fit(net, start, make_optimizer(), (x, y), epochs=4,
                                        batch_size=16, key=jax.random.key(3), progress=False, **kw)
    save = lambda record, s: checkpoint.save_checkpoint(tmp_path, s, metadata=record)
    full, history = fit(params, on_epoch=save)
    # the process is lost after epoch 2: all that is left is the disk
    template = train.init_train_state(net, make_optimizer(), net.init(key, x[:1]),
                                      key=jax.random.key(3))
    resumed_from, manifest = checkpoint.restore_checkpoint(tmp_path / "ckpt-000008", template)
    assert manifest["metadata"]["epoch"] == 2
    resumed, rest = fit(resumed_from)
    assert_states_equal(resumed, full)
    strip = lambda records: [{k: v for k, v in r.items() if "second" not in k} for r in records]
    assert strip(rest) == strip(history[2:])


FAST = dict(epochs=3, hidden=(16,), batch_size=64, checkpoint_every=1, keep_checkpoints=5)


def strip_times(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if "second" not in k}
            for line in path.read_text().splitlines()]


def test_a_run_interrupted_after_a_checkpoint_resumes_to_the_same_bits(tmp_path, monkeypatch):
    config = run.RunConfig(**FAST)
    run.train(config, tmp_path / "whole", progress=False)
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    real_save = run.save_checkpoint

    def dies_at_epoch_3(directory, state, **kwargs):  # after epoch 3's metrics, before its save
        if kwargs["metadata"]["epoch"] == 3:
            raise KeyboardInterrupt
        return real_save(directory, state, **kwargs)

    monkeypatch.setattr(run, "save_checkpoint", dies_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run.train(config, interrupted, progress=False)
    monkeypatch.undo()
    assert len(strip_times(interrupted / "metrics.jsonl")) == 3  # one epoch past the checkpoint
    assert not (interrupted / "params.safetensors").exists()
    _, history, _, _ = run.train(config, interrupted, progress=False, resume=True)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert ((interrupted / "params.safetensors").read_bytes()
            == (tmp_path / "whole" / "params.safetensors").read_bytes())
    assert strip_times(interrupted / "metrics.jsonl") == strip_times(tmp_path / "whole" / "metrics.jsonl")
    with pytest.raises(ValueError, match="the run is finished"):
        run.train(config, interrupted, progress=False, resume=True)


def test_a_checkpoint_saved_before_newer_options_existed_resumes(tmp_path, monkeypatch):
    """Options added later (precision, devices, init_scale) take their defaults on resume."""
    config = run.RunConfig(**FAST)
    real_save = run.save_checkpoint

    def older_version(directory, state, **kwargs):
        saved = kwargs["metadata"]["config"]
        kwargs["metadata"]["config"] = {k: v for k, v in saved.items()
                                        if k not in ("precision", "devices", "init_scale")}
        if kwargs["metadata"]["epoch"] == 3:
            raise KeyboardInterrupt
        return real_save(directory, state, **kwargs)

    monkeypatch.setattr(run, "save_checkpoint", older_version)
    with pytest.raises(KeyboardInterrupt):
        run.train(config, tmp_path, progress=False)
    monkeypatch.undo()
    _, history, _, _ = run.train(config, tmp_path, progress=False, resume=True)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert (tmp_path / "params.safetensors").is_file()


def test_a_nan_run_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = run.RunConfig(**{**FAST, "epochs": 5})
    seen = {}

    def build_optimizer(config, steps, **_):  # NaN from the 4th step of epoch 3
        seen["steps"] = steps
        return optax.sgd(nan_after(2 * steps + 3))

    monkeypatch.setattr(run, "build_optimizer", build_optimizer)
    with pytest.raises(FloatingPointError) as info:
        run.train(config, tmp_path, progress=False)
    steps = seen["steps"]
    last_good = tmp_path / "checkpoints" / f"ckpt-{2 * steps:06d}"
    assert f"loss became nan in epoch 3 (steps {2 * steps + 1}-{3 * steps})" in str(info.value)
    assert f"the last good checkpoint is {last_good}" in str(info.value)
    assert checkpoint.list_checkpoints(tmp_path / "checkpoints")[-1] == last_good
    assert [r["epoch"] for r in strip_times(tmp_path / "metrics.jsonl")] == [1, 2]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--epochs", "2", "--hidden", "16", "--batch-size", "64",
                 "--checkpoint-every", "1", "--no-progress", "--out", str(out)]) == 0
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_cli_writes_checkpoints_and_refuses_to_resume_a_finished_run(cli_run, capsys):
    assert [p.name for p in checkpoint.list_checkpoints(cli_run / "checkpoints")] == [
        "ckpt-000021", "ckpt-000042"]  # 1294 digits (144 held out for validation), batches of 64
    assert main(["train", "--resume", str(cli_run)]) == 2
    assert "the run is finished" in capsys.readouterr().err
    assert main(["train", "--resume", str(cli_run), "--lr", "0.1", "--epochs", "5"]) == 2
    assert "takes no other training options (got --epochs, --lr)" in capsys.readouterr().err


def test_cli_resume_of_a_corrupt_run_changes_nothing(cli_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(cli_run, broken)
    (broken / "params.safetensors").unlink()  # killed before the end, when its manifest ...
    write_run_manifest(broken, ["config.json"])  # ... listed only config.json
    (broken / "metrics.jsonl").write_text((broken / "metrics.jsonl").read_text() + '{"epo')
    _flip(broken / "checkpoints" / "ckpt-000042")
    before = snapshot(broken)
    assert main(["train", "--resume", str(broken), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxnet: error: ")
    assert f"{broken}/checkpoints/ckpt-000042/state.safetensors: SHA-256 does not match" in err
    assert snapshot(broken) == before
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "config.json: missing" in capsys.readouterr().err


# --- fuzzing ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid(tmp_path_factory, state):
    """A valid checkpoint and its template, shared by the fuzz tests."""
    return checkpoint.save_checkpoint(tmp_path_factory.mktemp("valid"), state), state


FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def restore_mutated(valid, file: str, mutate, resign: bool = False):
    """Restores a copy of the valid checkpoint whose ``file`` is mutated; returns the state or
    None when a CheckpointError was raised (any other exception fails the test)."""
    path, state = valid
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / path.name
        shutil.copytree(path, copy)
        (copy / file).write_bytes(mutate((copy / file).read_bytes()))
        if resign:
            resign_tensor_file(copy)
        try:
            return checkpoint.restore_checkpoint(copy, state)[0]
        except CheckpointError as error:
            assert str(error).startswith(str(copy))
            return None


def flip(index, bit):
    def mutate(data: bytes) -> bytes:
        data = bytearray(data)
        data[index % len(data)] ^= 1 << bit
        return bytes(data)
    return mutate


FILES = st.sampled_from([checkpoint.TENSOR_FILE, checkpoint.MANIFEST_FILE])


@FUZZ
@given(file=FILES, data=st.binary(max_size=2000))
def test_fuzz_random_bytes_are_a_checkpoint_error(valid, file, data):
    assert restore_mutated(valid, file, lambda _: data) is None


@FUZZ
@given(file=FILES, index=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_fuzz_a_flipped_bit_is_a_checkpoint_error(valid, file, index, bit):
    restored = restore_mutated(valid, file, flip(index, bit))
    if restored is not None:  # only a flip the JSON parser does not see: whitespace, say
        assert file == checkpoint.MANIFEST_FILE
        assert_states_equal(restored, valid[1])


@FUZZ
@given(file=FILES, length=st.integers(0, 10**6))
def test_fuzz_truncation_is_a_checkpoint_error(valid, file, length):
    restored = restore_mutated(valid, file, lambda data: data[:length % len(data)])
    assert restored is None


@FUZZ
@given(index=st.integers(0, 10**6), bit=st.integers(0, 7), length=st.integers(1, 10**6))
def test_fuzz_a_resigned_damaged_tensor_file_is_a_checkpoint_error_or_well_formed(valid, index,
                                                                                  bit, length):
    # The checksums now agree with the damage: what is left is the safetensors parser and the
    # manifest-against-tensors check, which must still raise nothing but CheckpointError.
    mutate = lambda data: flip(index, bit)(data)[:length]
    restored = restore_mutated(valid, checkpoint.TENSOR_FILE, mutate, resign=True)
    if restored is not None:
        assert jax.tree.structure(restored) == jax.tree.structure(valid[1])


# --- interoperability ---------------------------------------------------------------------------


def test_export_pytorch_gives_linear_and_conv_layouts(key, rng):
    net = jn.serial(jn.Conv2D(4, (3, 2), padding="VALID"), jn.relu, jn.Flatten(), jn.Dense(3))
    x = rng.normal(size=(2, 5, 6, 2)).astype(np.float32)
    params = net.init(key, x[:1])
    torch_params = checkpoint.export_pytorch(params)
    assert {name: a.shape for name, a in torch_params.items()} == {
        "conv_1.weight": (4, 2, 3, 2), "conv_1.bias": (4,),
        "dense_1.weight": (3, 3 * 5 * 4), "dense_1.bias": (3,)}
    # PyTorch's definitions, in NumPy: Conv2d on NCHW input, then Linear (x @ weight.T + bias)
    w, b = torch_params["conv_1.weight"], torch_params["conv_1.bias"]
    nchw = x.transpose(0, 3, 1, 2)
    conv = np.stack([[[[np.sum(nchw[n, :, i:i + 3, j:j + 2] * w[o]) for j in range(5)]
                       for i in range(3)] for o in range(4)] for n in range(2)]) + b[:, None, None]
    hidden = np.maximum(conv, 0).transpose(0, 2, 3, 1).reshape(2, -1)  # back to jaxnet's order
    logits = hidden @ torch_params["dense_1.weight"].T + torch_params["dense_1.bias"]
    np.testing.assert_allclose(logits, net.apply(params, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no PyTorch name for dense_1.kernel"):
        checkpoint.export_pytorch({"dense_1": {"kernel": np.zeros((2, 2))}})


def test_export_pytorch_loads_into_torch_modules(key, rng):
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
    conv = jn.Conv2D(5, (3, 3), padding="VALID")
    dense = jn.Dense(4)
    conv_params, dense_params = conv.init(key, x[:1]), dense.init(key, x[:1])
    exported = checkpoint.export_pytorch({"conv": conv_params, "dense": dense_params})
    torch_conv, torch_linear = torch.nn.Conv2d(3, 5, 3), torch.nn.Linear(3, 4)
    torch_conv.load_state_dict({k[5:]: torch.from_numpy(v) for k, v in exported.items()
                                if k.startswith("conv.")})
    torch_linear.load_state_dict({k[6:]: torch.from_numpy(v) for k, v in exported.items()
                                  if k.startswith("dense.")})
    with torch.no_grad():
        got_conv = torch_conv(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        got_linear = torch_linear(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got_conv.transpose(0, 2, 3, 1), conv.apply(conv_params, x),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_linear, dense.apply(dense_params, x), rtol=1e-5, atol=1e-5)


# --- killed for real ----------------------------------------------------------------------------


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_a_run_killed_at_random_moments_resumes_to_the_same_bits(tmp_path):
    train_command = [sys.executable, "-m", "jaxnet.app.cli", "train", "--no-progress"]
    epochs = 12
    options = ["--epochs", str(epochs), "--hidden", "32", "--checkpoint-every", "1"]
    subprocess.run([*train_command, *options, "--out", str(tmp_path / "whole")], check=True,
                   timeout=300, capture_output=True)
    killed, rng = tmp_path / "killed", random.Random(0)
    metrics = killed / "metrics.jsonl"
    epoch_seconds = max(r["seconds"] for r in map(json.loads, (
        tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()))

    def command():  # killed before config.json was written, the run had not started
        return ([*train_command, "--resume", str(killed)] if (killed / "config.json").exists()
                else [*train_command, *options, "--out", str(killed)])

    # An epoch takes milliseconds and start-up seconds, so the kills wait for a random epoch and
    # then a random fraction of one (checkpoint writes included), or strike at a random moment
    # of start-up (restore included).
    within_an_epoch = lambda: rng.uniform(0, epoch_seconds)
    moments = [lambda: (rng.randint(1, 4), within_an_epoch()), lambda: (0, rng.uniform(0, 4)),
               lambda: (min(lines(metrics) + rng.randint(1, 4), epochs - 1), within_an_epoch())]
    events = []
    for moment in moments:
        epochs_done, delay = moment()
        process = subprocess.Popen(command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while lines(metrics) < epochs_done and process.poll() is None:
            time.sleep(0.005)
        time.sleep(delay)
        process.kill()
        if process.wait() != -9:  # it finished first: nothing left to kill
            break
        events.append((lines(metrics), [p.name for p in checkpoint.list_checkpoints(
            killed / "checkpoints")][-1:], sorted(p.name for p in killed.glob("checkpoints/.*"))))
    print("after each kill: (metrics lines, latest checkpoint, leftovers):", events)
    manifest = killed / "run_manifest.json"  # a finished run's lists params.safetensors
    if not (manifest.exists() and "params.safetensors" in manifest.read_text()):
        last = subprocess.run(command(), capture_output=True, text=True, timeout=300)
        assert last.returncode == 0, last.stderr

    whole = safetensors.numpy.load_file(str(tmp_path / "whole" / "params.safetensors"))
    resumed = safetensors.numpy.load_file(str(killed / "params.safetensors"))
    assert whole.keys() == resumed.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name], resumed[name])
    assert ((killed / "params.safetensors").read_bytes()
            == (tmp_path / "whole" / "params.safetensors").read_bytes())
    assert strip_times(metrics) == strip_times(tmp_path / "whole" / "metrics.jsonl")
