"""docs/custom_layers.md runs as written, and its layers pass the checks built-in layers pass.

The page's ```python blocks run in order in one namespace (under the strict promotion settings
of conftest.py); the layers it defines (GLU, CausalSelfAttention, RunningCenter,
GaussianNoise, Highway) are taken from that namespace, so the tests check the code a user
reads. Each is checked against a NumPy float64 reference, under jit, vmap, one example and two
batch axes, with finite-difference gradients, in summaries, checkpoints, ``fit`` and
populations; and the errors the page promises are checked word for word.
"""

import contextlib
import dataclasses
import io
import pathlib
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from jax.test_util import check_grads

import jaxnet as jn
from contract import assert_contract, assert_contract_with_state, f64, random_params
from jaxnet import checkpoint, tensorfile
from jaxnet.data import load_digits

DOC = pathlib.Path(__file__).parent.parent / "docs" / "custom_layers.md"
RTOL, ATOL = 1e-4, 1e-5  # float32 layer vs float64 reference on O(1) outputs


def normal(rng, shape, dtype=jnp.float32, loc=0.0):
    return jnp.asarray(rng.normal(loc, 1.0, size=shape), dtype)


def assert_trees_equal(a, b):
    """Same structure, shapes, dtypes and bits (PRNG keys compared by their data)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert (u.shape, u.dtype) == (v.shape, v.dtype)
        if jnp.issubdtype(u.dtype, jax.dtypes.prng_key):
            u, v = jax.random.key_data(u), jax.random.key_data(v)
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def doc():
    """The namespace of the page's python blocks, run in order; ``"stdout"``: what they printed."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    namespace = {"__name__": "custom_layers_doc"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
    namespace["stdout"], namespace["blocks"] = printed.getvalue(), blocks
    return namespace


@pytest.fixture(scope="module")
def digits():
    return load_digits(train_rows=slice(0, 300))


def digits_net(doc, width=8):
    """Every custom layer of the page in one classifier of 8x8 digits."""
    return jn.serial(jn.Flatten(), doc["GLU"](width), doc["RunningCenter"](), doc["GaussianNoise"](0.1),
                     doc["Highway"](width), jn.Dense(10))


# ---- the page --------------------------------------------------------------------------------

def test_the_page_runs_as_written_and_trains(doc):
    assert len(doc["blocks"]) >= 10
    assert doc["history"][-1]["test_accuracy"] > 0.5
    assert len(doc["pop_history"][-1]["test_accuracy"]) == 3
    assert_trees_equal(doc["restored"], doc["state"])


def test_the_error_messages_the_page_shows_are_the_ones_raised(doc):
    # "print(error)  # message ..." and the comment lines right below it: the message shown
    shown = re.findall(r"print\(error\)(?:  # (.*))?\n((?:[ \t]*# .*\n)*)", "".join(doc["blocks"]))
    assert len(shown) >= 6
    for same_line, below in shown:
        lines = ([same_line] if same_line else []) + [
            line.strip()[2:] for line in below.splitlines() if line.strip()]
        message = " ".join(lines).removesuffix("...").strip()
        assert message and message in doc["stdout"], message


# ---- GLU: a pointwise layer with parameters --------------------------------------------------

def glu_reference(x, p):
    x, p = np.asarray(x, np.float64), f64(p)
    value = x @ p["value"]["w"] + p["value"]["b"]
    gate = x @ p["gate"]["w"] + p["gate"]["b"]
    return value / (1.0 + np.exp(-gate))


@pytest.mark.parametrize("shape", [(6, 4), (6, 3, 4)])
def test_glu_matches_numpy_under_jit_vmap_and_any_batch_axes(doc, rng, shape):
    net = doc["GLU"](5)
    x = normal(rng, shape)
    params = random_params(net, x[:1], rng)
    y = assert_contract(net, params, x)
    assert y.shape == shape[:-1] + (5,) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, glu_reference(x, params), rtol=RTOL, atol=ATOL)


