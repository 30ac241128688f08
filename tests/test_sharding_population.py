"""Populations and ``predict`` on a mesh: the members split over ``data``, each member's params
over ``fsdp`` and ``model``, ``predict``'s rows over ``data`` and ``fsdp``.

The main pytest process has one CPU device: there the mesh is 1x1x1 and the errors that need
no devices are checked. Meshes of 8 simulated CPU devices run in a fresh process
(tests/sharding_population_worker.py), since the device count is fixed when JAX's backend
starts, and are compared with a one-device reference there.
"""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnet import sharding
from jaxnet.inference import predict, predict_proba, predict_to_file
from jaxnet.population import fit_population, init_population, population_shardings
from jaxnet.trees import leaves_by_name
from sharding_population_worker import CLASSES, FEATURES, MEMBERS, MESHES, host, setup
from support import CHILD_ENV

TESTS = Path(__file__).parent
MESH_NAMES = ["x".join(map(str, shape)) for shape in MESHES]


def assert_trees_close(actual: dict, expected: dict, what: str):
    assert set(actual) == set(expected) and len(expected) > 10, what
    for name, want in expected.items():
        np.testing.assert_allclose(actual[name], want, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{what}: {name}")


# --- one device: a 1x1x1 mesh, and the errors ----------------------------------------------------


@pytest.fixture(scope="module")
def problem():
    return setup()


@pytest.fixture(scope="module")
def start(problem):
    """The members created on the one device (fit_population copies what it trains)."""
    net, optimizer, (x, _), members, _, _ = problem
    return init_population(net, optimizer, x[:1], **members)


def test_a_population_on_a_one_device_mesh_trains_as_without_one(problem, start):
    net, optimizer, (x, y), members, fit, rules = problem
    fit = dict(fit, epochs=1, eval_data=None)
    mesh = sharding.make_mesh()
    plain, plain_history = fit_population(net, start, optimizer, (x, y), **fit)
    trained, history = fit_population(net, start, optimizer, (x, y), **fit, mesh=mesh,
                                      rules=rules)
    assert sharding.placed_on(trained, mesh) and not sharding.placed_on(start, mesh)
    assert_trees_close(host(trained), host(plain), "1x1x1")
    for metric in ("train_loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(history[0][metric], plain_history[0][metric], rtol=1e-6)
    assert np.isfinite(np.asarray(start.members.params["dense_1"]["w"])).all()  # not donated


def test_population_shardings_split_members_over_data_and_params_by_the_rules(problem, start):
    rules = problem[-1]
    layout = leaves_by_name(population_shardings(start, sharding.make_mesh(), rules))
    assert all(isinstance(s, NamedSharding) for s in layout.values())
    assert layout["members.params.dense_1.w"].spec == P("data")
    assert layout["drop_rate"].spec == layout["members.step"].spec == P("data")
    assert len(layout) == len(leaves_by_name(start))


def test_predict_on_a_one_device_mesh_equals_predict(problem, rng, tmp_path):
    net, optimizer, (x, _), _, _, rules = problem
    params = net.init(jax.random.key(0), x[:1])
    inputs = rng.normal(size=(21, FEATURES)).astype(np.float32)
    expected = predict(net, params, inputs, batch_size=8)
    mesh = sharding.make_mesh()
    got = predict(net, params, inputs, batch_size=8, mesh=mesh, rules=rules)
    assert got.shape == (21, CLASSES)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    placed = jax.device_put(params, NamedSharding(mesh, P()))
    np.testing.assert_allclose(predict_proba(net, placed, jax.numpy.asarray(inputs), mesh=mesh),
                               jax.nn.softmax(expected), rtol=1e-6, atol=1e-7)
    written = predict_to_file(net, params, inputs, tmp_path / "y.npy", mesh=mesh, rules=rules)
    np.testing.assert_allclose(np.load(written), expected, rtol=1e-6, atol=1e-7)


def test_rules_without_a_mesh_and_other_bad_combinations_are_refused(problem, start):
    net, optimizer, (x, y), members, fit, rules = problem
    need_mesh = "rules lay params out over a mesh; pass mesh too"
    with pytest.raises(ValueError, match=f"init_population: {need_mesh}"):
        init_population(net, optimizer, x[:1], **members, rules=rules)
    with pytest.raises(ValueError, match=f"fit_population: {need_mesh}"):
        fit_population(net, start, optimizer, (x, y), **fit, rules=rules)
    params = start.member(0).params
    with pytest.raises(ValueError, match=f"predict: {need_mesh}"):
        predict(net, params, x, rules=rules)
    with pytest.raises(ValueError, match="predict: mesh must be a jax.sharding.Mesh .*got dict"):
        predict(net, params, x, mesh={"data": 1})
    mesh = sharding.make_mesh()
    placed = jax.device_put(params, NamedSharding(mesh, P()))
    with pytest.raises(ValueError, match="predict: params are already placed on mesh, and keep "
                                         "their layout; rules would be ignored"):
        predict(net, placed, x, mesh=mesh, rules=rules)


# --- 8 simulated CPU devices, in a fresh process ------------------------------------------------


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding_population") / "results.npz"
    done = subprocess.run([sys.executable, str(TESTS / "sharding_population_worker.py"), str(out)],
                          env=CHILD_ENV | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out, allow_pickle=False) as results:
        results = dict(results)
    assert int(results["devices"]) == 8
    return results


def run_of(results, prefix):
    return {k[len(prefix) + 1:]: v for k, v in results.items() if k.startswith(prefix + "/")}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESH_NAMES)
def test_a_population_on_a_mesh_trains_as_on_one_device(eight_devices, mesh):
    initial = run_of(eight_devices, "reference/initial")
    placed = run_of(eight_devices, f"{mesh}/initial")  # created on 2x4x1, placed on the others
    assert set(placed) == set(initial)
    for name in initial:
        np.testing.assert_array_equal(placed[name], initial[name], err_msg=name)
    reference = run_of(eight_devices, "reference/trained")
    assert_trees_close(run_of(eight_devices, f"{mesh}/trained"), reference, mesh)
    moved = [n for n in initial if ".params." in n and not np.allclose(initial[n], reference[n])]
    assert len(moved) == 6  # every weight and bias trained: the comparison is not vacuous
    history, expected = (run_of(eight_devices, f"{run}/history") for run in (mesh, "reference"))
    assert set(history) == {f"{split}_{metric}" for split in ("train", "val", "test")
                            for metric in ("loss", "accuracy")}
    for metric, values in expected.items():
        assert values.shape == (2, MEMBERS)
        np.testing.assert_allclose(history[metric], values, rtol=1e-5, err_msg=metric)


@pytest.mark.slow
def test_a_population_sharing_one_data_order_trains_on_a_mesh_as_on_one_device(eight_devices):
    reference = run_of(eight_devices, "shared/reference")
    assert_trees_close(run_of(eight_devices, "shared/2x2x2"), reference, "shared order, 2x2x2")
    assert not np.allclose(reference["members.params.dense_1.w"],
                           run_of(eight_devices, "reference/trained")["members.params.dense_1.w"])


# dense_1.w of the 8 members, (8, 32, 64): the part one device holds
DENSE_1_SHARD = {"8x1x1": (1, 32, 64), "2x4x1": (4, 32, 16), "2x2x2": (4, 16, 32),
                 "1x1x8": (8, 32, 8)}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESH_NAMES)
