"""Sharded checkpoints through Orbax on a one-device mesh: round trip, manifest, and every way
a checkpoint can be refused. Saving on one mesh and restoring on another, and two processes
saving together, are in tests/test_sharding.py (simulated devices)."""

import json
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet import sharding
from jaxnet.checkpoint import CheckpointError
from jaxnet.train import init_train_state
from jaxnet.trees import named_leaves

ocp = pytest.importorskip("orbax.checkpoint")
from jaxnet import sharded_checkpoint as sc  # noqa: E402

NET = jn.serial(jn.Dense(8), jn.relu, jn.Dense(3))
X = jax.ShapeDtypeStruct((1, 5), jnp.float32)


def state_of(net=NET, seed=0, step=3):
    state = init_train_state(net, optax.adam(1e-3), net.init(jax.random.key(seed), X),
                             key=jax.random.key(7))
    return state._replace(step=jnp.int32(step))


def template_of(state):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(checkpoint path, the state saved, the mesh)``: saved once, copied by tests that damage it."""
    mesh = sharding.make_mesh()
    state = sharding.shard_state(state_of(), mesh, sharding.param_specs(state_of().params, mesh))
    path = sc.save_sharded(tmp_path_factory.mktemp("sharded") / "checkpoints", state,
                           metadata={"epoch": 2})
    return path, state, mesh


def copy_of(saved, tmp_path):
    copy = tmp_path / "checkpoints" / saved[0].name
    shutil.copytree(saved[0], copy)
    return copy


def stored(state):
    return {name: np.asarray(jax.random.key_data(a) if name == "key" else a)
            for name, a in named_leaves(state)}


def test_round_trip_restores_every_leaf_and_the_key(saved):
    path, state, mesh = saved
    assert path.name == "ckpt-000003" and (path / sc.COMMIT_MARKER).is_file()
    restored, manifest = sc.restore_sharded(path, template_of(state), mesh)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert restored.key.dtype == state.key.dtype
    want, got = stored(state), stored(restored)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert restored.params["dense_1"]["w"].sharding == jax.sharding.NamedSharding(mesh, jax.P())


def test_the_manifest_describes_every_leaf(saved):
    path, state, _ = saved
    manifest = sc.read_manifest(path)
    assert manifest["format"] == "jaxnet-sharded-checkpoint" and manifest["step"] == 3
    assert manifest["metadata"] == {"epoch": 2}
    assert manifest["mesh"] == {"data": 1, "fsdp": 1, "model": 1}
    leaves = {leaf["name"]: leaf for leaf in manifest["leaves"]}
    assert list(leaves) == [name for name, _ in named_leaves(state)]
    assert leaves["params.dense_1.w"]["shape"] == [5, 8]
    assert leaves["params.dense_1.w"]["dtype"] == "float32"
    assert leaves["key"] == {**leaves["key"], "shape": [2], "dtype": "uint32",
                             "key_impl": "threefry2x32"}
    assert all(re.fullmatch(r"[0-9a-f]{16}", leaf["checksum"]) for leaf in leaves.values())
    assert set(manifest["versions"]) == {"jaxnet", "jax", "orbax-checkpoint"}


def test_checksums_do_not_depend_on_the_layout_and_see_each_value():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(6, 4)).astype(np.float32)
    whole = sc.leaf_summaries({"a": jnp.asarray(values)})[0]["a"]
    # the same array cut into blocks on the host gives the same sum of partial checksums
    parts = sum(sc._shard_sums(values[i:i + 2, j:j + 2], (slice(i, i + 2), slice(j, j + 2)),
                               values.shape).astype(np.uint64)
                for i in range(0, 6, 2) for j in range(0, 4, 2)) % 2**32
    assert whole == "".join(f"{int(v):08x}" for v in parts)
    changed = values.copy()
    changed[3, 1] = np.nextafter(changed[3, 1], np.float32(np.inf))  # one bit of one value
    swapped = values[::-1].copy()  # the same values, other places
    for other in (changed, swapped):
        assert sc.leaf_summaries({"a": jnp.asarray(other)})[0]["a"] != whole
    for dtype in (jnp.bfloat16, jnp.int8, jnp.bool_, jnp.uint32):
        assert len(sc.leaf_summaries({"a": jnp.ones((3,), dtype)})[0]["a"]) == 16


def test_latest_sharded_lists_complete_checkpoints_only(saved, tmp_path):
    copy = copy_of(saved, tmp_path)
    directory = copy.parent
    (directory / "ckpt-000009.orbax-checkpoint-tmp-1733").mkdir()  # an interrupted save
    incomplete = directory / "ckpt-000012"
    shutil.copytree(copy, incomplete)
    (incomplete / sc.COMMIT_MARKER).unlink()
    assert sc.list_sharded(directory) == [copy]
    assert sc.latest_sharded(directory) == copy
    assert sc.latest_sharded(tmp_path / "none") is None


def test_saving_over_an_existing_checkpoint_is_refused(saved, tmp_path):
    path, state, _ = saved
    with pytest.raises(FileExistsError, match="ckpt-000003: a checkpoint of step 3 already exists"):
        sc.save_sharded(path.parent, state)
    copy = copy_of(saved, tmp_path)
    (copy / sc.COMMIT_MARKER).unlink()
    with pytest.raises(FileExistsError, match="ckpt-000003: an incomplete sharded checkpoint"):
        sc.save_sharded(copy.parent, state)


def test_a_state_that_is_not_finite_is_not_written(tmp_path):
    state = state_of()
    broken = state._replace(params=jax.tree.map(lambda a: a.at[0].set(jnp.nan), state.params))
    with pytest.raises(FloatingPointError, match=r"ckpt-000003: not written: the training state "
                                                 r"is not finite \(params.dense_1.b \(NaN\)"):
        sc.save_sharded(tmp_path, broken)
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_of_another_model_names_the_leaves(saved):
    path, _, mesh = saved
    other = jax.eval_shape(lambda: state_of(jn.serial(jn.Dense(16), jn.relu, jn.Dense(3),
                                                      jn.Dense(2))))
    with pytest.raises(CheckpointError) as error:
        sc.restore_sharded(path, other, mesh)
    message = str(error.value)
    assert message.startswith(f"{path}: does not fit the model: missing ")
    assert "params.dense_3.b" in message.split(";")[0]
    assert "params.dense_1.w has shape (5, 8), expected (5, 16)" in message
    assert "params.dense_2.w has shape (8, 3), expected (16, 3)" in message
    sgd = jax.eval_shape(lambda: init_train_state(NET, optax.sgd(0.1),
                                                  NET.init(jax.random.key(0), X)))
    with pytest.raises(CheckpointError, match="unexpected opt_state.0.count, opt_state.0.mu"):
        sc.restore_sharded(path, sgd, mesh)


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / sc.COMMIT_MARKER).unlink(),
     "an incomplete sharded checkpoint \\(no commit_success.txt, which Orbax writes last"),
    (lambda p: shutil.rmtree(p / "state"), "no state/ \\(not a jaxnet sharded checkpoint"),
    (lambda p: p.rename(p.with_name(p.name + ".orbax-checkpoint-tmp-17")),
     "the temporary directory of an unfinished save"),
    (lambda p: shutil.rmtree(p), "no such checkpoint directory"),
])
def test_incomplete_checkpoints_are_refused(saved, tmp_path, damage, message):
    copy = copy_of(saved, tmp_path)
    damage(copy)
    path = next(iter(copy.parent.iterdir()), copy)
    with pytest.raises(CheckpointError, match=message):
        sc.restore_sharded(path, template_of(saved[1]), saved[2])


def test_an_edited_manifest_is_refused(saved, tmp_path):
    copy = copy_of(saved, tmp_path)
    [manifest_file] = [p for p in (copy / sc.MANIFEST_ITEM).iterdir()
                       if p.name != sc.COMMIT_MARKER]
    manifest = json.loads(manifest_file.read_text())
    manifest["step"] = 4
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="manifest: SHA-256 does not match its contents"):
        sc.restore_sharded(copy, template_of(saved[1]), saved[2])


def test_arrays_that_differ_from_the_manifest_are_named(saved, tmp_path):
    """Another state's arrays under this checkpoint's manifest: the checksums tell."""
    path, state, mesh = saved
    copy = copy_of(saved, tmp_path)
    other = sharding.shard_state(state_of(seed=1), mesh, sharding.param_specs(state.params, mesh))
    other_path = sc.save_sharded(tmp_path / "other", other)
    shutil.rmtree(copy / sc.STATE_ITEM)
    shutil.copytree(other_path / sc.STATE_ITEM, copy / sc.STATE_ITEM)
    # (biases start at zero in both states: only the weights differ)
    with pytest.raises(CheckpointError, match=r"the values of params.dense_1.w, params.dense_2.w "
                                              r"do not match the manifest's checksums"):
        sc.restore_sharded(copy, template_of(state), mesh)


def test_without_orbax_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(ImportError, match=r"sharded checkpoints need orbax-checkpoint: pip "
                                          r"install 'jaxnet\[sharding\]'"):
        sc.save_sharded(tmp_path, state_of())