def test_glu_in_a_network_matches_numpy(doc, rng):
    net = jn.serial(doc["GLU"](5), jn.relu, doc["GLU"](2))
    x = normal(rng, (6, 3))
    params = random_params(net, x[:1], rng)
    y = assert_contract(net, params, x)
    hidden = np.maximum(glu_reference(x, params["glu_1"]), 0.0)
    np.testing.assert_allclose(y, glu_reference(hidden, params["glu_2"]), rtol=RTOL, atol=ATOL)


def test_glu_initialises_in_the_inputs_dtype_with_zero_biases(doc, key):
    with jax.enable_x64(True):
        params = doc["GLU"](3).init(key, jax.ShapeDtypeStruct((1, 7), jnp.float64))
    for part in ("value", "gate"):
        assert params[part]["w"].shape == (7, 3) and params[part]["w"].dtype == jnp.float64
        np.testing.assert_array_equal(params[part]["b"], np.zeros(3))
    assert not np.allclose(params["value"]["w"], params["gate"]["w"])  # separate keys


def test_glu_gradients_match_finite_differences(doc, rng):
    net = jn.serial(doc["GLU"](3), doc["GLU"](2))
    with jax.enable_x64(True):
        x = normal(rng, (4, 3), jnp.float64)
        params = random_params(net, x[:1], rng)
        check_grads(lambda p, v: net.apply(p, v), (params, x), order=2, modes=("rev",))


def test_glu_rejects_bad_arguments_and_inputs_naming_itself(doc, key):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=rf"GLU: features must be a positive integer, got {bad!r}"):
            doc["GLU"](bad)
    with pytest.raises(TypeError, match=r"^glu: expected a floating-point input, got int32"):
        doc["GLU"](3).init(key, jax.ShapeDtypeStruct((1, 4), jnp.int32))


# ---- CausalSelfAttention: a sequence layer that declares example_ndim ------------------------

def attention_reference(x, p):
    x, p = np.asarray(x, np.float64), f64(p)
    q, k, v = (x @ p[name] for name in ("query", "key", "value"))
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(x.shape[-1])
    time = x.shape[-2]
    scores = np.where(np.tril(np.ones((time, time), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True) @ v


def test_causal_attention_matches_numpy_under_jit_vmap_and_any_batch_axes(doc, rng):
    net = doc["CausalSelfAttention"]()
    x = normal(rng, (6, 5, 3))
    params = random_params(net, x[:1], rng)
    y = assert_contract(net, params, x)
    np.testing.assert_allclose(y, attention_reference(x, params), rtol=RTOL, atol=ATOL)


def test_causal_attention_keeps_examples_apart_and_the_past_blind_to_the_future(doc, rng):
    net = jn.serial(jn.Dense(4), doc["CausalSelfAttention"](), jn.Dense(3))
    x = normal(rng, (2, 5, 3))
    params = random_params(net, x[:1], rng)
    y = net.apply(params, x)
    other_example = x.at[0].set(normal(rng, (5, 3)))
    np.testing.assert_array_equal(net.apply(params, other_example)[1], y[1])
    other_future = x.at[:, 3:].set(normal(rng, (2, 2, 3)))
    np.testing.assert_allclose(net.apply(params, other_future)[:, :3], y[:, :3], rtol=1e-6, atol=1e-6)


def test_causal_attention_gradients_match_finite_differences(doc, rng):
    net = doc["CausalSelfAttention"]()
    with jax.enable_x64(True):
        x = normal(rng, (2, 4, 3), jnp.float64)
        params = random_params(net, x[:1], rng)
        check_grads(lambda p, v: net.apply(p, v), (params, x), order=2, modes=("rev",))


def test_an_undeclared_sequence_layer_raises_naming_it_and_the_declaration_fixes_it(doc, rng):
    # The case: read with the most batch axes, (2, 5, 3) became 10 one-token examples
    # and the attention mixed the two sequences, silently. Now the reading is refused.
    x = normal(rng, (2, 5, 3))
    undeclared = jn.serial(jn.Dense(4), doc["Undeclared"](), jn.Dense(3))
    params = random_params(undeclared, x[:1], rng)
    with pytest.raises(jn.ShapeError, match=(
            r"^network: an input of shape \(2, 5, 3\) fits these params with 0 or 1 or 2 leading "
            r"batch axes, and causal_attention_1 does not declare how many axes form one example: "
            r"set example_ndim \(or pointwise = True\)")):
        undeclared.apply(params, x)
    changed = x.at[0].set(normal(rng, (5, 3)))
    silently_wrong = lambda v: undeclared.apply(params, v, batch_ndim=2)  # the old reading
    assert not np.allclose(silently_wrong(changed)[1], silently_wrong(x)[1])

    declared = jn.serial(jn.Dense(4), doc["CausalSelfAttention"](), jn.Dense(3))
    y = declared.apply(params, x)  # same params: the declaration changes no tree
    np.testing.assert_array_equal(declared.apply(params, changed)[1], y[1])
    np.testing.assert_allclose(y, undeclared.apply(params, x, batch_ndim=1), rtol=1e-6, atol=1e-6)


def test_a_declared_example_rank_refuses_other_ranks(doc, key):
    with pytest.raises(jn.ShapeError, match=r"^causal_attention: expected examples of rank 2; got "
                                            r"examples of shape \(3,\) \(rank 1\)"):
        doc["CausalSelfAttention"]().init(key, (1, 3))


# ---- RunningCenter: explicit state -----------------------------------------------------------

def random_state(net, x, rng):
    shapes = jax.eval_shape(net.init_with_state, jax.random.key(0), x)[1]
    return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype), shapes)


