"""jaxnet.to_torch / from_torch: an equivalent PyTorch module, and weights back."""

import dataclasses
from typing import ClassVar

import jax
import numpy as np
import pytest

import jaxnet as jn
from jaxnet.checkpoint import export_pytorch
from jaxnet.models import cnn, mlp, transformer
from jaxnet.runs import build_model

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
    "group_and_rms_norm": (lambda: jn.serial(
        jn.Conv2D(6, 3), jn.GroupNorm(3), jn.relu, jn.RMSNorm(), jn.RMSNorm(use_scale=False),
        jn.Flatten(), jn.Dense(2)), (5, 5, 2)),
}
# Networks on token ids: (build, example shape, vocabulary size)
ID_NETS = {
    "embedding": (lambda: jn.serial(jn.Embedding(11, 6), jn.LayerNorm(), jn.Flatten(),
                                    jn.Dense(3)), (5,), 11),
}
NETS.update({name: (build, shape) for name, (build, shape, _) in ID_NETS.items()})
NETS.update({
    "conv_transpose_1d": (lambda: jn.serial(
        jn.ConvTranspose1D(3, 4, strides=2), jn.relu,  # SAME: the transpose of a SAME Conv
        jn.ConvTranspose1D(2, 3, strides=3, padding=((2, 0),)),  # crops torch cannot express
        jn.ConvTranspose1D(2, 2, strides=3, use_bias=False),  # kernel < stride: SAME adds a position
        jn.ConvTranspose1D(3, 5, strides=2, padding=1, weight_init="pytorch")), (5, 3)),
    "conv_transpose_2d": (lambda: jn.serial(
        jn.ConvTranspose2D(3, 3, strides=2, padding=((1, 0), (1, 0))), jn.tanh,
        jn.ConvTranspose2D(2, 4, strides=2), jn.ConvTranspose2D(2, (3, 2), padding="VALID"),
        jn.ConvTranspose2D(2, (2, 3), strides=(1, 2), padding=((0, 1), (2, 0)), use_bias=False),
        jn.Flatten(), jn.Dense(2)), (4, 3, 2)),
    "three_d_and_upsampling": (lambda: jn.serial(
        jn.Conv(4, (2, 2, 2)), jn.MaxPool((2, 2, 2), padding="SAME"), jn.AvgPool((1, 2, 1), padding="SAME"),
        jn.ConvTranspose(3, (2, 2, 2), strides=2), jn.Upsample(2), jn.Upsample((1, 2, 1), method="bilinear"),
        jn.GlobalAvgPool(keepdims=True), jn.Flatten(), jn.Dense(2)), (4, 5, 3, 2)),
    "global_pool_and_bilinear": (lambda: jn.serial(
        jn.Conv2D(3, 2), jn.Upsample((2, 3), method="bilinear"), jn.Upsample(2), jn.GlobalMaxPool(),
        jn.Dense(2)), (4, 3, 2)),
})


def _mask(lengths, time):
    return np.arange(time)[None] < np.asarray(lengths)[:, None]


