"""jaxnet.stax against jax.example_libraries.stax (same params, shapes and outputs), and conversions."""

import contextlib
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.example_libraries import optimizers
from jax.example_libraries import stax as reference
from jax.test_util import check_grads

import jaxnet as jn
from jaxnet import stax
from jaxnet.nn.layer import ShapeError
from jaxnet.stax import from_stax, to_stax

DIGITS = pathlib.Path(jn.__file__).parent / "datasets" / "digits.npz"


@contextlib.contextmanager
def permissive():
    """The reference stax relies on implicit rank promotion, which conftest.py turns into an error."""
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        yield


def random_inputs(rng, shape):
    """Random normal inputs of ``shape``, or a list of them for a list of shapes."""
    if isinstance(shape, list):
        return [random_inputs(rng, s) for s in shape]
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def with_unknown_batch(shape):
    if isinstance(shape, list):
        return [with_unknown_batch(s) for s in shape]
    return (-1,) + shape[1:]


def as_ints(shape):
    """Shapes as Python ints, keeping the list/tuple structure (lax returns NumPy integers)."""
    return jax.tree.map(int, shape)


def assert_trees_close(actual, expected, rtol=1e-6, atol=1e-6):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


ACTIVATIONS = ["Relu", "Sigmoid", "Tanh", "Exp", "Elu", "LeakyRelu", "Selu", "Gelu", "Softplus",
               "Softmax", "LogSoftmax"]

# name -> (build(stax_module) -> (init_fun, apply_fun), input_shape). Parameter shapes repeat
# across cases on purpose: compiling each new random initializer shape is most of the test time.
CASES = {
    "dense": (lambda s: s.Dense(4), (3, 5)),
    "dense_rank3_custom_init": (lambda s: s.Dense(4, s.glorot(), s.randn(0.5)), (2, 3, 5)),
    "conv": (lambda s: s.Conv(4, (3, 3)), (2, 8, 8, 3)),
    "conv_same_strided": (lambda s: s.Conv(4, (3, 3), (2, 2), "SAME"), (2, 9, 9, 3)),
    "conv_explicit_padding": (lambda s: s.Conv(4, (3, 3), padding=((1, 0), (2, 2))), (2, 5, 6, 3)),
    "general_conv_nchw": (lambda s: s.GeneralConv(("NCHW", "HWIO", "NCHW"), 4, (3, 3), (1, 2), "SAME"),
                          (2, 3, 8, 8)),
    "general_conv_1d": (lambda s: s.GeneralConv(("NHC", "HIO", "NHC"), 4, (3,)), (2, 10, 3)),
    "conv_transpose": (lambda s: s.ConvTranspose(4, (3, 3), (2, 2), "SAME"), (2, 5, 5, 3)),
    "conv_transpose_valid": (lambda s: s.ConvTranspose(4, (3, 3)), (2, 4, 5, 3)),
    "conv1d_transpose": (lambda s: s.Conv1DTranspose(4, (3,), (2,), "SAME"), (2, 7, 3)),
    "general_conv_transpose_nchw": (
        lambda s: s.GeneralConvTranspose(("NCHW", "HWIO", "NCHW"), 4, (3, 3), (2, 2)), (2, 3, 5, 5)),
    "batch_norm": (lambda s: s.BatchNorm(), (4, 5, 5, 3)),
    "batch_norm_features": (lambda s: s.BatchNorm(axis=(0,)), (8, 5)),
    "batch_norm_center_only": (lambda s: s.BatchNorm(axis=0, scale=False, beta_init=s.randn()), (8, 4)),
    "batch_norm_scale_only": (lambda s: s.BatchNorm(center=False, gamma_init=s.randn()), (4, 3, 3, 4)),
    "batch_norm_neither": (lambda s: s.BatchNorm((0, 1), center=False, scale=False), (4, 3, 2)),
    "max_pool": (lambda s: s.MaxPool((2, 2), (2, 2)), (2, 6, 6, 3)),
    "max_pool_same": (lambda s: s.MaxPool((3, 3), (2, 2), "SAME"), (2, 7, 7, 3)),
    "avg_pool": (lambda s: s.AvgPool((2, 2)), (2, 6, 6, 3)),
    "avg_pool_same": (lambda s: s.AvgPool((3, 3), (2, 2), "SAME"), (2, 7, 7, 3)),
    "avg_pool_nchw": (lambda s: s.AvgPool((2, 2), (1, 2), "SAME", spec="NCHW"), (2, 3, 5, 5)),
    "sum_pool": (lambda s: s.SumPool((2, 3), (1, 2)), (2, 6, 6, 3)),
    "max_pool_1d": (lambda s: s.MaxPool((3,)), (2, 9, 3)),
    "flatten": (lambda s: s.Flatten, (2, 3, 4, 5)),
    "identity": (lambda s: s.Identity, (2, 3)),
    **{name.lower(): (lambda s, name=name: getattr(s, name), (3, 4, 5)) for name in ACTIVATIONS},
    "elementwise": (lambda s: s.elementwise(jnp.sin), (3, 4)),
    "elementwise_kwargs": (lambda s: s.elementwise(jax.nn.leaky_relu, negative_slope=0.3), (3, 4)),
    "dropout": (lambda s: s.Dropout(0.7), (3, 5)),
    "dropout_test_mode": (lambda s: s.Dropout(0.7, mode="test"), (3, 5)),
    "serial_mlp": (lambda s: s.serial(s.Flatten, s.Dense(4), s.Relu, s.Dropout(0.8), s.Dense(4),
                                      s.LogSoftmax), (3, 1, 5)),
    "parallel": (lambda s: s.parallel(s.Dense(4), s.Tanh, s.Dense(4)), [(2, 5), (2, 5), (2, 4)]),
    "fan_out": (lambda s: s.FanOut(3), (2, 4)),
    "fan_out_sum": (lambda s: s.serial(s.FanOut(2), s.parallel(s.Dense(4), s.Dense(4)), s.FanInSum), (3, 5)),
    "fan_in_concat": (lambda s: s.serial(s.FanOut(3), s.parallel(s.Dense(4), s.Identity, s.Tanh),
                                         s.FanInConcat()), (3, 5)),
    "fan_in_concat_axis": (lambda s: s.serial(s.FanOut(2), s.parallel(s.Relu, s.Tanh),
                                              s.FanInConcat(axis=1)), (2, 4, 5, 3)),
    "residual_block": (lambda s: s.serial(
        s.FanOut(2), s.parallel(s.serial(s.Dense(4), s.BatchNorm(axis=0), s.Relu), s.Identity),
        s.FanInSum, s.Relu), (3, 4)),
    "shape_dependent": (lambda s: s.shape_dependent(lambda shape: s.Dense(shape[-1] - 1)), (3, 5)),
}