@pytest.mark.parametrize("shape, momentum", [((6, 4), 0.9), ((6, 3, 4), 0.0), ((6, 2, 2, 4), 0.5)])
def test_running_center_in_training_matches_numpy(doc, rng, shape, momentum):
    net = doc["RunningCenter"](momentum)
    x = normal(rng, shape, loc=2.0)
    params, state = {}, random_state(net, x[:1], rng)
    y, new_state = net.apply_with_state(params, state, x, train=True)
    x64 = np.asarray(x, np.float64)
    batch_mean = x64.reshape(-1, shape[-1]).mean(0)
    np.testing.assert_allclose(y, x64 - batch_mean, rtol=RTOL, atol=ATOL)
    expected = momentum * np.asarray(state["mean"], np.float64) + (1 - momentum) * batch_mean
    np.testing.assert_allclose(new_state["mean"], expected, rtol=RTOL, atol=ATOL)
    # statistics over every leading axis: the reading of the batch axes does not matter
    jitted = jax.jit(lambda v: net.apply_with_state(params, state, v, train=True))
    for other in (x, x.reshape((2, 3) + shape[1:])):
        y_other, state_other = jitted(other)
        np.testing.assert_allclose(y_other.reshape(y.shape), y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(state_other["mean"], new_state["mean"], rtol=1e-6, atol=1e-6)


def test_running_center_in_evaluation_uses_and_keeps_the_running_mean(doc, rng):
    net = jn.serial(jn.Dense(4), doc["RunningCenter"]())
    x = normal(rng, (6, 3))
    params, state = random_params(net, x[:1], rng), random_state(net, x[:1], rng)
    y = assert_contract_with_state(net, params, state, x)
    p, mean = f64(params)["dense_1"], np.asarray(state["running_center_1"]["mean"], np.float64)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ p["w"] + p["b"] - mean, rtol=RTOL, atol=ATOL)


