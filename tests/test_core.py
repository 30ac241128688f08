"""The layer contract: zero overhead against hand-written JAX, descriptions as values, init and
apply on any input form, params-tree validation and the summary."""

import collections
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn


def _input(rng, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


def _random_params(rng, net, key, x):
    """Random params in the shapes and dtypes ``net.init`` gives, without compiling initializers."""
    shapes = jax.eval_shape(lambda k: net.init(k, x), key)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


# ---- zero overhead: the same XLA program as hand-written JAX ---------------------------------------

def _mlp():
    return jn.serial(jn.Dense(64), jn.relu, jn.Dense(64), jn.relu, jn.Dense(10))


def _hand_written_mlp(params, x):
    """The MLP as one would write it in raw JAX, relying on implicit rank promotion for ``+ b``."""
    p1, p2, p3 = params["dense_1"], params["dense_2"], params["dense_3"]
    return jax.nn.relu(jax.nn.relu(x @ p1["w"] + p1["b"]) @ p2["w"] + p2["b"]) @ p3["w"] + p3["b"]


def _sgd_step(apply, learning_rate=0.1):
    """One gradient step on the mean softmax cross-entropy."""
    def loss(params, x, labels):
        return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), labels).mean()

    def step(params, x, labels):
        grads = jax.grad(loss)(params, x, labels)
        return jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
    return step


def stablehlo_ops(text: str) -> collections.Counter:
    """Op names of a StableHLO module, one per op line (``%3 = stablehlo.add ...``, ``return ...``)."""
    ops = collections.Counter()
    for line in text.splitlines():
        line = line.strip()
        match = re.match(r"(?:%[\w#:]+(?:, %[\w#:]+)* = )?([a-z_]+(?:\.[a-z_]+)?)\b", line)
        if match and (line.startswith("%") or "." in match.group(1) or match.group(1) in ("return", "call")):
            ops[match.group(1)] += 1
    return ops


