"""Sharded params: meshes, rules, exactness against one device, memory per device, sharded
checkpoints through Orbax, and two processes sharing one mesh.

The main pytest process has one CPU device: the rules are checked on abstract meshes (shapes
are all they read) and the checkpoints on a one-device mesh. Runs on 8 simulated CPU devices,
and two processes forming one JAX cluster over 127.0.0.1, happen in fresh processes
(tests/sharding_worker.py), because the device count is fixed when JAX's backend starts.
"""

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

import jaxnet as jn
from jaxnet import data_parallel, sharding
from jaxnet.train import init_sharded, init_train_state
from jaxnet.trees import leaves_by_name, named_leaves
from support import CHILD_ENV, free_port, run_processes

TESTS = Path(__file__).parent
MESHES = ("8x1x1", "2x4x1", "2x2x2", "1x1x8")


def abstract_mesh(data, fsdp, model) -> AbstractMesh:
    """A mesh's axes and sizes without devices: all that the rules read."""
    return AbstractMesh((data, fsdp, model), sharding.AXES, axis_types=(AxisType.Auto,) * 3)


def transformer(**sizes):
    return jn.TransformerLM(**{"vocab_size": 64, "num_blocks": 1, "features": 32,
                               "num_heads": 8, "max_length": 8, "tie_embeddings": False,
                               **sizes})


def shapes(net, x):
    return jax.eval_shape(net.init, jax.random.key(0), x)


TOKENS = jax.ShapeDtypeStruct((1, 8), jnp.int32)


def specs_by_name(params, mesh, rules=None) -> dict[str, P]:
    return leaves_by_name(sharding.param_specs(params, mesh, rules))


# --- the mesh -----------------------------------------------------------------------------------


def test_make_mesh_has_three_named_axes():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "model") and mesh.devices.shape == (1, 1, 1)
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sharding.make_mesh(1, 1, 1, devices=jax.devices()).size == 1