def _normal(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


# Networks on sequences, with jaxnet's input forms (masks, initial states, cross attention):
# name -> (build, inputs from a NumPy generator, a batch of 7). Masks are right-padded, the
# third sequence empty, as torch's packed sequences want.
LENGTHS = [6, 3, 0, 1, 5, 2, 6]
SEQUENCE_NETS = {
    "lstm": (lambda: jn.serial(jn.Dense(4), jn.LSTM(5), jn.Dense(2)), lambda r: _normal(r, 7, 6, 3)),
    "lstm_masked_last_step_and_state": (
        lambda: jn.LSTM(5, return_sequences=False, return_state=True),
        lambda r: {"x": _normal(r, 7, 6, 3), "mask": _mask(LENGTHS, 6),
                   "initial_state": (_normal(r, 7, 5), _normal(r, 7, 5))}),
    "gru_reverse_masked": (lambda: jn.GRU(4, reverse=True),
                           lambda r: (_normal(r, 7, 6, 3), _mask(LENGTHS, 6))),
    "gru_reverse_last_step": (lambda: jn.GRU(4, reverse=True, return_sequences=False, return_state=True),
                              lambda r: _normal(r, 7, 6, 3)),
    "simple_rnn_relu": (lambda: jn.serial(jn.SimpleRNN(4, jn.relu), jn.SimpleRNN(3, return_sequences=False)),
                        lambda r: _normal(r, 7, 6, 3)),
    "simple_rnn_reverse_masked_state": (
        lambda: jn.SimpleRNN(4, reverse=True, return_sequences=False, return_state=True),
        lambda r: {"x": _normal(r, 7, 6, 3), "mask": _mask(LENGTHS, 6), "initial_state": _normal(r, 7, 4)}),
    "bidirectional_lstm_masked": (lambda: jn.Bidirectional(jn.LSTM(5, return_state=True)),
                                  lambda r: (_normal(r, 7, 6, 3), _mask(LENGTHS, 6))),
    "bidirectional_gru_sum_last_step": (
        lambda: jn.Bidirectional(jn.GRU(4, return_sequences=False), merge="sum"),
        lambda r: {"x": _normal(r, 7, 6, 3), "mask": _mask(LENGTHS, 6),
                   "initial_state": {"forward": _normal(r, 7, 4), "backward": _normal(r, 7, 4)}}),
    "bidirectional_rnn": (lambda: jn.serial(jn.Bidirectional(jn.SimpleRNN(4)), jn.Dense(2)),
                          lambda r: _normal(r, 7, 6, 3)),
    "self_attention": (lambda: jn.serial(jn.MultiHeadAttention(2), jn.Dense(3)),
                       lambda r: _normal(r, 7, 5, 8)),
    "self_attention_masked": (lambda: jn.MultiHeadAttention(2, use_bias=False),
                              lambda r: (_normal(r, 7, 6, 8), _mask(LENGTHS, 6))),
    "causal_attention": (lambda: jn.MultiHeadAttention(4, causal=True), lambda r: _normal(r, 7, 5, 8)),
    "causal_attention_masked": (lambda: jn.MultiHeadAttention(2, causal=True),
                                lambda r: (_normal(r, 7, 6, 8), _mask(LENGTHS, 6))),
    "cross_attention": (lambda: jn.MultiHeadAttention(2),
                        lambda r: {"query": _normal(r, 7, 3, 8), "context": _normal(r, 7, 6, 5),
                                   "mask": _mask(LENGTHS, 6)}),
    # packed projections (equal widths); left padding: early queries see no key and output zeros
    "causal_cross_attention": (lambda: jn.MultiHeadAttention(2, causal=True),
                               lambda r: {"query": _normal(r, 7, 4, 8), "context": _normal(r, 7, 6, 8),
                                          "mask": np.ascontiguousarray(_mask(LENGTHS, 6)[:, ::-1])}),
    "transformer_blocks": (lambda: jn.serial(
        jn.Dense(8), jn.LearnedPositionalEmbedding(9), jn.TransformerBlock(2, causal=True, drop_rate=0.1),
        jn.TransformerBlock(4, norm="rms", mlp_features=12), jn.SinusoidalPositionalEncoding(),
        jn.LayerNorm(), jn.GlobalAvgPool(), jn.Dense(3)), lambda r: _normal(r, 7, 6, 3)),
    "transformer_classifier_padded": (
        lambda: transformer(13, num_blocks=2, features=8, num_heads=2, max_length=6,
                                      num_classes=3, positional="sinusoidal", pad_id=0),
        lambda r: np.where(_mask(LENGTHS, 6), r.integers(1, 13, (7, 6)), 0).astype(np.int32)),
    "transformer_lm_untied": (
        lambda: transformer(13, num_blocks=1, features=8, num_heads=2, max_length=6,
                                      tie_embeddings=False, drop_rate=0.1),
        lambda r: r.integers(0, 13, (7, 6)).astype(np.int32)),
}
# the networks of `jaxnet train --model lstm|gru|transformer`: on images (rows as time steps)
# and on text (language models)
IMAGES = {"num_classes": 3, "example_shape": (6, 4, 2)}
TEXT = {"num_classes": 11, "example_shape": (6,), "task": "language_model"}
for _model in ("lstm", "gru", "transformer"):
    _config = {"model": _model, "hidden": (8,), "layers": 2, "heads": 2}
    SEQUENCE_NETS[f"train_{_model}_on_images"] = (
        lambda c=_config: build_model(c, IMAGES), lambda r: _normal(r, 7, 6, 4, 2))
    SEQUENCE_NETS[f"train_{_model}_on_text"] = (
        lambda c=_config: build_model(c, TEXT), lambda r: r.integers(0, 11, (7, 6)).astype(np.int32))


def _setup(name, rng):
    """``(net, x, params, state, to_torch's example arguments)``."""
    if name in SEQUENCE_NETS:
        build, inputs = SEQUENCE_NETS[name]
        net, x = build(), inputs(rng)
        example = {"example": jax.tree.map(lambda a: a[:1], x)}
    else:
        build, shape = NETS[name]
        net = build()
        if name in ID_NETS:
            x = rng.integers(0, ID_NETS[name][2], size=(7, *shape)).astype(np.int32)
        else:
            x = _normal(rng, 7, *shape)
        example = {"example_shape": shape, "example_dtype": x.dtype}
    params, state = net.init_with_state(jax.random.key(1), jax.tree.map(lambda a: a[:1], x))
    # running statistics away from their initial values, so that a mix-up shows
    state = jax.tree.map(lambda v: v + rng.uniform(0.1, 0.5, v.shape).astype(np.float32), state)
    return net, x, params, state, example


def _torch_inputs(torch, x):
    return jax.tree.map(torch.from_numpy, x)


ALL = sorted(NETS) + sorted(SEQUENCE_NETS)


@pytest.mark.parametrize("name", ALL)
def test_the_torch_module_computes_what_the_network_computes_on_jaxnets_inputs(rng, name):
    torch = pytest.importorskip("torch")
    net, x, params, state, example = _setup(name, rng)
    module = jn.to_torch(net, params, model_state=state or None, **example)
    assert not module.training
    want = net.apply_with_state(params, state, x)[0]
    with torch.no_grad():
        got = jax.tree.map(lambda t: t.numpy(), module(_torch_inputs(torch, x)))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5), got, want)