def hlo_ops(text: str) -> collections.Counter:
    """Opcodes of an optimised HLO module, one per instruction line (``%x = f32[..] dot(...)``)."""
    ops = collections.Counter()
    for line in text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = .*?\s([a-z][a-z0-9\-]*)\(", line)
        if match:
            ops[match.group(1)] += 1
    return ops


def test_op_counters_see_the_ops():
    lowered = jax.jit(lambda a, b: jnp.tanh(a @ b) + 1).lower(jnp.ones((2, 3)), jnp.ones((3, 4)))
    ops = stablehlo_ops(lowered.as_text())
    assert ops["stablehlo.dot_general"] == 1 and ops["stablehlo.tanh"] == 1 and ops["stablehlo.add"] == 1
    compiled = hlo_ops(lowered.compile().as_text())
    assert compiled["tanh"] >= 1 or compiled["fusion"] >= 1
    assert sum(compiled.values()) >= 3


@pytest.fixture
def mlp_setup(key, rng):
    net = _mlp()
    x = _input(rng, 32, 20)
    labels = jnp.asarray(rng.integers(0, 10, size=32), jnp.int32)
    params = net.init(key, x[:1])
    return net, params, x, labels


def test_mlp_output_is_bitwise_equal_to_hand_written_jax(mlp_setup):
    net, params, x, _ = mlp_setup
    with jax.numpy_rank_promotion("allow"):
        expected = jax.jit(_hand_written_mlp)(params, x)
    np.testing.assert_array_equal(jax.jit(net.apply)(params, x), expected)


def test_training_step_compiles_to_the_hand_written_program(mlp_setup):
    net, params, x, labels = mlp_setup
    jaxnet_step = jax.jit(_sgd_step(net.apply)).lower(params, x, labels)
    with jax.numpy_rank_promotion("allow"):
        hand_step = jax.jit(_sgd_step(_hand_written_mlp)).lower(params, x, labels)

    jaxnet_ops, hand_ops = stablehlo_ops(jaxnet_step.as_text()), stablehlo_ops(hand_step.as_text())
    assert sum(hand_ops.values()) > 50  # the counter sees a whole training step
    assert jaxnet_ops == hand_ops, (
        f"StableHLO: jaxnet {sum(jaxnet_ops.values())} ops, hand-written {sum(hand_ops.values())}; "
        f"extra in jaxnet {dict(jaxnet_ops - hand_ops)}, missing {dict(hand_ops - jaxnet_ops)}")

    jaxnet_compiled, hand_compiled = jaxnet_step.compile(), hand_step.compile()
    jaxnet_hlo, hand_hlo = hlo_ops(jaxnet_compiled.as_text()), hlo_ops(hand_compiled.as_text())
    assert sum(hand_hlo.values()) > 10
    assert jaxnet_hlo == hand_hlo, (
        f"optimised HLO: jaxnet {sum(jaxnet_hlo.values())} instructions, hand-written {sum(hand_hlo.values())}; "
        f"extra in jaxnet {dict(jaxnet_hlo - hand_hlo)}, missing {dict(hand_hlo - jaxnet_hlo)}")

    # The same program gives the same bits.
    jax.tree.map(np.testing.assert_array_equal, jaxnet_compiled(params, x, labels),
                 hand_compiled(params, x, labels))


# ---- a description is a value ----------------------------------------------------------------------

def test_equal_descriptions_are_equal_and_hash_alike():
    a, b = _mlp(), _mlp()
    assert a is not b
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != jn.serial(jn.Dense(64), jn.relu, jn.Dense(64), jn.relu, jn.Dense(11))
    assert a != jn.serial(jn.Dense(64), jn.tanh, jn.Dense(64), jn.relu, jn.Dense(10))
    assert jn.Dense(3) != jn.Dense(3, use_bias=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.layers = ()  # type: ignore[misc]


@pytest.mark.parametrize("net", [
    _mlp(),
    jn.serial(jn.Flatten(), jn.Dense(8, use_bias=False, weight_init="he_normal"), jn.Dropout(0.25), jn.softmax),
    jn.serial(jn.Conv2D(8, 3, strides=2, padding="VALID"), jn.MaxPool((2, 2)), jn.AvgPool((2, 2), padding="SAME"),
              jn.BatchNorm(momentum=0.99), jn.LayerNorm(), jn.Reshape((-1,)), jn.Dense(3)),
    jn.serial(jn.named("encoder", jn.serial(jn.Embedding(10, 4), jn.Dense(4))),
              jn.parallel(jn.Dense(2), jn.residual(jn.Dense(4)), fan_in="concat"),
              jn.parallel(jn.Dense(6), jn.Dense(6), fan_in="sum")),
])
def test_repr_rebuilds_an_equal_description(net):
    text = repr(net)
    assert eval(text, vars(jn)) == net, text  # noqa: S307 (our own repr)


def test_repr_shows_only_what_differs_from_defaults():
    assert repr(jn.Dense(3)) == "Dense(3)"
    assert repr(jn.Dense(3, use_bias=False)) == "Dense(3, use_bias=False)"
    assert repr(jn.serial(jn.Dense(4), jn.relu)) == "Serial((Dense(4), relu))"
    assert repr(jn.Conv2D(8, 3)) == "Conv(8, (3, 3))"


def test_a_network_as_a_static_jit_argument_is_traced_once_per_description(mlp_setup):
    net, params, x, _ = mlp_setup
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def predict(network, params, x):
        traces.append(network)  # runs only while tracing
        return network.apply(params, x)

    y = predict(net, params, x)
    predict(_mlp(), params, x)  # an equal description built again
    predict(net, params, x + 1)  # new values, same shapes
    assert len(traces) == 1
    other = jn.serial(jn.Dense(64), jn.relu, jn.Dense(64), jn.tanh, jn.Dense(10))
    y_other = predict(other, params, x)
    assert len(traces) == 2
    assert not np.array_equal(y, y_other)


# ---- init -----------------------------------------------------------------------------------------

def test_init_from_an_array_a_shape_or_a_shape_dtype_struct(key, rng):
    net = jn.serial(jn.Flatten(), jn.Dense(5), jn.relu, jn.Dense(3))
    x = _input(rng, 1, 4, 3)
    from_array = net.init(key, x)
    for form in [(1, 4, 3), (7, 4, 3), jax.ShapeDtypeStruct((1, 4, 3), jnp.float32), np.asarray(x)]:
        jax.tree.map(np.testing.assert_array_equal, net.init(key, form), from_array)
    assert jax.tree.map(jnp.shape, from_array) == {"dense_1": {"w": (12, 5), "b": (5,)},
                                                   "dense_2": {"w": (5, 3), "b": (3,)}}
    assert not np.array_equal(net.init(jax.random.key(1), x)["dense_1"]["w"], from_array["dense_1"]["w"])


def test_init_takes_the_inputs_floating_dtype(key):
    net = jn.serial(jn.Dense(3))
    with jax.enable_x64(True):
        params = jax.eval_shape(lambda k: net.init(k, jax.ShapeDtypeStruct((1, 4), jnp.float64)), key)
        assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float64)}
    params = jax.eval_shape(lambda k: net.init(k, jax.ShapeDtypeStruct((1, 4), jnp.bfloat16)), key)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    ids = jax.ShapeDtypeStruct((1, 6), jnp.int32)
    params = jax.eval_shape(lambda k: jn.serial(jn.Embedding(10, 4), jn.Dense(2)).init(k, ids), key)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_init_accepts_a_raw_uint32_key(key):
    net = jn.serial(jn.Dense(3))
    raw = jax.random.key_data(key)
    jax.tree.map(np.testing.assert_array_equal, net.init(raw, (1, 4)), net.init(key, (1, 4)))


