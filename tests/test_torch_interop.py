"""jaxnet.to_torch / from_torch: an equivalent PyTorch module, and weights back."""

import jax
import numpy as np
import pytest

import jaxnet as jn
from jaxnet.checkpoint import export_pytorch
from jaxnet.models import cnn, mlp

NETS = {
    "mlp": (lambda: mlp((16, 8), 4, activation="gelu", drop_rate=0.1), (5, 3)),
    "cnn": (lambda: cnn(10, channels=(4, 8), dense=16), (12, 12, 3)),
    "everything": (lambda: jn.serial(
        jn.Conv1D(4, 3, strides=2, padding="SAME"), jn.BatchNorm(), jn.elu,
        jn.AvgPool((3,), padding="SAME", strides=(2,)), jn.LayerNorm(),
        jn.Conv1D(4, 2, feature_group_count=2, dilation=2), jn.MaxPool((2,), padding=((1, 1),), strides=(1,)),
        jn.Flatten(), jn.Dropout(0.2), jn.Dense(6), jn.leaky_relu, jn.Reshape((2, 3)), jn.softplus,
        jn.silu, jn.sigmoid, jn.tanh, jn.relu, jn.Flatten(), jn.softmax, jn.log_softmax), (9, 4)),
    "conv2d_padded": (lambda: jn.serial(
        jn.Conv2D(3, (3, 2), padding=((1, 0), (0, 1)), strides=(2, 1)), jn.BatchNorm(),
        jn.AvgPool((2, 2), strides=(1, 1), padding="SAME"), jn.MaxPool((3, 3), padding="SAME"),
        jn.Flatten(), jn.Dense(2)), (7, 6, 2)),
}


def _setup(name, rng):
    build, shape = NETS[name]
    net = build()
    x = rng.normal(size=(7, *shape)).astype(np.float32)
    params, state = net.init_with_state(jax.random.key(1), x[:1])
    # running statistics away from their initial values, so that a mix-up shows
    state = jax.tree.map(lambda v: v + rng.uniform(0.1, 0.5, v.shape).astype(np.float32), state)
    return net, x, params, state, shape


@pytest.mark.parametrize("name", sorted(NETS))
def test_the_torch_module_computes_what_the_network_computes_on_channels_last_inputs(rng, name):
    torch = pytest.importorskip("torch")
    net, x, params, state, shape = _setup(name, rng)
    module = jn.to_torch(net, params, model_state=state or None, example_shape=shape)
    assert not module.training
    want = np.asarray(net.apply_with_state(params, state, x)[0])
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("name", sorted(NETS))
def test_weights_round_trip_exactly_through_torch(rng, name):
    pytest.importorskip("torch")
    net, x, params, state, shape = _setup(name, rng)
    module = jn.to_torch(net, params, model_state=state or None, example_shape=shape)
    back = jn.from_torch(module, net, x[:1])
    if net.has_state:
        back, state_back = back
        jax.tree.map(np.testing.assert_array_equal, state_back, state)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert jax.tree.structure(back) == jax.tree.structure(params)


def test_the_module_uses_export_pytorch_names_so_its_arrays_load_a_state_dict(rng):
    torch = pytest.importorskip("torch")
    net, x, params, _, shape = _setup("cnn", rng)
    module = jn.to_torch(net, jax.tree.map(np.zeros_like, params), example_shape=shape)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in export_pytorch(params).items()})
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, net.apply(params, x), atol=1e-5)
    back = jn.from_torch(export_pytorch(params), net, x[:1])  # a dict of NumPy arrays works too
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_loading_torch_weights_refuses_mismatches_naming_them(rng):
    torch = pytest.importorskip("torch")
    net = mlp((8,), 3)
    module = jn.to_torch(net, net.init(jax.random.key(0), (1, 5)), example_shape=(5,))
    weights = module.state_dict()
    wrong_shape = dict(weights, **{"dense_2.weight": torch.zeros(4, 8)})
    with pytest.raises(ValueError, match=r"dense_2.weight: \(4, 8\), expected \(3, 8\)"):
        jn.from_torch(wrong_shape, net, (1, 5))
    missing = {k: v for k, v in weights.items() if k != "dense_1.bias"}
    with pytest.raises(ValueError, match="missing from the PyTorch weights: dense_1.bias"):
        jn.from_torch(missing, net, (1, 5))
    extra = dict(weights, **{"head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not in the jaxnet network: head.weight"):
        jn.from_torch(extra, net, (1, 5))


def test_to_torch_refuses_params_of_another_network(rng):
    pytest.importorskip("torch")
    params = mlp((8,), 3).init(jax.random.key(0), (1, 5))
    with pytest.raises(ValueError, match="dense_1.weight"):
        jn.to_torch(mlp((8,), 3), params, example_shape=(6,))


def test_a_layer_without_a_torch_equivalent_is_named(rng):
    pytest.importorskip("torch")
    net = jn.serial(jn.Dense(4), jn.RMSNorm())
    with pytest.raises(ValueError, match=r"rms_norm_1: no PyTorch equivalent for RMSNorm\(\)"):
        jn.to_torch(net, net.init(jax.random.key(0), (1, 3)), example_shape=(3,))
    custom = jn.serial(jn.Dense(4), jax.nn.relu6)
    with pytest.raises(ValueError, match="relu6_1: no PyTorch equivalent"):
        jn.to_torch(custom, custom.init(jax.random.key(0), (1, 3)), example_shape=(3,))


def test_a_stateful_network_needs_its_state(rng):
    pytest.importorskip("torch")
    net = jn.serial(jn.Dense(4), jn.BatchNorm())
    params = net.init_with_state(jax.random.key(0), (1, 3))[0]
    with pytest.raises(ValueError, match="pass the trained model_state"):
        jn.to_torch(net, params, example_shape=(3,))


def test_importing_jaxnet_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, jaxnet; assert 'torch' not in sys.modules and 'jax2onnx' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0