def shapes_of(output_shape):
    """One shape, or a sequence of shapes (from FanOut or parallel), as a list of int tuples."""
    if output_shape and isinstance(output_shape[0], (tuple, list)):
        return [tuple(map(int, shape)) for shape in output_shape]
    return [tuple(map(int, output_shape))]


@pytest.mark.parametrize("name", CASES)
def test_same_params_shapes_and_outputs_as_stax(name, key, rng):
    build, input_shape = CASES[name]
    (ref_init, ref_apply), (init_fun, apply_fun) = build(reference), build(stax)
    # stax's init_funs need no rank promotion; sharing the strict mode shares compiled initializers
    ref_shape, ref_params = ref_init(key, input_shape)
    output_shape, params = init_fun(key, input_shape)
    assert as_ints(output_shape) == as_ints(ref_shape)
    assert_trees_close(params, ref_params)  # same structure, shapes, and values from the same key

    x = random_inputs(rng, input_shape)
    with permissive():
        expected = ref_apply(ref_params, x, rng=jax.random.key(1))
    y = apply_fun(ref_params, x, rng=jax.random.key(1))
    assert_trees_close(y, expected, rtol=1e-5)
    assert [v.shape for v in jax.tree.leaves(y)] == shapes_of(output_shape)


@pytest.mark.parametrize("name", CASES)
def test_unknown_batch_size_gives_the_same_output_shape(name, key):
    build, input_shape = CASES[name]
    (ref_init, _), (init_fun, _) = build(reference), build(stax)
    ref_shape, _ = ref_init(key, with_unknown_batch(input_shape))
    output_shape, _ = init_fun(key, with_unknown_batch(input_shape))
    assert as_ints(output_shape) == as_ints(ref_shape)