@pytest.mark.parametrize("key_value, message", [
    (0, "expected a PRNG key such as jax.random.key(0); got int"),
    (np.zeros(2, np.float32), "got ndarray of shape (2,) and dtype float32"),
    (jnp.zeros(3, jnp.uint32), "got ArrayImpl of shape (3,) and dtype uint32"),
    (None, "got NoneType"),
])
def test_init_with_a_bad_key(key_value, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        _mlp().init(key_value, (1, 4))


@pytest.mark.parametrize("x, error, message", [
    ((), jn.ShapeError, "network: init expects an example batch with a leading batch axis (e.g. x[:1]); got a scalar"),
    (jnp.float32(1.5), jn.ShapeError, "got a scalar"),
    ((1, -4), jn.ShapeError, "input shape (1, -4) has a negative size"),
    ([1, 4], TypeError, "expected an array, a jax.ShapeDtypeStruct, a shape tuple or a pytree (tuple, dict) of arrays; got list"),
    ("x", TypeError, "got str"),
    ((1,), jn.ShapeError, "dense_1: expected examples with a feature axis (..., features); got examples of shape ()"),
    (jnp.ones((1, 4), jnp.int32), TypeError, "dense_1: expected a floating-point input, got int32 of shape (1, 4)"),
])
def test_init_errors(x, error, message, key):
    with pytest.raises(error, match=re.escape(message)):
        _mlp().init(key, x)


def test_a_leaf_network_names_itself_by_kind(key):
    with pytest.raises(jn.ShapeError, match=re.escape("dense: init expects an example batch")):
        jn.Dense(3).init(key, ())


# ---- apply: one example, batches, vmap ----------------------------------------------------------

@pytest.fixture
def image_mlp(key, rng):
    net = jn.serial(jn.Flatten(), jn.Dense(8), jn.relu, jn.Dense(3))
    x = _input(rng, 6, 4, 3)  # examples of shape (4, 3)
    return net, net.init(key, x[:1]), x


def test_one_example_a_batch_and_many_batch_axes_agree(image_mlp):
    net, params, x = image_mlp
    y = net.apply(params, x)
    assert y.shape == (6, 3)
    assert net.output_shape(x) == jax.ShapeDtypeStruct((6, 3), jnp.float32)
    np.testing.assert_allclose(net.apply(params, x[2]), y[2], rtol=1e-6, atol=1e-6)
    assert net.apply(params, x[2]).shape == (3,)
    many = net.apply(params, x.reshape(2, 3, 4, 3))
    assert many.shape == (2, 3, 3)
    np.testing.assert_allclose(many.reshape(6, 3), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(net.apply)(params, x), y, rtol=1e-6, atol=1e-6)


def test_vmap_over_examples_and_over_stacked_params(image_mlp, key):
    net, params, x = image_mlp
    y = net.apply(params, x)
    np.testing.assert_allclose(jax.vmap(net.apply, (None, 0))(params, x), y, rtol=1e-6, atol=1e-6)
    nested = jax.vmap(jax.vmap(net.apply, (None, 0)), (None, 0))(params, x.reshape(2, 3, 4, 3))
    np.testing.assert_allclose(nested.reshape(6, 3), y, rtol=1e-6, atol=1e-6)

    keys = jax.random.split(key, 3)
    ensemble = jax.jit(jax.vmap(net.init, (0, None)))(keys, x[:1])  # three models, stacked on axis 0
    assert ensemble["dense_1"]["w"].shape == (3, 12, 8)
    ys = jax.vmap(net.apply, (0, None))(ensemble, x)
    assert ys.shape == (3, 6, 3)
    for i in range(3):
        member = jax.tree.map(lambda p: p[i], ensemble)
        np.testing.assert_allclose(ys[i], net.apply(member, x), rtol=1e-6, atol=1e-6)
    assert not np.allclose(ys[0], ys[1])


def test_apply_on_a_scalar_names_the_layer(image_mlp):
    net, params, _ = image_mlp
    with pytest.raises(jn.ShapeError, match=re.escape("params do not fit an input of shape ()")):
        net.apply(params, jnp.float32(1.0))


# ---- params-tree validation -----------------------------------------------------------------------

def _drop(tree, *paths):
    tree = jax.tree.map(lambda a: a, tree)  # a copy
    for path in paths:
        *parents, leaf = path.split(".")
        node = tree
        for name in parents:
            node = node[name]
        del node[leaf]
    return tree


def test_missing_and_unexpected_params_are_listed(mlp_setup):
    net, params, x, _ = mlp_setup
    with pytest.raises(ValueError, match=re.escape(
            "network: params/state do not match this network: missing params dense_2.b, dense_2.w, dense_3.b")):
        net.apply(_drop(params, "dense_2", "dense_3.b"), x)
    extra = {**params, "extra": {"w": x}, "dense_1": {**params["dense_1"], "scale": params["dense_1"]["b"]}}
    with pytest.raises(ValueError, match=re.escape("unexpected params dense_1.scale, extra.w")):
        net.apply(extra, x)
    both = {**_drop(params, "dense_3"), "dense_4": params["dense_3"]}
    with pytest.raises(ValueError, match=re.escape(
            "missing params dense_3.b, dense_3.w; unexpected params dense_4.b, dense_4.w")):
        net.apply(both, x)


def test_mis_shaped_and_wrong_dtype_params_are_listed(mlp_setup):
    net, params, x, _ = mlp_setup
    bad = {**params, "dense_1": {"w": params["dense_1"]["w"].T, "b": params["dense_1"]["b"].astype(jnp.float16)},
           "dense_3": {**params["dense_3"], "b": params["dense_3"]["b"][:5]}}
    with pytest.raises(jn.ShapeError, match=re.escape(
            "network: params do not fit an input of shape (32, 20): dense_1.b has dtype float16, expected float32; "
            "dense_1.w has shape (64, 20), expected (20, 64); dense_3.b has shape (5,), expected (10,)")):
        net.apply(bad, x)


def test_wrong_input_width_names_the_param_and_shapes(mlp_setup, rng):
    net, params, _, _ = mlp_setup
    with pytest.raises(jn.ShapeError, match=re.escape(
            "params do not fit an input of shape (5, 21): dense_1.w has shape (20, 64), expected (21, 64)")):
        net.apply(params, _input(rng, 5, 21))
    with pytest.raises(jn.ShapeError, match=re.escape("dense_1.w has shape (20, 64), expected (19, 64)")):
        jax.jit(net.apply)(params, _input(rng, 19))


def test_params_from_another_architecture(mlp_setup, key, rng):
    net, _, x, _ = mlp_setup
    narrower = _random_params(rng, jn.serial(jn.Dense(32), jn.relu, jn.Dense(64), jn.relu, jn.Dense(10)), key, x[:1])
    with pytest.raises(jn.ShapeError, match=re.escape(
            "dense_1.b has shape (32,), expected (64,); dense_1.w has shape (20, 32), expected (20, 64); "
            "dense_2.w has shape (32, 64), expected (64, 64)")):
        net.apply(narrower, x)
    shallower = _random_params(rng, jn.serial(jn.Dense(64), jn.relu, jn.Dense(10)), key, x[:1])
    with pytest.raises(ValueError, match=re.escape("missing params dense_3.b, dense_3.w")):
        net.apply(shallower, x)
    stax_style = [(p["w"], p["b"]) for p in (shallower["dense_1"], shallower["dense_2"])]
    with pytest.raises(ValueError, match=re.escape(
            "missing params dense_1.b, dense_1.w, dense_2.b, dense_2.w, dense_3.b, dense_3.w; "
            "unexpected params 0.0, 0.1, 1.0, 1.1")):
        net.apply(stax_style, x)


def test_float64_params_for_float32_inputs_are_a_dtype_error(key, rng):
    net = jn.serial(jn.Dense(3))
    with jax.enable_x64(True):
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), _random_params(rng, net, key, (1, 4)))
        with pytest.raises(jn.ShapeError, match=re.escape("dense_1.b has dtype float64, expected float32")):
            net.apply(params, _input(rng, 2, 4))