@pytest.mark.parametrize("sizes, message", [
    ({"data": 2}, r"make_mesh: data=2 x fsdp=1 x model=1 = 2 devices, but there are 1 cpu "
                  r"device \(for simulated CPU devices set XLA_FLAGS="
                  r"--xla_force_host_platform_device_count=2"),
    ({"fsdp": 4}, "make_mesh: fsdp=4 x model=1 = 4 does not divide the 1 cpu device"),
    ({"model": 0}, "make_mesh: model must be a positive integer, got 0"),
    ({"data": True}, "make_mesh: data must be a positive integer, got True"),
])
def test_make_mesh_rejects_sizes_that_do_not_match_the_devices(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(**sizes)


@pytest.mark.parametrize("devices", [[], jax.devices() * 2])
def test_make_mesh_rejects_devices_named_twice_or_none(devices):
    with pytest.raises(ValueError, match="make_mesh: devices must name each device once; got"):
        sharding.make_mesh(devices=devices)


def test_parse_mesh():
    assert sharding.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert sharding.parse_mesh(" model=8 ") == {"model": 8}
    for text in ("data=2,data=2", "pipeline=2", "fsdp=0", "fsdp", "data=two"):
        with pytest.raises(ValueError, match=f"mesh must be AXIS=SIZE pairs .*got '{text}'"):
            sharding.parse_mesh(text)


def test_batch_size_must_split_over_data_and_fsdp():
    mesh = abstract_mesh(2, 2, 2)
    assert sharding.batch_devices(mesh) == 4
    data_parallel.check_batch_size(mesh, 12)  # the model axis does not split the batch
    with pytest.raises(ValueError, match=re.escape(
            "batch 6 does not split evenly over 4 devices (data x fsdp); use a multiple of 4, "
            "e.g. 4 or 8")):
        data_parallel.check_batch_size(mesh, 6, "batch")


# --- rules --------------------------------------------------------------------------------------


def test_tensor_parallel_splits_attention_mlp_and_embeddings():
    specs = specs_by_name(shapes(transformer(), TOKENS), abstract_mesh(1, 1, 8))
    for name in ("query", "key", "value"):  # column-parallel: the heads' axis
        assert specs[f"block_1.attention.{name}.w"] == P(None, "model")
        assert specs[f"block_1.attention.{name}.b"] == P("model")
    assert specs["block_1.attention.out.w"] == P("model")  # row-parallel: its input axis
    assert specs["block_1.attention.out.b"] == P()
    assert specs["block_1.mlp.in.w"] == P(None, "model") and specs["block_1.mlp.in.b"] == P("model")
    assert specs["block_1.mlp.out.w"] == P("model") and specs["block_1.mlp.out.b"] == P()
    assert specs["embedding.table"] == P("model")  # the vocabulary
    assert specs["output.w"] == P(None, "model")
    assert specs["positional.table"] == P() and specs["norm.scale"] == P()


def test_fsdp_splits_the_largest_divisible_axis_of_large_weights():
    params = shapes(transformer(), TOKENS)
    specs = specs_by_name(params, abstract_mesh(2, 4, 1), sharding.ShardingRules(fsdp_min_size=256))
    assert specs["block_1.mlp.in.w"] == P(None, "fsdp")  # (32, 128): the 128
    assert specs["block_1.mlp.out.w"] == P("fsdp")  # (128, 32)
    assert specs["block_1.attention.query.w"] == P("fsdp")  # (32, 32): the first of equal axes
    assert specs["embedding.table"] == P("fsdp")  # (64, 32)
    assert specs["block_1.mlp.in.b"] == P()  # 128 elements: below fsdp_min_size
    default = specs_by_name(params, abstract_mesh(2, 4, 1))  # fsdp_min_size=1024
    assert default["block_1.attention.query.w"] == P("fsdp")  # 32 x 32 = 1024 elements
    assert default["positional.table"] == P()  # 8 x 32 = 256 elements: stays whole


def test_fsdp_and_tensor_parallel_combine_on_different_axes():
    specs = specs_by_name(shapes(transformer(), TOKENS), abstract_mesh(2, 2, 2),
                          sharding.ShardingRules(fsdp_min_size=256))
    assert specs["block_1.mlp.in.w"] == P("fsdp", "model")
    assert specs["block_1.mlp.out.w"] == P("model", "fsdp")
    assert specs["embedding.table"] == P("model", "fsdp")


def test_dense_pairs_of_an_mlp_are_column_then_row_parallel():
    params = shapes(jn.models.mlp((64, 64), 10), jax.ShapeDtypeStruct((1, 32), jnp.float32))
    specs = specs_by_name(params, abstract_mesh(1, 1, 2))
    assert specs["dense_1.w"] == P(None, "model") and specs["dense_1.b"] == P("model")
    assert specs["dense_2.w"] == P("model") and specs["dense_2.b"] == P()
    assert specs["dense_3.w"] == P(None, "model")  # 10 classes over 2
    # jaxnet's own rules fall back when a size does not divide: 10 classes over 4 cannot split
    assert specs_by_name(params, abstract_mesh(1, 1, 4))["dense_3.w"] == P()
    falls_to_fsdp = specs_by_name(params, abstract_mesh(1, 4, 4),
                                  sharding.ShardingRules(fsdp_min_size=0))
    assert falls_to_fsdp["dense_3.w"] == P("fsdp") and falls_to_fsdp["dense_3.b"] == P()


def test_a_one_dimensional_data_mesh_replicates_everything():
    params = shapes(transformer(), TOKENS)
    mesh = AbstractMesh((8,), ("data",), axis_types=(AxisType.Auto,))
    assert set(specs_by_name(params, mesh).values()) == {P()}
    assert set(specs_by_name(params, abstract_mesh(8, 1, 1)).values()) == {P()}
    no_tp = sharding.ShardingRules(tensor_parallel=False)
    assert set(specs_by_name(params, abstract_mesh(1, 1, 8), no_tp).values()) == {P()}


def test_user_rules_override_by_glob_or_regex():
    params = shapes(transformer(num_blocks=2), TOKENS)
    mesh = abstract_mesh(1, 2, 4)
    rules = {"block_*/mlp/in/w": P("fsdp"),  # "/" may stand for "."
             re.compile(r"block_2\.attention\.(query|key)\.w"): None,
             "embedding.*": ("fsdp", "model")}
    specs = specs_by_name(params, mesh, rules)
    assert specs["block_1.mlp.in.w"] == specs["block_2.mlp.in.w"] == P("fsdp")
    assert specs["block_2.attention.query.w"] == specs["block_2.attention.key.w"] == P()
    assert specs["block_1.attention.query.w"] == P("fsdp", "model")  # no rule: jaxnet's own
    assert specs["embedding.table"] == P("fsdp", "model")
    first = sharding.ShardingRules(overrides=(("*.w", P()), ("block_1.mlp.in.w", P("fsdp"))))
    assert specs_by_name(params, mesh, first)["block_1.mlp.in.w"] == P()  # the first match wins


@pytest.mark.parametrize("rules, message", [
    ({"block_1.mlp.in.w": P("fsdp")},
     r"sharding rule 'block_1.mlp.in.w' for block_1.mlp.in.w \(32, 128\): dimension 32 does "
     r"not split over fsdp=3 \(3 parts\)"),
    ({re.compile(r".*\.in\.w"): P(None, ("fsdp", "model"))},
     r"sharding rule '\.\*\\\.in\\\.w' for block_1.mlp.in.w \(32, 128\): dimension 128 does "
     r"not split over fsdp=3 x model=2 \(6 parts\)"),
    ({"norm.scale": P("tensor")},
     r"sharding rule 'norm.scale' for norm.scale \(32,\): the mesh has no axis 'tensor' "
     r"\(its axes: data, fsdp, model\)"),
    ({"norm.scale": P(None, "model")},
     r"norm.scale \(32,\): P\(None, 'model'\) has 2 entries, the param has 1 "
     r"dimension$"),
    ({"output.w": P("model", "model")},
     r"output.w \(32, 64\): P\('model', 'model'\) uses a mesh axis twice"),
])
def test_user_rules_that_do_not_fit_raise_naming_the_param(rules, message):
    with pytest.raises(ValueError, match=message):
        sharding.param_specs(shapes(transformer(), TOKENS), abstract_mesh(1, 3, 2), rules)


@pytest.mark.parametrize("rules, message", [
    ("fsdp", "rules must be None, a ShardingRules or a mapping of name patterns to "
             "PartitionSpecs; got str"),
    ({"w": 3}, r"ShardingRules: the spec of 'w' must be a PartitionSpec, a tuple of axis names "
               r"or None; got 3"),
    (sharding.ShardingRules, None),
])
def test_malformed_rules_are_refused(rules, message):
    if message is None:  # the class's own checks
        with pytest.raises(ValueError, match="overrides must be \\(pattern, spec\\) pairs"):
            rules(overrides=((3, P()),))
        with pytest.raises(ValueError, match="fsdp_min_size must be a non-negative integer, "
                                             "got -1"):
            rules(fsdp_min_size=-1)
        return
    with pytest.raises(ValueError, match=message):
        sharding.param_specs({"w": jnp.zeros((4, 4))}, abstract_mesh(1, 1, 1), rules)


def test_the_optimizer_state_follows_its_params():
    net = jn.models.mlp((64,), 8)
    params = shapes(net, jax.ShapeDtypeStruct((1, 32), jnp.float32))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3))
    state = jax.eval_shape(lambda p: init_train_state(net, optimizer, p), params)
    specs = sharding.param_specs(params, abstract_mesh(1, 1, 2))
    layout = leaves_by_name(sharding.state_specs(state, specs))
    assert layout["params.dense_1.w"] == P(None, "model")
    assert layout["opt_state.1.inner_state.0.mu.dense_1.w"] == P(None, "model")
    assert layout["opt_state.1.inner_state.0.nu.dense_2.w"] == P("model")
    assert layout["opt_state.1.inner_state.0.count"] == P()
    assert layout["opt_state.1.hyperparams.learning_rate"] == P()
    assert layout["step"] == layout["key"] == P()
    assert len(layout) == len(named_leaves(state))


