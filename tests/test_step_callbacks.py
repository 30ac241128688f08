"""Callbacks every N steps: ``fit`` runs each epoch's compiled program in segments of steps, with
bitwise the results of whole epochs, and resumes exactly from a mid-epoch checkpoint."""

import importlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet.train.callbacks import Checkpointer, EarlyStopping, JSONLogger
from support import CHILD_ENV, blobs

STEPS = 7  # 100 examples in batches of 16: the last batch padded


class Recorder:
    """Keeps every step callback's arguments."""

    def __init__(self, every_steps):
        self.every_steps, self.calls = every_steps, []

    def on_step_end(self, step, record, state):
        self.calls.append((step, record, state))


@pytest.fixture
def problem(rng, key):
    x, y = blobs(rng, n=100)
    net = jn.serial(jn.Dense(16), jn.Dropout(0.2), jn.relu, jn.Dense(3))  # draws step keys
    return net, net.init(key, x[:1]), (x, y)


def train(problem, start=None, epochs=3, **kwargs):
    net, params, data = problem
    return jn.fit(net, params if start is None else start, optax.adam(1e-2), data, epochs=epochs,
                  batch_size=16, key=jax.random.key(3), progress=False, **kwargs)


def leaves(state):
    return [np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(
        leaf.dtype, jax.dtypes.prng_key) else leaf) for leaf in jax.tree.leaves(state)]


def assert_same_state(a, b):
    for left, right in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(left, right)


def without_times(history):
    return [{k: v for k, v in r.items() if "second" not in k} for r in history]


def test_epochs_in_segments_train_bitwise_as_whole_epochs(problem):
    whole, history = train(problem)
    segmented, segmented_history = train(problem, callbacks=[Recorder(3)])
    assert_same_state(segmented, whole)
    assert without_times(segmented_history) == without_times(history)
    every_three, every_two = Recorder(3), Recorder(2)
    one_step_segments, _ = train(problem, callbacks=[every_three, every_two])  # gcd: 1 step
    assert_same_state(one_step_segments, whole)
    # after steps 3 and 6 of each epoch of 7 (its end is on_epoch_end's)
    assert [step for step, _, _ in every_three.calls] == [3, 6, 10, 13, 17, 20]
    assert [step for step, _, _ in every_two.calls] == [2, 4, 6, 9, 11, 13, 16, 18, 20]


def test_step_callbacks_get_records_and_states_they_may_keep(problem):
    recorder = Recorder(3)
    final, history = train(problem, callbacks=[recorder])
    step, record, state = recorder.calls[1]  # after step 6 of epoch 1, kept past training
    assert record["epoch"] == 1 and record["step"] == step == int(state.step) == 6
    assert set(record) == {"epoch", "step", "train_loss", "train_accuracy"}
    assert 0 < record["train_loss"] < 10 and 0 <= record["train_accuracy"] <= 1
    assert not np.array_equal(np.asarray(state.params["dense_1"]["w"]),
                              np.asarray(final.params["dense_1"]["w"]))
    continued, _ = train(problem, start=state, epochs=1)  # the rest of epoch 1, from the copy
    assert int(continued.step) == STEPS


def test_a_mid_epoch_checkpoint_resumes_to_the_same_bits(problem, tmp_path):
    whole, history = train(problem, callbacks=[Checkpointer(tmp_path, every=None, every_steps=3,
                                                            keep=None)])
    assert [p.name for p in jn.checkpoint.list_checkpoints(tmp_path)] == [
        f"ckpt-{step:06d}" for step in (3, 6, 10, 13, 17, 20)]
    net, params, _ = problem
    template = jn.init_train_state(net, optax.adam(1e-2), params, key=jax.random.key(3))
    middle, manifest = jn.restore_checkpoint(tmp_path / "ckpt-000010", template)
    assert manifest["metadata"]["record"]["epoch"] == 2 and manifest["metadata"]["record"]["step"] == 10
    resumed, rest = train(problem, start=middle)  # the last 4 steps of epoch 2, then epoch 3
    assert_same_state(resumed, whole)
    assert [r["epoch"] for r in rest] == [2, 3]
    assert without_times(rest[1:]) == without_times(history[2:])
    again, _ = train(problem, start=middle, callbacks=[Recorder(2)])  # segments from mid-epoch
    assert_same_state(again, whole)


def test_epoch_and_step_callbacks_together(problem, tmp_path):
    log = tmp_path / "log.jsonl"
    stop = EarlyStopping("train_loss", patience=1)
    train(problem, callbacks=[stop, JSONLogger(log, every_steps=4)])
    steps = [json.loads(line).get("step") for line in log.read_text().splitlines()]
    assert steps == [4, None, 11, None, 18, None]  # step records within each epoch, then its own


def test_without_step_callbacks_epochs_run_whole(problem, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an epoch ran in segments")

    # the module, not the function jaxnet.train.fit that its package exports
    monkeypatch.setattr(importlib.import_module("jaxnet.train.fit"), "_SegmentedEpochs", refuse)
    train(problem, callbacks=[EarlyStopping("train_loss")])


def test_bad_step_callbacks_are_refused(problem, tmp_path):
    with pytest.raises(ValueError, match="Checkpointer: every_steps must be a positive integer, got 0"):
        Checkpointer(tmp_path, every_steps=0)

    class NoHook:
        every_steps = 2

    with pytest.raises(TypeError, match=r"NoHook: has every_steps=2 but no on_step_end\(step, record, state\)"):
        train(problem, callbacks=[NoHook()])
    _, _, (x, y) = problem
    batches = [(x[:50], y[:50]), (x[50:], y[50:])]
    with pytest.raises(ValueError, match="callbacks with every_steps need train_data in memory"):
        jn.fit(problem[0], problem[1], optax.adam(1e-2), batches, epochs=1, progress=False,
               callbacks=[Recorder(1)])


DATA_PARALLEL = textwrap.dedent("""
    import jax, numpy as np, optax
    import jaxnet as jn
    from jaxnet import data_parallel
    x = np.random.default_rng(0).normal(size=(100, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    net = jn.serial(jn.Dense(16), jn.relu, jn.Dense(2))
    params = net.init(jax.random.key(0), x[:1])

    class Steps:
        every_steps = 2
        def on_step_end(self, step, record, state):
            pass

    fit = lambda **kw: jn.fit(net, params, optax.adam(1e-2), (x, y), epochs=2, batch_size=16,
                              progress=False, mesh=data_parallel.data_mesh(2), **kw)
    whole, segmented = fit()[0], fit(callbacks=[Steps()])[0]
    print(np.array_equal(whole.params["dense_1"]["w"], segmented.params["dense_1"]["w"]))
""")


def test_segments_on_a_data_parallel_mesh(tmp_path):
    script = tmp_path / "segments.py"
    script.write_text(DATA_PARALLEL)
    env = CHILD_ENV | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                       "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True"]
