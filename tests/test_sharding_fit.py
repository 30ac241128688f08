"""``fit``, ``evaluate`` and ``make_train_step`` on sharded meshes, and the sharded checkpoints
of ``fit``'s ``Checkpointer``: exact resume after SIGKILL, on the same mesh and another.

The runs on 8 simulated CPU devices happen in fresh processes (tests/sharding_fit_worker.py);
the checks of arguments run here, on this process's one CPU device.
"""

import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet import sharding
from support import CHILD_ENV

TESTS = Path(__file__).parent
WORKER = TESTS / "sharding_fit_worker.py"
EIGHT = CHILD_ENV | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
MESHES = ("8x1x1", "2x4x1", "2x2x2", "1x1x8")


def worker(*args, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=EIGHT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


def prefixed(results: dict, prefix: str) -> dict[str, np.ndarray]:
    return {k.removeprefix(prefix): v for k, v in results.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_fit") / "out.npz"
    worker("meshes", out)
    with np.load(out, allow_pickle=False) as loaded:
        return dict(loaded)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("mesh", MESHES)
def test_fit_on_a_mesh_equals_one_device(meshes, model, mesh):
    assert int(meshes["devices"]) == 8
    reference = {k: v for k, v in prefixed(meshes, f"{model}/reference/").items()
                 if k not in ("losses", "test_loss")}
    trained = prefixed(meshes, f"{model}/{mesh}/")
    for name, want in reference.items():
        if "attention.key.b" not in name:  # its gradient is rounding noise (test_sharding.py)
            np.testing.assert_allclose(trained[name], want, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{model} on {mesh}: {name}")
    for metric in ("losses", "test_loss"):
        np.testing.assert_allclose(trained[metric], meshes[f"{model}/reference/{metric}"],
                                   rtol=1e-5)
    np.testing.assert_allclose(trained["evaluate"], trained["test_loss"][-1], rtol=1e-5)
    assert trained["losses"][-1] < trained["losses"][0]  # it trained


@pytest.mark.slow
def test_fit_lays_params_and_adam_state_out_by_the_rules(meshes):
    specs = dict(line.split(" ", 1) for line in meshes["transformer/2x2x2/specs"])
    assert specs["params.block_1.mlp.in.w"] == "P('fsdp', 'model')"
    assert specs["opt_state.0.mu.block_1.mlp.in.w"] == "P('fsdp', 'model')"
    assert specs["step"] == "P()"
    sizes = {mesh: int(meshes[f"transformer/{mesh}/bytes"]) for mesh in MESHES}
    assert sizes["8x1x1"] > 3 * sizes["2x4x1"] and sizes["2x4x1"] > sizes["1x1x8"]


@pytest.mark.slow
def test_a_sharded_run_killed_mid_epoch_resumes_exactly(tmp_path):
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "resumed.npz"
    worker("killed", checkpoints, expect=-signal.SIGKILL)
    worker("resume", checkpoints, out)
    with np.load(out, allow_pickle=False) as loaded:
        results = dict(loaded)
    assert list(results["listed"]) == ["ckpt-000004", "ckpt-000006"]  # keep=2, Orbax's layout
    assert all((checkpoints / name / "commit_success.txt").is_file() for name in results["listed"])
    whole = prefixed(results, "uninterrupted/")
    assert int(whole["step"]) == 12 and len(whole) > 20
    for mesh in ("2x4x1", "2x2x2"):
        assert int(results[f"{mesh}/restored_step"]) == int(results[f"{mesh}/record_step"]) == 6
        assert list(results[f"{mesh}/epochs"]) == [2, 3]  # the interrupted epoch is finished
    same = prefixed(results, "2x4x1/")
    for name, want in whole.items():  # the mesh it was saved from: bitwise
        np.testing.assert_array_equal(same[name], want, err_msg=name)
    other = prefixed(results, "2x2x2/")
    for name, want in whole.items():  # another mesh: up to float rounding
        if "attention.key.b" not in name:
            np.testing.assert_allclose(other[name], want, rtol=1e-5, atol=1e-5, err_msg=name)


# --- arguments, on one device -------------------------------------------------------------------


@pytest.fixture
def problem(key):
    net = jn.serial(jn.Dense(8), jn.relu, jn.Dense(3))
    x = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    y = np.arange(12, dtype=np.int32) % 3
    return net, net.init(key, x[:1]), x, y


def test_rules_without_a_mesh_are_refused(problem):
    net, params, x, y = problem
    rules = sharding.ShardingRules()
    with pytest.raises(ValueError, match="fit: rules lay the params out over a mesh; pass mesh"):
        jn.fit(net, params, optax.sgd(0.1), (x, y), epochs=1, rules=rules, progress=False)
    with pytest.raises(ValueError, match="evaluate: rules lay the params out over a mesh"):
        jn.evaluate(net, params, (x, y), rules=rules)
    with pytest.raises(ValueError, match="make_train_step: rules lay the params out over a mesh"):
        jn.make_train_step(net, optax.sgd(0.1), rules=rules)


def test_a_mesh_fit_and_evaluate_on_one_device_equal_the_plain_ones(problem):
    net, params, x, y = problem
    mesh = sharding.make_mesh()
    plain, history = jn.fit(net, params, optax.adam(1e-2), (x, y), epochs=2, batch_size=4,
                            eval_data=(x, y), progress=False)
    meshed, meshed_history = jn.fit(net, params, optax.adam(1e-2), (x, y), epochs=2,
                                    batch_size=4, eval_data=(x, y), progress=False, mesh=mesh,
                                    rules=sharding.ShardingRules())
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(meshed.params)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    assert meshed_history[-1]["test_loss"] == pytest.approx(history[-1]["test_loss"], rel=1e-6)
    assert jn.evaluate(net, meshed.params, (x, y), mesh=mesh) == pytest.approx(
        jn.evaluate(net, plain.params, (x, y)), rel=1e-6)