def test_running_center_starts_at_zero_and_train_and_eval_differ(doc, key, rng):
    net = jn.serial(jn.Dense(4), doc["RunningCenter"](0.5))
    x = normal(rng, (8, 3), loc=3.0)
    params, state = net.init_with_state(key, x[:1])
    np.testing.assert_array_equal(state["running_center_1"]["mean"], np.zeros(4))
    y_train, trained = net.apply_with_state(params, state, x, train=True)
    y_eval, kept = net.apply_with_state(params, trained, x)
    hidden = np.asarray(x, np.float64) @ f64(params)["dense_1"]["w"] + f64(params)["dense_1"]["b"]
    batch_mean = hidden.mean(0)
    np.testing.assert_allclose(trained["running_center_1"]["mean"], 0.5 * batch_mean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(y_train, hidden - batch_mean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(y_eval, hidden - 0.5 * batch_mean, rtol=RTOL, atol=ATOL)
    assert_trees_equal(kept, trained)


def test_running_center_gradients_skip_the_running_mean(doc, rng):
    net = doc["RunningCenter"]()
    with jax.enable_x64(True):
        x = normal(rng, (5, 3), jnp.float64)
        state = random_state(net, x[:1], rng)
        check_grads(lambda v: net.apply_with_state({}, state, v, train=True)[0], (x,), order=2,
                    modes=("rev",))
        grad = jax.grad(lambda v: net.apply_with_state({}, state, v, train=True)[1]["mean"].sum())(x)
    np.testing.assert_array_equal(grad, np.zeros_like(grad))


def test_a_network_with_running_center_refuses_plain_apply_and_bad_momentum(doc, key, rng):
    net = jn.serial(jn.Dense(4), doc["RunningCenter"]())
    params = net.init(key, (1, 3))
    with pytest.raises(ValueError, match=r"this network keeps state \(running_center_1\); use "
                                         r"init_with_state"):
        net.apply(params, normal(rng, (2, 3)))
    for bad in (1.0, -0.1, "0.9"):
        with pytest.raises(ValueError, match=r"RunningCenter: momentum must be in \[0, 1\)"):
            doc["RunningCenter"](bad)


# ---- GaussianNoise: randomness in training mode ----------------------------------------------

def test_gaussian_noise_adds_the_keys_normals_in_training_only(doc, rng):
    layer = doc["GaussianNoise"](0.5)
    x, k = normal(rng, (6, 4)), jax.random.key(3)
    np.testing.assert_array_equal(layer.apply({}, x), x)
    y = layer.apply({}, x, train=True, key=k)
    np.testing.assert_allclose(y, x + 0.5 * jax.random.normal(k, x.shape), rtol=1e-6, atol=1e-6)
    jitted = jax.jit(lambda v: layer.apply({}, v, train=True, key=k))(x)  # fused: rounding only
    np.testing.assert_allclose(jitted, y, rtol=1e-6, atol=1e-6)
    assert not np.allclose(layer.apply({}, x, train=True, key=jax.random.key(4)), y)
    noise = layer.apply({}, jnp.zeros((4000, 8)), train=True, key=k)
    assert abs(float(noise.std()) - 0.5) < 0.02 and abs(float(noise.mean())) < 0.02


def test_gaussian_noise_says_when_it_needs_a_key(doc, rng):
    noisy = jn.serial(jn.Dense(4), doc["GaussianNoise"](0.5), jn.Dense(2))
    assert noisy.needs_key and not doc["GaussianNoise"](0.0).needs_key
    assert not jn.serial(jn.Dense(4), doc["GaussianNoise"](0.0)).needs_key
    x = normal(rng, (6, 3))
    params = random_params(noisy, x[:1], rng)
    assert_contract(noisy, params, x)  # evaluation: the identity
    with pytest.raises(ValueError, match=r"^gaussian_noise_1: GaussianNoise in training mode needs a PRNG key"):
        noisy.apply(params, x, train=True)
    quiet = doc["GaussianNoise"](0.0)
    np.testing.assert_array_equal(quiet.apply({}, x, train=True), x)  # draws nothing, needs no key
    with pytest.raises(ValueError, match=r"GaussianNoise: stddev must be a non-negative number, got -1"):
        doc["GaussianNoise"](-1)


# ---- Highway: a composite of two Dense children ----------------------------------------------

def highway_reference(x, p):
    x, p = np.asarray(x, np.float64), f64(p)
    t = 1.0 / (1.0 + np.exp(-(x @ p["gate"]["w"] + p["gate"]["b"])))
    h = np.maximum(x @ p["transform"]["w"] + p["transform"]["b"], 0.0)
    return t * h + (1.0 - t) * x


@pytest.mark.parametrize("shape", [(6, 4), (6, 2, 4)])
def test_highway_matches_numpy_under_jit_vmap_and_any_batch_axes(doc, rng, shape):
    net = jn.serial(jn.Dense(4), doc["Highway"](4))
    x = normal(rng, shape)
    params = random_params(net, x[:1], rng)
    assert sorted(params["highway_1"]) == ["gate", "transform"]
    y = assert_contract(net, params, x)
    p = f64(params)["dense_1"]
    hidden = np.asarray(x, np.float64) @ p["w"] + p["b"]
    np.testing.assert_allclose(y, highway_reference(hidden, params["highway_1"]), rtol=RTOL, atol=ATOL)


def test_highway_gradients_match_finite_differences(doc, rng):
    net = doc["Highway"](3)
    with jax.enable_x64(True):
        x = normal(rng, (4, 3), jnp.float64)
        params = random_params(net, x[:1], rng)
        check_grads(lambda p, v: net.apply(p, v), (params, x), order=2, modes=("rev",))


def test_highway_errors_name_the_block_or_its_child(doc, key):
    with pytest.raises(jn.ShapeError, match=r"^highway_1: expected 16 features \(the last axis\), got "
                                            r"examples of shape \(8,\)(\n|$)"):
        jn.serial(jn.Dense(8), doc["Highway"](16)).init(key, (1, 3))
    with pytest.raises(TypeError, match=r"^encoder/highway_1/transform: expected a floating-point input"):
        jn.named("encoder", jn.serial(doc["Highway"](3))).init(key, jax.ShapeDtypeStruct((1, 3), jnp.int32))


# ---- the protocol's error paths --------------------------------------------------------------

def test_a_layer_with_the_old_private_methods_fails_at_class_creation(doc):
    with pytest.raises(TypeError, match=r"OldStyle: the layer protocol is now public: rename _init, "
                                        r"_apply to init_params.*see docs/custom_layers\.md"):
        class OldStyle(jn.Layer):  # noqa: F841
            def _init(self, key, x):
                return {}, {}

            def _apply(self, params, state, x, **kwargs):
                return x, state
    assert DOC.exists()


def test_a_layer_without_forward_names_its_class(key):
    @dataclasses.dataclass(frozen=True, repr=False)
    class NoForward(jn.Layer):
        kind: ClassVar[str] = "no_forward"
        pointwise: ClassVar[bool] = True

    with pytest.raises(NotImplementedError, match="NoForward must implement forward"):
        jn.serial(jn.Dense(2), NoForward()).init(key, (1, 3))


@pytest.mark.parametrize("wrap, path", [(lambda layer: jn.serial(layer), "glu_1"),
                                        (lambda layer: jn.named("encoder", jn.serial(layer)), "encoder/glu_1"),
                                        (lambda layer: layer, "glu")])
def test_a_shape_error_from_init_params_is_prefixed_with_the_layers_path_once(doc, key, wrap, path):
    with pytest.raises(jn.ShapeError) as error:
        wrap(doc["GLU"](4)).init(key, (3,))  # three examples without a feature axis
    assert str(error.value) == (f"{path}: expected examples with a feature axis (..., features); "
                                "got examples of shape ()")


# ---- summaries, training, checkpoints, populations -------------------------------------------

def test_summary_rows_show_each_custom_layer_and_its_flops(doc):
    net = digits_net(doc, width=8)
    summary = jn.summarize(net, (4, 8, 8, 1))
    rows = {row.path: row for row in summary.rows}
    assert list(rows) == ["flatten_1", "glu_1", "running_center_1", "gaussian_noise_1",
                          "highway_1/transform", "highway_1/gate", "dense_1"]
    assert [row.layer for row in summary.rows] == [
        "Flatten()", "GLU(8)", "RunningCenter()", "GaussianNoise(0.1)", "Dense(8)", "Dense(8)", "Dense(10)"]
    assert all(row.output_shape == (4, 8) for row in summary.rows[1:-1])
    assert rows["glu_1"].parameters == 2 * (64 * 8 + 8) and rows["glu_1"].bytes == 4 * rows["glu_1"].parameters
    assert rows["glu_1"].flops == 2 * 2 * 4 * 64 * 8 + 4 * 4 * 8
    assert (rows["running_center_1"].parameters, rows["running_center_1"].flops) == (0, 4 * 8)
    assert rows["gaussian_noise_1"].flops == 2 * 4 * 8
    assert summary.parameters == 2 * (64 * 8 + 8) + 2 * (8 * 8 + 8) + 8 * 10 + 10


@pytest.fixture(scope="module")
def trained(doc, digits):
    """A network of every custom layer after ``fit`` for one epoch on 300 digits."""
    net = digits_net(doc)
    params, model_state = net.init_with_state(jax.random.key(0), digits.x_train[:1])
    before = jn.evaluate(net, params, (digits.x_train, digits.y_train), model_state=model_state)
    state, history = jn.fit(net, params, optax.adam(1e-2), (digits.x_train, digits.y_train),
                            epochs=1, batch_size=50, model_state=model_state,
                            key=jax.random.key(1), progress=False)
    return net, state, history, before


def test_fit_trains_a_network_of_custom_layers_and_updates_its_state(trained, digits):
    net, state, history, before = trained
    assert len(history) == 1 and int(state.step) == 6 and np.isfinite(history[0]["train_loss"])
    after = jn.evaluate(net, state.params, (digits.x_train, digits.y_train), model_state=state.model_state)
    assert after["loss"] < before["loss"]
    assert np.abs(np.asarray(state.model_state["running_center_1"]["mean"])).max() > 0


def test_a_checkpoint_of_custom_layers_round_trips_bit_for_bit(trained, digits, tmp_path):
    net, state, _, _ = trained
    path = jn.save_checkpoint(tmp_path, state)
    tensors = safetensors.numpy.load_file(str(path / "state.safetensors"))
    assert {"params.glu_1.value.w", "params.glu_1.gate.b", "params.highway_1.transform.w",
            "model_state.running_center_1.mean"} <= set(tensors)

    def fresh():  # another init: the template gives structure, the checkpoint the values
        params, model_state = net.init_with_state(jax.random.key(9), digits.x_train[:1])
        return jn.init_train_state(net, optax.adam(1e-2), params, model_state=model_state)

    for template in (fresh(), jax.eval_shape(fresh)):
        restored, _ = jn.restore_checkpoint(path, template)
        assert_trees_equal(restored, state)
    params, report = jn.restore_params(path, fresh().params)
    assert_trees_equal(params, state.params) and not report.missing
    tensorfile.save_params(tmp_path / "params.safetensors", state.params)
    loaded = tensorfile.load_params(tmp_path / "params.safetensors")
    assert_trees_equal(jax.tree.map(jnp.asarray, loaded), state.params)
    y, _ = net.apply_with_state(loaded, state.model_state, digits.x_test[:5])
    assert y.shape == (5, 10)
    assert checkpoint.latest_checkpoint(tmp_path) == path


def test_a_population_of_custom_layer_networks_trains_each_member_as_fit_would(doc, digits):
    net, opt = digits_net(doc), optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    data = (digits.x_train, digits.y_train)
    population = jn.init_population(net, opt, digits.x_train[:1], seeds=[0, 1],
                                    hyperparams={"learning_rate": [3e-3, 1e-2]})
    assert population.members.params["glu_1"]["value"]["w"].shape == (2, 64, 8)
    assert population.members.model_state["running_center_1"]["mean"].shape == (2, 8)
    trained, history = jn.fit_population(net, population, opt, data, epochs=1, batch_size=50,
                                         eval_data=(digits.x_test, digits.y_test),
                                         shared_order=False, progress=False)
    assert len(history) == 1 and len(history[0]["test_accuracy"]) == 2
    assert np.all(np.isfinite(history[0]["train_loss"]))
    assert trained.members.params["highway_1"]["gate"]["w"].shape == (2, 8, 8)
    alone, _ = jn.fit(net, population.member(1), opt, data, epochs=1, batch_size=50, progress=False)
    assert_trees_close(trained.member(1).params, alone.params)
    assert_trees_close(trained.member(1).model_state, alone.model_state)