def test_exports_every_stax_name():
    names = {name for name in dir(reference)
             if not name.startswith("_") and not isinstance(getattr(reference, name), types.ModuleType)}
    assert not names - set(stax.__all__)
    assert all(hasattr(stax, name) for name in stax.__all__)


def test_dropout_rate_is_the_keep_probability(key):
    _, apply_fun = stax.Dropout(0.9)
    x = jnp.ones((200, 100))
    y = apply_fun((), x, rng=key)
    kept = np.asarray(y != 0)
    assert 0.88 < kept.mean() < 0.92
    np.testing.assert_allclose(y[kept], 1 / 0.9, rtol=1e-6)


def test_dropout_test_mode_is_identity_without_a_key():
    _, apply_fun = stax.Dropout(0.5, mode="test")
    x = jnp.arange(6.0)
    np.testing.assert_array_equal(apply_fun((), x), x)


# ---- a classic stax script, unchanged ------------------------------------------------------

def classic_cnn(stax):
    """A small CNN classifier for 8x8 digits, written once against either stax module."""
    return stax.serial(stax.Conv(4, (3, 3), padding="SAME"), stax.BatchNorm(), stax.Relu,
                       stax.MaxPool((2, 2), strides=(2, 2)), stax.Flatten, stax.Dropout(0.9),
                       stax.Dense(10), stax.LogSoftmax)


def train_classic_cnn(stax, key, steps=25):
    """jax's examples/mnist_classifier.py with a CNN, on the digits.

    Returns:
      ``(losses, last_step)``: the loss of each step, and the ``(params, batch, rng)`` the
      last step's loss was computed on.
    """
    init_random_params, predict = classic_cnn(stax)

    def loss(params, batch, rng):
        inputs, targets = batch
        preds = predict(params, inputs, rng=rng)
        return -jnp.mean(jnp.sum(preds * targets, axis=1))

    opt_init, opt_update, get_params = optimizers.momentum(0.1, mass=0.9)

    @jax.jit
    def update(i, opt_state, batch, rng):
        value, grads = jax.value_and_grad(loss)(get_params(opt_state), batch, rng)
        return opt_update(i, grads, opt_state), value

    data = np.load(DIGITS, allow_pickle=False)
    images = jnp.asarray(data["images"][:512, :, :, None], jnp.float32) / 16
    batch = (images, jax.nn.one_hot(data["labels"][:512], 10))
    _, init_params = init_random_params(key, (-1, 8, 8, 1))
    opt_state = opt_init(init_params)
    rng, losses = jax.random.split(key)[0], []
    for i in range(steps):
        rng, step_rng = jax.random.split(rng)
        last_step = (get_params(opt_state), batch, step_rng)
        opt_state, value = update(i, opt_state, batch, step_rng)
        losses.append(float(value))
    return losses, last_step


def test_classic_stax_script_runs_unchanged(key):
    losses, (params, (inputs, targets), rng) = train_classic_cnn(stax, key)
    assert losses[-1] < losses[0] / 2
    # The reference stax gives the same loss for the same params, batch and dropout key
    # (training it too would double the test's time).
    with permissive():
        preds = jax.jit(classic_cnn(reference)[1])(params, inputs, rng=rng)
    np.testing.assert_allclose(losses[-1], -jnp.mean(jnp.sum(preds * targets, axis=1)), rtol=1e-5)


# ---- to_stax --------------------------------------------------------------------------------

def test_to_stax_gives_jaxnet_params_and_outputs(key, rng):
    net = jn.serial(jn.Conv2D(4, 3), jn.relu, jn.MaxPool((2, 2)), jn.Flatten(), jn.Dense(10))
    init_fun, apply_fun = to_stax(net)
    output_shape, params = init_fun(key, (-1, 8, 8, 3))
    assert output_shape == (-1, 10)
    assert_trees_close(params, net.init(key, (1, 8, 8, 3)))
    x = random_inputs(rng, (5, 8, 8, 3))
    np.testing.assert_allclose(apply_fun(params, x), net.apply(params, x), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(apply_fun)(params, x), net.apply(params, x), rtol=1e-5, atol=1e-6)