def test_members_are_split_over_data_and_their_params_over_fsdp_and_model(eight_devices, mesh):
    shards = dict(line.split(" ", 1) for line in eight_devices[f"{mesh}/shards"])
    assert shards["dense_1.w"] == f"(8, 32, 64) {DENSE_1_SHARD[mesh]}"
    specs = dict(line.split(" ", 1) for line in eight_devices[f"{mesh}/specs"])
    for name in ("dense_1.w", "dense_1.b", "dense_2.w", "dense_3.w"):  # the state follows
        assert specs[f"members.opt_state.inner_state.0.trace.{name}"] == \
               specs[f"members.params.{name}"]
    assert specs["members.params.dense_1.w"].startswith("P('data'")
    assert specs["members.step"] == specs["members.key"] == specs["drop_rate"] == "P('data',)"
    assert specs["members.opt_state.hyperparams.learning_rate"] == "P('data',)"


# Bytes of the members' params and SGD momentum (float32) on each device. Each member's MLP
# 32 -> 64 -> 64 -> 8 has 6656 weights and 136 biases, and 12 bytes of optimizer scalars (the
# step count, learning rate and momentum); on one device the 8 members take 8 * 54348 bytes.
MEMBER_BYTES = (6656 + 136) * 8 + 12
MESH_BYTES = {
    "8x1x1": 1 * MEMBER_BYTES,  # one whole member on each device
    "2x4x1": 4 * (6656 // 4 * 8 + 136 * 8 + 12),  # 4 members, weights split over fsdp=4
    "2x2x2": 4 * (6656 // 4 * 8 + (64 // 2 + 64 + 8 // 2) * 8 + 12),  # column biases split too
    "1x1x8": 8 * (6656 // 8 * 8 + (64 // 8 + 64 + 8 // 8) * 8 + 12),
}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESH_NAMES)
def test_memory_per_device_shrinks_to_an_eighth(eight_devices, mesh):
    held = eight_devices[f"{mesh}/bytes"]
    assert len(held) == 8 and set(held.tolist()) == {MESH_BYTES[mesh]}
    assert held.max() <= MEMBERS * MEMBER_BYTES / 7


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESH_NAMES)
def test_predict_on_a_mesh_equals_predict_on_one_device(eight_devices, mesh):
    for kind, reference in (("predict", "predict"), ("proba", "proba"), ("on_device", "predict"),
                            ("ensemble", "ensemble")):
        expected = eight_devices[f"reference/{reference}"]
        assert expected.shape == (37, CLASSES)
        np.testing.assert_allclose(eight_devices[f"{mesh}/{kind}"], expected, rtol=1e-5,
                                   atol=1e-6, err_msg=kind)
    assert int(eight_devices[f"{mesh}/on_device_devices"]) == 8  # a JAX array on the mesh
    assert bool(eight_devices[f"{mesh}/kept_placed"])  # params on the mesh are not moved


@pytest.mark.slow
@pytest.mark.parametrize("function", ["init", "fit"])
def test_members_that_do_not_split_over_data_are_refused(eight_devices, function):
    assert str(eight_devices[f"error/{function}"]) == (
        f"{function}_population: 6 members do not split over data=4 devices; use a multiple of "
        f"4 members, or a mesh whose data size divides 6 (e.g. make_mesh(data=1, fsdp=..., "
        f"model=...))")