def test_memory_per_device_counts_shards_of_abstract_and_placed_arrays():
    mesh = sharding.make_mesh()
    spec = jax.ShapeDtypeStruct((16, 8), jnp.float32,
                                sharding=jax.sharding.NamedSharding(mesh, P("fsdp")))
    placed = sharding.place({"w": np.ones((16, 8), np.float32), "key": jax.random.key(1)},
                            {"w": spec.sharding, "key": sharding.data_parallel.replicated(mesh)})
    device = jax.devices()[0]
    assert sharding.memory_per_device([spec]) == {device: 512}
    assert sharding.memory_per_device(placed) == {device: 512 + 8}  # a threefry key: 2 x uint32
    assert sharding.memory_per_device({"none": None, "host": np.ones(3)}) == {}


def test_sharded_training_on_one_device_equals_the_plain_step():
    net = jn.serial(jn.Dense(16), jn.relu, jn.Dense(3))
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    y = np.array([0, 1, 2, 1], np.int32)
    plain = init_train_state(net, optax.adam(1e-2), net.init(jax.random.key(0), x[:1]))
    plain, metrics = jn.make_train_step(net, optax.adam(1e-2))(plain, x, y)
    mesh = sharding.make_mesh()
    state, _ = init_sharded(net, optax.adam(1e-2), jax.random.key(0), x[:1], mesh)
    step = jn.make_train_step(net, optax.adam(1e-2), mesh=mesh)
    state, sharded_metrics = step(state, x, y)
    assert set(sharded_metrics) == {"loss", "accuracy"}
    np.testing.assert_allclose(sharded_metrics["loss"], metrics["loss"], rtol=1e-6)
    for (name, a), (_, b) in zip(named_leaves(plain.params), named_leaves(state.params)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=name)
    assert int(state.step) == 1