def test_to_stax_mixes_with_stax_layers(key, rng):
    net = jn.serial(jn.Dense(4), jn.tanh)
    init_fun, apply_fun = stax.serial(to_stax(net), stax.Relu, stax.Dense(4))
    output_shape, params = init_fun(key, (-1, 5))
    assert output_shape == (-1, 4)
    assert set(params[0]) == {"dense_1"} and params[1] == ()
    x = random_inputs(rng, (3, 5))
    hidden = jax.nn.relu(net.apply(params[0], x))
    expected = hidden @ params[2][0] + params[2][1][None, :]
    np.testing.assert_allclose(apply_fun(params, x, rng=key), expected, rtol=1e-6)


def test_to_stax_rng_means_training_mode(key, rng):
    net = jn.serial(jn.Dense(4), jn.Dropout(0.5))
    init_fun, apply_fun = to_stax(net)
    _, params = init_fun(key, (-1, 5))
    x = random_inputs(rng, (3, 5))
    train = apply_fun(params, x, rng=jax.random.key(3))
    np.testing.assert_allclose(train, net.apply(params, x, key=jax.random.key(3), train=True))
    assert np.any(np.asarray(train) == 0)
    np.testing.assert_allclose(apply_fun(params, x), net.apply(params, x))
    np.testing.assert_allclose(apply_fun(params, x, rng=key, train=False), net.apply(params, x))


def test_to_stax_reads_one_batch_axis_like_stax(key, rng):
    """A parameter-free network cannot infer its example rank from params; stax's convention decides."""
    init_fun, apply_fun = to_stax(jn.serial(jn.Flatten(), jn.softmax))
    output_shape, params = init_fun(key, (-1, 2, 3))
    assert output_shape == (-1, 6)
    y = apply_fun(params, random_inputs(rng, (4, 2, 3)))
    assert y.shape == (4, 6)
    np.testing.assert_allclose(jnp.sum(y, axis=-1), np.ones(4), rtol=1e-6)


def test_to_stax_integer_inputs(key):
    net = jn.serial(jn.Embedding(10, 4), jn.Dense(4))
    init_fun, apply_fun = to_stax(net, input_dtype=jnp.int32)
    output_shape, params = init_fun(key, (-1, 5))
    assert output_shape == (-1, 5, 4)
    ids = jnp.arange(15, dtype=jnp.int32).reshape(3, 5) % 10
    np.testing.assert_allclose(apply_fun(params, ids), net.apply(params, ids))


def test_to_stax_errors(key, rng):
    with pytest.raises(ValueError, match=r"keeps state .*jaxnet\.stax\.BatchNorm"):
        to_stax(jn.serial(jn.Dense(4), jn.BatchNorm()))
    init_fun, apply_fun = to_stax(jn.Dense(4))
    with pytest.raises(ShapeError, match=r"only the batch size allowed to be -1; got \(2, -1\)"):
        init_fun(key, (2, -1))
    _, params = init_fun(key, (-1, 5))
    with pytest.raises(ShapeError, match=r"params do not fit inputs of shape \(2, 4\): w has shape "
                                         r"\(5, 4\), expected \(4, 4\)"):
        apply_fun(params, random_inputs(rng, (2, 4)))


# ---- from_stax ------------------------------------------------------------------------------

def test_from_stax_inside_jaxnet_serial(key, rng):
    inner_init, inner_apply = stax.serial(stax.Dense(4), stax.Tanh)
    net = jn.serial(jn.Dense(4), from_stax(inner_init, inner_apply, pointwise=True), jn.Dense(4))
    x = random_inputs(rng, (6, 5))
    params = net.init(key, x[:1])
    assert set(params) == {"dense_1", "stax_1", "dense_2"}
    (w, b), () = params["stax_1"]  # stax's own tree, a list of tuples
    assert w.shape == (4, 4) and b.shape == (4,)

    d1, d2 = params["dense_1"], params["dense_2"]
    hidden = inner_apply(params["stax_1"], x @ d1["w"] + d1["b"][None, :])
    expected = hidden @ d2["w"] + d2["b"][None, :]
    y = net.apply(params, x)
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(net.apply)(params, x), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(net.apply, (None, 0))(params, x), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.apply(params, x[0]), y[0], rtol=1e-5, atol=1e-6)
    check_grads(jax.jit(net.apply), (params, x[:2]), order=1, modes=["rev"],
                atol=2e-2, rtol=2e-2, eps=1e-2)