@pytest.mark.parametrize("name", ALL)
def test_weights_round_trip_exactly_through_torch(rng, name):
    pytest.importorskip("torch")
    net, x, params, state, example = _setup(name, rng)
    module = jn.to_torch(net, params, model_state=state or None, **example)
    back = jn.from_torch(module, net, jax.tree.map(lambda a: a[:1], x))
    if net.has_state:
        back, state_back = back
        jax.tree.map(np.testing.assert_array_equal, state_back, state)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert jax.tree.structure(back) == jax.tree.structure(params)


def test_recurrent_and_attention_weights_have_pytorchs_names_and_layouts(rng):
    torch = pytest.importorskip("torch")
    net = jn.serial(jn.Bidirectional(jn.GRU(4)), jn.MultiHeadAttention(2), jn.ConvTranspose1D(3, 2))
    x = _normal(rng, 2, 5, 3)
    params = net.init(jax.random.key(0), x[:1])
    weights = jn.to_torch(net, params, example_shape=(5, 3)).state_dict()
    assert isinstance(jn.to_torch(net, params, example_shape=(5, 3))[0], torch.nn.GRU)
    gru, attention = params["bidirectional_1"], params["attention_1"]
    np.testing.assert_array_equal(weights["bidirectional_1.weight_ih_l0"], gru["forward"]["input"]["w"].T)
    np.testing.assert_array_equal(weights["bidirectional_1.bias_hh_l0_reverse"],
                                  gru["backward"]["hidden"]["b"])
    np.testing.assert_array_equal(weights["attention_1.in_proj_weight"], np.concatenate(
        [attention[n]["w"].T for n in ("query", "key", "value")]))
    np.testing.assert_array_equal(weights["attention_1.out_proj.bias"], attention["out"]["b"])
    # torch.nn.ConvTranspose1d's (in, out, kernel)
    np.testing.assert_array_equal(weights["conv_transpose_1.weight"],
                                  np.moveaxis(params["conv_transpose_1"]["w"], (-2, -1), (0, 1)))


def test_a_cross_attention_of_another_width_keeps_separate_projections(rng):
    pytest.importorskip("torch")
    net, _, params, _, example = _setup("cross_attention", rng)
    weights = jn.to_torch(net, params, **example).state_dict()
    assert {"q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"} <= set(weights)
    assert tuple(weights["k_proj_weight"].shape) == (8, 5)


def test_a_recurrent_module_refuses_masks_torch_cannot_pack(rng):
    torch = pytest.importorskip("torch")
    net = jn.serial(jn.Dense(3), jn.LSTM(4))
    x = _normal(rng, 2, 5, 3)
    module = jn.to_torch(net, net.init(jax.random.key(0), x[:1]), example_shape=(5, 3))
    left_padded = torch.tensor([[False, False, True, True, True], [True] * 5])
    with pytest.raises(ValueError, match=r"lstm_1: PyTorch's packed sequences need right-padded "
                                         r"masks .* a padded step before a real one"):
        module[1]((torch.from_numpy(x), left_padded))