# --- 8 simulated CPU devices, in a fresh process ------------------------------------------------


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    pytest.importorskip("orbax.checkpoint")
    out = tmp_path_factory.mktemp("sharding")
    done = subprocess.run([sys.executable, str(TESTS / "sharding_worker.py"), "meshes",
                           str(out / "results.npz"), str(out / "checkpoints")],
                          env=CHILD_ENV | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out / "results.npz", allow_pickle=False) as results:
        return dict(results)


def run_of(results, prefix):
    return {k[len(prefix) + 1:]: v for k, v in results.items() if k.startswith(prefix + "/")}


def assert_same_training(actual, expected, what):
    """Equal within float rounding, except attention's key bias: its gradient is zero in exact
    arithmetic (softmax ignores a constant added to every key's score), so it is rounding
    noise, which differs with the layout and which Adam scales up to full steps."""
    assert set(actual) == set(expected) and len(expected) > 10, what
    for name, want in expected.items():
        if "attention.key.b" not in name:
            np.testing.assert_allclose(actual[name], want, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{what}: {name}")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["transformer", "mlp"])
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_training_equals_one_device(eight_devices, model, mesh):
    assert int(eight_devices["devices"]) == 8
    reference = run_of(eight_devices, f"{model}/reference/state")
    assert_same_training(run_of(eight_devices, f"{model}/{mesh}/state"), reference,
                         f"{model} on {mesh}")
    np.testing.assert_allclose(eight_devices[f"{model}/{mesh}/losses"],
                               eight_devices[f"{model}/reference/losses"], rtol=1e-5)
    initial = run_of(eight_devices, f"{model}/reference/initial")
    moved = [n for n in initial if not np.allclose(initial[n], reference[f"params.{n}"])]
    assert len(moved) > len(initial) // 2  # it trained: the comparison is not vacuous


@pytest.mark.slow
@pytest.mark.parametrize("model", ["transformer", "mlp"])
def test_params_created_sharded_equal_net_init(eight_devices, model):
    initial = run_of(eight_devices, f"{model}/reference/initial")
    created = run_of(eight_devices, f"{model}/2x4x1/initial")
    assert set(created) == set(initial)
    for name in initial:
        np.testing.assert_array_equal(created[name], initial[name], err_msg=name)


@pytest.mark.slow
def test_the_layout_of_params_and_optimizer_state(eight_devices):
    specs = dict(line.split(" ", 1) for line in eight_devices["transformer/2x2x2/specs"])
    assert specs["params.block_1.mlp.in.w"] == "P('fsdp', 'model')"
    assert specs["opt_state.0.mu.block_1.mlp.in.w"] == "P('fsdp', 'model')"
    assert specs["opt_state.0.nu.block_1.attention.out.w"] == "P('model', 'fsdp')"
    assert specs["opt_state.0.count"] == specs["step"] == "P()"
    shards = {line.split(" ", 1)[0]: line.split(" ", 1)[1]
              for line in eight_devices["transformer/2x2x2/shards"]}
    assert shards["0.block_1.mlp.in.w"] == "(32, 128) (16, 64)"  # a quarter on each device


# Bytes of an MLP 32 -> 64 -> 64 -> 8's params + Adam's mu and nu (float32) on each device: the
# weights hold 32*64 + 64*64 + 64*8 = 6656 values, the biases 136, Adam's count 4 bytes.
MLP_BYTES = {
    "8x1x1": (6656 + 136) * 12 + 4,  # replicated: the whole of it on every device
    "2x4x1": 6656 // 4 * 12 + 136 * 12 + 4,  # weights split over fsdp=4, biases whole
    "2x2x2": 6656 // 4 * 12 + (64 // 2 + 64 + 8 // 2) * 12 + 4,  # column-parallel biases split
    "1x1x8": 6656 // 8 * 12 + (64 // 8 + 64 + 8 // 8) * 12 + 4,
}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_memory_per_device_shrinks_as_the_layout_says(eight_devices, mesh):
    mlp = eight_devices[f"mlp/{mesh}/bytes"]
    assert len(mlp) == 8 and set(mlp.tolist()) == {MLP_BYTES[mesh]}
    for model in ("mlp", "transformer"):  # shard shapes alone (benchmarks/sharding_memory.py)
        np.testing.assert_array_equal(eight_devices[f"{model}/{mesh}/abstract_bytes"],
                                      eight_devices[f"{model}/{mesh}/bytes"])
    whole = eight_devices["transformer/8x1x1/bytes"][0]
    share = eight_devices[f"transformer/{mesh}/bytes"].max() / whole
    assert share <= {"8x1x1": 1, "2x4x1": 0.28, "2x2x2": 0.28, "1x1x8": 0.16}[mesh]


@pytest.mark.slow
def test_a_model_over_the_per_device_budget_trains_under_fsdp(eight_devices):
    """The transformer's params + Adam state exceed the budget; sharded 2x4 each device holds
    about a quarter of them, within it, and training gives the one-device result."""
    budget = 64 * 1024
    assert eight_devices["transformer/8x1x1/bytes"][0] > 3 * budget  # whole: 3 budgets
    assert eight_devices["transformer/2x4x1/bytes"].max() <= budget
    assert_same_training(run_of(eight_devices, "transformer/2x4x1/state"),
                         run_of(eight_devices, "transformer/reference/state"), "fsdp=4")


@pytest.mark.slow
@pytest.mark.parametrize("mesh, spec", [("1x8x1", "P(None, 'fsdp')"),
                                        ("8x1x1", "P()")])
def test_a_checkpoint_saved_on_2x4_restores_on_another_mesh(eight_devices, mesh, spec):
    saved = run_of(eight_devices, "transformer/2x4x1/state")
    restored = run_of(eight_devices, f"transformer/restored_{mesh}/state")
    assert set(restored) == set(saved)
    for name in saved:
        np.testing.assert_array_equal(restored[name], saved[name], err_msg=name)
    assert str(eight_devices[f"transformer/restored_{mesh}/spec"]) == spec
    assert int(eight_devices["manifest_step"]) == 3
    assert str(eight_devices["manifest_mesh"]) == "{'data': 2, 'fsdp': 4, 'model': 1}"
    # and training goes on from it as the one-device run does
    assert_same_training(run_of(eight_devices, f"transformer/restored_{mesh}/continued"),
                         run_of(eight_devices, "transformer/reference/state_4"), mesh)


@pytest.mark.slow
def test_a_damaged_array_file_never_restores_wrong_values(eight_devices):
    """Single bytes flipped across the arrays' data files: each restore is refused or gives
    the saved values (a byte no read touches). Orbax's OCDBT store checks a CRC-32C of its
    index nodes and reads flipped array data back without complaint; jaxnet's checksums name
    the leaf."""
    outcomes = eight_devices["damaged"].tolist()
    assert len(outcomes) == 10 and "WRONG VALUES" not in outcomes, outcomes
    refused = [o for o in outcomes if o.startswith("error")]
    assert refused, outcomes
    for outcome in refused:
        assert re.fullmatch(r"error: : (the values of [a-z0-9_.]+(, [a-z0-9_.]+)* do not match "
                            r"the manifest's checksums \(the stored arrays are damaged\)|"
                            r"cannot read the arrays \(.+\))", outcome, re.DOTALL), outcome


@pytest.mark.slow
def test_a_sharded_state_moves_to_another_mesh(eight_devices):
    saved = run_of(eight_devices, "transformer/2x4x1/state")
    moved = run_of(eight_devices, "transformer/resharded_1x1x8/state")
    assert set(moved) == set(saved)
    for name in saved:
        np.testing.assert_array_equal(moved[name], saved[name], err_msg=name)
    assert str(eight_devices["transformer/resharded_1x1x8/spec"]) == "P(None, 'model')"


# --- two processes, one mesh --------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_save_and_restore_on_another_mesh(tmp_path):
    """Two processes of 4 CPU devices each (gloo collectives) train on a 2x2x2 mesh spanning
    both, save one sharded checkpoint together, and restore it on 1x4x2."""
    pytest.importorskip("orbax.checkpoint")
    env = CHILD_ENV | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    coordinator = f"127.0.0.1:{free_port()}"
    results = run_processes([[sys.executable, str(TESTS / "sharding_worker.py"), "cluster",
                              str(tmp_path / f"out-{i}.npz"), str(tmp_path / "checkpoints"),
                              coordinator, str(i)] for i in (0, 1)], env, timeout=600)
    for returncode, _, err in results:
        assert returncode == 0, err[-3000:]
    assert not (tmp_path / "out-1.npz").exists()  # process 0 reports
    with np.load(tmp_path / "out-0.npz", allow_pickle=False) as loaded:
        out = dict(loaded)
    assert int(out["processes"]) == 2 and int(out["local_devices"]) == 4
    written = sorted(p.name for p in (tmp_path / "checkpoints" / "ckpt-000003" / "state").iterdir()
                     if p.name.startswith("ocdbt.process_"))
    assert written == ["ocdbt.process_0", "ocdbt.process_1"]  # each process wrote its shards
    trained, reference = run_of(out, "trained"), run_of(out, "reference")
    assert_same_training(trained, reference, "2 processes")
    np.testing.assert_allclose(out["losses"], out["reference_losses"], rtol=1e-5)
    restored = run_of(out, "restored")
    for name in trained:
        np.testing.assert_array_equal(restored[name], trained[name], err_msg=name)
    assert str(out["restored_spec"]) == "P('fsdp', 'model')"