def test_from_stax_is_a_hashable_static_value(key, rng):
    layer = from_stax(*stax.Dense(4), name="head", pointwise=True)
    assert hash(layer) == hash(from_stax(layer.init_fun, layer.apply_fun, name="head", pointwise=True))
    net = jn.serial(jn.Dense(4), layer)
    x = random_inputs(rng, (2, 5))
    params = net.init(key, x[:1])
    assert set(params) == {"dense_1", "head_1"}
    run = jax.jit(lambda network, p, v: network.apply(p, v), static_argnums=0)
    np.testing.assert_allclose(run(net, params, x), net.apply(params, x), rtol=1e-5, atol=1e-6)


def test_from_stax_follows_jaxnet_training_mode(key, rng):
    net = jn.serial(jn.Dense(4), from_stax(*stax.Dropout(0.5), pointwise=True))
    x = random_inputs(rng, (3, 5))
    params = net.init(key, x[:1])
    hidden = net.layers[0].apply(params["dense_1"], x)
    # the stax layer is the only child needing a key, so it receives the key itself
    expected = stax.Dropout(0.5)[1]((), hidden, rng=jax.random.key(7))
    np.testing.assert_allclose(net.apply(params, x, key=jax.random.key(7), train=True), expected, rtol=1e-6)
    np.testing.assert_allclose(net.apply(params, x), hidden, rtol=1e-6)  # evaluation: no dropout
    with pytest.raises(ValueError, match="Dropout: training mode needs a PRNG key"):
        net.apply(params, x, train=True)


def test_from_stax_in_a_summary(key):
    net = jn.serial(jn.Dense(4), from_stax(*stax.serial(stax.Dense(4), stax.Relu), pointwise=True))
    summary = jn.summarize(net, (3, 5))
    assert [(row.path, row.layer, row.output_shape, row.parameters) for row in summary.rows] == [
        ("dense_1", "Dense(4)", (3, 4), 24), ("stax_1", "from_stax(<serial>)", (3, 4), 20)]
    assert summary.rows[1].flops == 2 * 3 * 4 * 4 + 3 * 4 + 3 * 4  # matmul, bias, relu, counted by XLA


def test_from_stax_without_params_is_left_out_of_the_tree(key, rng):
    net = jn.serial(jn.Dense(4), from_stax(*stax.Relu, pointwise=True))
    x = random_inputs(rng, (2, 5))
    params = net.init(key, x[:1])
    assert set(params) == {"dense_1"}
    np.testing.assert_allclose(net.apply(params, x), jax.nn.relu(net.layers[0].apply(params["dense_1"], x)))


def test_from_stax_wraps_the_reference_stax(key, rng):
    pair = reference.serial(reference.Dense(4), reference.Relu, reference.Dense(4))
    net = jn.serial(from_stax(*pair, pointwise=True), jn.log_softmax)
    x = random_inputs(rng, (3, 5))
    with permissive():
        params = net.init(key, x[:1])
        expected = jax.nn.log_softmax(pair[1](params["stax_1"], x))
        np.testing.assert_allclose(net.apply(params, x), expected, rtol=1e-6)


def test_round_trips(key, rng):
    net = jn.serial(jn.Dense(4), jn.relu, jn.Dense(4))
    again = from_stax(*to_stax(net), pointwise=True)
    x = random_inputs(rng, (3, 5))
    params = net.init(key, x[:1])
    assert_trees_close(again.init(key, x[:1]), params)
    np.testing.assert_allclose(again.apply(params, x), net.apply(params, x), rtol=1e-6)

    pair = stax.serial(stax.Dense(4), stax.Gelu, stax.Dense(4))
    init_fun, apply_fun = to_stax(from_stax(*pair))
    output_shape, params = init_fun(key, (-1, 5))
    assert output_shape == (-1, 4)
    np.testing.assert_allclose(apply_fun(params, x), pair[1](params, x), rtol=1e-6)


def test_from_stax_without_a_declaration_refuses_an_ambiguous_input(key, rng):
    net = jn.serial(jn.Dense(4), from_stax(*stax.Dense(4)))
    x = random_inputs(rng, (3, 5))
    params = net.init(key, x[:1])
    with pytest.raises(ShapeError, match=r"fits these params with 0 or 1 leading batch axes, and "
                                         r"stax_1 does not declare how many axes form one example"):
        net.apply(params, x)
    np.testing.assert_allclose(net.apply(params, x, batch_ndim=1),
                               jn.serial(jn.Dense(4), from_stax(*stax.Dense(4), pointwise=True)).apply(params, x))