UNCONVERTIBLE = {
    "grouped_query": (lambda: jn.MultiHeadAttention(2, num_kv_heads=1),
                      r"attention: grouped-query attention \(num_kv_heads=1 for num_heads=2\) does "
                      r"not convert: torch.nn.MultiheadAttention has one key/value head per query head"),
    "rotary_in_a_block": (lambda: jn.serial(jn.TransformerBlock(2, rotary=True)),
                          r"transformer_block_1/attention: rotary=True does not convert"),
    "key_features": (lambda: jn.serial(jn.MultiHeadAttention(2, key_features=3)),
                     r"attention_1: key_features=3 gives num_heads \* key_features = 6, but "
                     r"torch.nn.MultiheadAttention splits the query's 8 features"),
    "out_features": (lambda: jn.MultiHeadAttention(2, out_features=4),
                     r"attention: out_features=4 does not convert: .* query's 8 features"),
    "rnn_activation": (lambda: jn.serial(jn.SimpleRNN(4, jn.gelu)),
                       r"simple_rnn_1: SimpleRNNCell activation gelu does not convert: "
                       r"torch.nn.RNN's nonlinearity is tanh or relu"),
    "two_cells": (lambda: jn.Bidirectional(jn.LSTM(4), jn.GRU(4, reverse=True)),
                  r"bidirectional: a backward cell GRUCell\(hidden=4\) unlike the forward cell "
                  r"LSTMCell\(hidden=4\) does not convert"),
}


@pytest.mark.parametrize("name", sorted(UNCONVERTIBLE))
def test_options_pytorch_cannot_express_are_refused_both_ways_naming_the_layer(rng, name):
    pytest.importorskip("torch")
    build, message = UNCONVERTIBLE[name]
    net, x = build(), _normal(rng, 1, 5, 8)
    params = net.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="to_torch: " + message):
        jn.to_torch(net, params, example=x)
    with pytest.raises(ValueError, match="from_torch: " + message):  # before looking at weights
        jn.from_torch({}, net, x)


@dataclasses.dataclass(frozen=True, repr=False)
class _RunsItsChildItself(jn.Layer):
    """A composite that calls its child's forward directly, so no row records the child."""

    inner: jn.Layer
    kind: ClassVar[str] = "wrapper"

    def children(self):
        return (("inner", self.inner),)

    def init_params(self, key, x):
        return {"inner": self.inner.init_params(key, x)[0]}, {}

    def forward(self, params, state, x, *, train, key):
        return self.inner.forward(params["inner"], {}, x, train=train, key=None)[0], state


def test_weights_of_a_layer_jaxnet_does_not_see_are_named(rng):
    net = jn.serial(jn.Dense(3), _RunsItsChildItself(jn.Dense(2)))
    with pytest.raises(ValueError, match=r"from_torch: wrapper_1.inner.b, wrapper_1.inner.w belong to "
                                         r"no layer the network runs through jaxnet's child calls"):
        jn.from_torch({}, net, (1, 4))


def test_to_torch_needs_one_kind_of_example(rng):
    pytest.importorskip("torch")
    net = jn.Dense(2)
    params = net.init(jax.random.key(0), (1, 3))
    for kwargs in ({}, {"example_shape": (3,), "example": np.zeros((1, 3), np.float32)}):
        with pytest.raises(ValueError, match="pass either example_shape .* or example, not both or neither"):
            jn.to_torch(net, params, **kwargs)


def test_the_module_uses_export_pytorch_names_so_its_arrays_load_a_state_dict(rng):
    torch = pytest.importorskip("torch")
    net, x, params, _, example = _setup("cnn", rng)
    module = jn.to_torch(net, jax.tree.map(np.zeros_like, params), **example)
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
    with pytest.raises(ValueError, match=r"to_torch: params do not fit the network: dense_1.w has "
                                         r"shape \(5, 8\), expected \(6, 8\)"):
        jn.to_torch(mlp((8,), 3), params, example_shape=(6,))


def test_a_layer_that_does_not_convert_is_named(rng):
    pytest.importorskip("torch")
    net = jn.serial(jn.Dense(4), jn.GroupNorm(2, use_bias=False))
    with pytest.raises(ValueError, match=r"group_norm_1: no conversion to PyTorch for "
                                         r"GroupNorm\(2, use_bias=False\) \(kind 'group_norm'\)"):
        jn.to_torch(net, net.init(jax.random.key(0), (1, 3)), example_shape=(3,))
    several = jn.serial(jn.Dense(4), jn.residual(jn.Dense(4), jn.relu))
    with pytest.raises(ValueError, match=r"residual_1 \(.*\) is not a serial chain of leaf layers"):
        jn.to_torch(several, several.init(jax.random.key(0), (1, 3)), example_shape=(3,))
    custom = jn.serial(jn.Dense(4), jax.nn.relu6)
    with pytest.raises(ValueError, match="relu6_1: no conversion to PyTorch"):
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