# ---- summary ---------------------------------------------------------------------------------------

def test_summary_rows_and_totals(key, rng):
    net = jn.serial(jn.Flatten(), jn.named("encoder", jn.serial(jn.Dense(16), jn.relu)), jn.Dense(16),
                    jn.residual(jn.Dense(16), jn.tanh), jn.Dense(3, use_bias=False))
    x = _input(rng, 5, 4, 2)
    params = jax.eval_shape(lambda k: net.init(k, x[:1]), key)
    summary = jn.summarize(net, x)

    assert [row.path for row in summary.rows] == [
        "flatten_1", "encoder/dense_1", "encoder/relu_1", "dense_1", "residual_1/dense_1", "residual_1/tanh_1",
        "dense_2"]
    y = net.output_shape(x)
    assert summary.rows[-1].output_shape == y.shape == (5, 3)
    leaves = jax.tree.leaves(params)
    assert summary.parameters == sum(p.size for p in leaves) == 8 * 16 + 16 + 2 * (16 * 16 + 16) + 16 * 3
    assert summary.bytes == sum(p.size * p.dtype.itemsize for p in leaves)
    assert summary.flops == sum(row.flops for row in summary.rows)
    rows = {row.path: row for row in summary.rows}
    assert rows["encoder/dense_1"].parameters == params["encoder"]["dense_1"]["w"].size + 16
    assert rows["encoder/dense_1"].flops == 2 * 5 * 8 * 16 + 5 * 16
    assert rows["dense_2"].flops == 2 * 5 * 16 * 3
    assert rows["flatten_1"].output_shape == (5, 8)
    assert rows["encoder/relu_1"].parameters == 0

    text = str(summary)
    for row in summary.rows:
        assert row.path in text
    assert "total" in text.splitlines()[-1]
    assert f"{summary.parameters:,}" in text.splitlines()[-1]
    assert len(text.splitlines()) == len(summary.rows) + 4  # header, rule, rows, rule, total


def test_a_network_without_params_reads_its_input_as_a_batch(rng):
    x = jnp.asarray(rng.normal(size=(2, 4, 4)), jnp.float32)
    assert jn.Flatten().apply({}, x).shape == (2, 16)
    assert jn.serial(jn.Flatten(), jn.relu).apply({}, x).shape == (2, 16)