def test_from_stax_errors(key):
    with pytest.raises(TypeError, match="from_stax: expected an .init_fun, apply_fun. pair"):
        from_stax(1, 2)
    with pytest.raises(ValueError, match="from_stax: name must be"):
        from_stax(*stax.Relu, name="a/b")
    net = jn.serial(jn.Dense(4), from_stax(*stax.Conv(4, (3, 3))))
    with pytest.raises(ShapeError, match=r"stax_1: the stax init_fun rejects inputs of shape \(1, 4\): "
                                         r"ShapeError: Conv: expected inputs of rank 4"):
        net.init(key, (1, 5))


# ---- error messages of the stax layers --------------------------------------------------------

def test_dense_wrong_width_names_the_layer(key, rng):
    init_fun, apply_fun = stax.Dense(4)
    _, params = init_fun(key, (-1, 5))
    with pytest.raises(ShapeError, match=r"Dense: inputs of shape \(2, 4\) have 4 features .* W of shape "
                                         r"\(5, 4\) expects 5"):
        apply_fun(params, random_inputs(rng, (2, 4)))


def test_conv_errors(key, rng):
    init_fun, apply_fun = stax.Conv(4, (3, 3))
    with pytest.raises(ShapeError, match=r"Conv: expected inputs of rank 4 \(NHWC\); got shape \(2, 8, 8\)"):
        init_fun(key, (2, 8, 8))
    _, params = init_fun(key, (-1, 8, 8, 3))
    with pytest.raises(ShapeError, match=r"Conv: .* have 4 channels, but W of shape \(3, 3, 3, 4\) .* expects 3"):
        apply_fun(params, random_inputs(rng, (1, 8, 8, 4)))
    with pytest.raises(ValueError, match="GeneralConv: dimension_numbers .* need 4 letters"):
        stax.GeneralConv(("NHC", "HIO", "NHC"), 2, (3, 3))


def test_pool_and_batch_norm_errors(key):
    with pytest.raises(ShapeError, match=r"MaxPool: expected inputs of rank 4 .*got shape \(2, 8, 3\)"):
        stax.MaxPool((2, 2))[0](key, (2, 8, 3))
    with pytest.raises(ValueError, match="AvgPool: strides"):
        stax.AvgPool((2, 2), (1,))
    with pytest.raises(ShapeError, match=r"BatchNorm: axis 2 is out of range .*BatchNorm\(axis=\(0,\)\)"):
        stax.BatchNorm()[0](key, (8, 5))


def test_dropout_errors(rng):
    for rate in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"Dropout: rate is the probability of keeping .* \(0, 1\]"):
            stax.Dropout(rate)
    with pytest.raises(ValueError, match="Dropout: training mode needs a PRNG key: call apply_fun"):
        stax.Dropout(0.5)[1]((), random_inputs(rng, (2, 3)))


def test_combinator_errors(key, rng):
    with pytest.raises(TypeError, match=r"serial: layer 1 is .*not an \(init_fun, apply_fun\) pair; "
                                        r"call it, e.g. Dense"):
        stax.serial(stax.Relu, stax.Dense)
    with pytest.raises(ValueError, match="serial: needs at least one layer"):
        stax.serial()
    init_fun, apply_fun = stax.serial(stax.Dense(4), stax.Relu)
    _, params = init_fun(key, (-1, 5))
    with pytest.raises(ValueError, match=r"serial: expected params with one entry per layer \(2\); got 1"):
        apply_fun(params[:1], random_inputs(rng, (2, 5)))
    with pytest.raises(ShapeError, match=r"parallel: expected one input shape per layer \(put FanOut\(2\)"):
        stax.parallel(stax.Dense(2), stax.Dense(2))[0](key, (3, 4))
    with pytest.raises(ShapeError, match=r"FanInSum: inputs must have one shape; got \(-1, 4\), \(-1, 5\)"):
        stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(4), stax.Identity), stax.FanInSum)[0](key, (-1, 5))
    with pytest.raises(ShapeError, match=r"FanInConcat: inputs must agree on all axes but -1"):
        stax.FanInConcat()[0](key, [(2, 3), (4, 3)])
