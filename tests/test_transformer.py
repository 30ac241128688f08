"""TransformerBlock against a NumPy float64 reference; the transformer builder's language model and
classifier end to end (shapes, parameter names, weight tying, causality, padding, training)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jaxnet as jn
from contract import assert_contract, f64, random_params
from jaxnet.models import transformer
from jaxnet.nn.layer import ShapeError
from jaxnet.nn.transformer import FeedForward
from test_attention import attention_reference, padding_mask


def normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


def spec(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def small_params(net, x, rng, scale=0.3):
    """Random params (any input form) scaled so that activations stay O(1)."""
    shapes = jax.eval_shape(lambda k: net.init_params(k, spec(x))[0], jax.random.key(0))
    return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape) * scale, leaf.dtype), shapes)


def run(net, params, x, **kwargs):
    return net.forward(params, {}, x, **{"train": False, "key": None, **kwargs})[0]


# ---- the float64 reference ---------------------------------------------------------------------

def norm_reference(x, p, kind):
    if kind == "rms":
        return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * p["scale"]
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def gelu_reference(x):  # jax.nn.gelu's default, the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def block_reference(params, x, mask=None, *, heads, kv_heads=None, causal=False, rotary=False,
                    norm="layer"):
    p = f64(params)
    x = np.asarray(x, np.float64)
    h = norm_reference(x, p["attention_norm"], norm)
    y = x + attention_reference(params["attention"], h, key_mask=mask, query_mask=mask, heads=heads,
                                kv_heads=kv_heads, causal=causal, rotary=rotary)
    h = norm_reference(y, p["mlp_norm"], norm)
    mlp = p["mlp"]
    y = y + gelu_reference(h @ mlp["in"]["w"] + mlp["in"]["b"]) @ mlp["out"]["w"] + mlp["out"]["b"]
    return y if mask is None else np.where(np.asarray(mask)[..., None], y, x)


def assert_token_readings_agree(net, params, x, y, example):
    """jit, vmap, one example and two batch axes give ``y`` for ``(6, time)`` token ids."""
    @jax.jit
    def variants(p, v):
        return (net.apply(p, v), jax.vmap(net.apply, (None, 0))(p, v), net.apply(p, v[example]),
                net.apply(p, v.reshape((2, 3) + v.shape[1:])))

    jitted, mapped, one, two_axes = variants(params, x)
    for other, expected in ((jitted, y), (mapped, y), (one, y[example]), (two_axes.reshape(y.shape), y)):
        np.testing.assert_allclose(other, expected, rtol=1e-5, atol=1e-5)


# ---- TransformerBlock -------------------------------------------------------------------------

@pytest.mark.parametrize("heads, kv_heads, causal, rotary, norm", [
    (2, None, False, False, "layer"), (4, 2, True, True, "rms"), (1, None, True, False, "rms")])
def test_block_matches_numpy(rng, heads, kv_heads, causal, rotary, norm):
    net = jn.TransformerBlock(heads, causal=causal, num_kv_heads=kv_heads, rotary=rotary, norm=norm,
                              mlp_features=12)
    x = normal(rng, (6, 5, 8))
    params = small_params(net, x[:1], rng)
    assert set(params) == {"attention_norm", "attention", "mlp_norm", "mlp"}
    assert params["mlp"]["in"]["w"].shape == (8, 12) and params["mlp"]["out"]["w"].shape == (12, 8)
    assert set(params["attention_norm"]) == ({"scale"} if norm == "rms" else {"scale", "bias"})
    y = assert_contract(net, params, x)
    expected = block_reference(params, x, heads=heads, kv_heads=kv_heads, causal=causal, rotary=rotary,
                               norm=norm)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_feed_forward_matches_numpy(rng):
    net = FeedForward(5)
    x = normal(rng, (6, 3, 4))
    params = small_params(net, x[:1], rng)
    assert jax.tree.map(jnp.shape, params) == {"in": {"w": (4, 5), "b": (5,)}, "out": {"w": (5, 4), "b": (4,)}}
    y = assert_contract(net, params, x)
    p = f64(params)
    hidden = gelu_reference(np.asarray(x, np.float64) @ p["in"]["w"] + p["in"]["b"])
    np.testing.assert_allclose(y, hidden @ p["out"]["w"] + p["out"]["b"], rtol=1e-5, atol=1e-5)


def test_block_mlp_is_four_times_wider_by_default(key):
    params = jn.TransformerBlock(2).init(key, (1, 3, 8))
    assert params["mlp"]["in"]["w"].shape == (8, 32)


@pytest.mark.parametrize("causal", [False, True])
def test_block_with_a_mask_matches_numpy_and_passes_padding_through(rng, causal):
    net = jn.TransformerBlock(2, causal=causal)
    x, mask = normal(rng, (3, 6, 8)), padding_mask([6, 4, 1], 6)
    params = small_params(net, (x, mask), rng)
    y, out_mask = jax.jit(run, static_argnums=0)(net, params, (x, mask))
    np.testing.assert_array_equal(out_mask, mask)
    np.testing.assert_allclose(y, block_reference(params, x, mask, heads=2, causal=causal),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(y)[~np.asarray(mask)], np.asarray(x)[~np.asarray(mask)])


def test_block_padding_changes_nothing_at_real_positions(rng):
    net = jn.TransformerBlock(2)
    x, mask = normal(rng, (3, 6, 8)), padding_mask([6, 4, 2], 6)
    params = small_params(net, x, rng)
    changed = jnp.where(mask[..., None], x, normal(rng, x.shape) * 50)
    y, y_changed = run(net, params, (x, mask))[0], run(net, params, (changed, mask))[0]
    np.testing.assert_allclose(np.asarray(y)[np.asarray(mask)], np.asarray(y_changed)[np.asarray(mask)],
                               rtol=1e-5, atol=1e-5)


def test_causal_block_ignores_future_tokens_and_examples_are_independent(rng):
    net = jn.TransformerBlock(2, causal=True)
    x = normal(rng, (3, 6, 8))
    params = small_params(net, x, rng)
    future = x.at[:, 3:].set(normal(rng, (3, 3, 8)))
    other = x.at[0].set(normal(rng, (6, 8)))
    y = run(net, params, x)
    np.testing.assert_array_equal(y[:, :3], run(net, params, future)[:, :3])
    np.testing.assert_array_equal(y[1:], run(net, params, other)[1:])


def test_blocks_chain_in_serial_with_the_mask(rng):
    net = jn.serial(jn.TransformerBlock(2, causal=True), jn.TransformerBlock(2, causal=True))
    x, mask = normal(rng, (4, 5, 8)), padding_mask([5, 3, 2, 4], 5)
    params = net.init(jax.random.key(0), (x, mask))
    assert set(params) == {"transformer_block_1", "transformer_block_2"}
    y, out_mask = net.apply(params, (x, mask))
    np.testing.assert_array_equal(out_mask, mask)
    block = jn.TransformerBlock(2, causal=True)
    step = run(block, params["transformer_block_1"], (x, mask))
    expected = run(block, params["transformer_block_2"], step)[0]
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    one, _ = net.apply(params, (x[1], mask[1]))  # one example
    np.testing.assert_allclose(one, y[1], rtol=1e-5, atol=1e-5)


def test_block_dropout_needs_a_key_only_when_it_drops(rng):
    x = normal(rng, (2, 4, 8))
    plain, dropping = jn.TransformerBlock(2), jn.TransformerBlock(2, drop_rate=0.5)
    assert not plain.needs_key and dropping.needs_key
    params = small_params(plain, x, rng)
    assert jax.tree.structure(params) == jax.tree.structure(small_params(dropping, x, rng))
    np.testing.assert_array_equal(plain.apply(params, x, train=True), plain.apply(params, x))
    evaluation = dropping.apply(params, x)
    np.testing.assert_array_equal(evaluation, plain.apply(params, x))
    with pytest.raises(ValueError, match="Dropout in training mode needs a PRNG key"):
        dropping.apply(params, x, train=True)
    a = dropping.apply(params, x, train=True, key=jax.random.key(1))
    b = dropping.apply(params, x, train=True, key=jax.random.key(1))
    c = dropping.apply(params, x, train=True, key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, evaluation) and not np.allclose(a, c)
    # a traced rate of 0 (population training) turns dropout off
    off, _ = dropping.apply_with_state(params, {}, x, train=True, key=jax.random.key(1), drop_rate=0.0)
    np.testing.assert_allclose(off, evaluation, rtol=1e-6, atol=1e-6)


def test_block_gradients_match_finite_differences(rng):
    net = jn.TransformerBlock(2, causal=True, mlp_features=6, norm="rms")
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 3, 4)))
        mask = padding_mask([3, 2], 3)
        params = small_params(net, x, rng, scale=0.5)
        check_grads(lambda p, v: run(net, p, (v, mask))[0], (params, x), order=1, modes=("rev",),
                    eps=1e-3, atol=1e-3, rtol=1e-3)


def test_block_keeps_bfloat16(rng):
    net = jn.TransformerBlock(2, causal=True)
    x = normal(rng, (2, 4, 8))
    params = small_params(net, x, rng)
    y16 = run(net, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), run(net, params, x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("make, message", [
    (lambda: jn.TransformerBlock(2, norm="batch"),
     r"TransformerBlock: norm must be one of \['layer', 'rms'\], got 'batch'"),
    (lambda: jn.TransformerBlock(2, drop_rate=1.0), r"TransformerBlock: drop_rate must be in \[0, 1\), got 1.0"),
    (lambda: jn.TransformerBlock(2, mlp_features=0), "TransformerBlock: mlp_features must be a positive"),
    (lambda: jn.TransformerBlock(4, num_kv_heads=3), "MultiHeadAttention: num_kv_heads must divide num_heads"),
])
def test_bad_block_arguments_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_block_inputs_name_the_failing_sub_layer(key):
    with pytest.raises(ShapeError, match="^attention: num_heads=3 must divide the input's 8 features"):
        jn.TransformerBlock(3).init(key, (1, 4, 8))  # a composite at the top: its children's names
    with pytest.raises(ShapeError, match="^encoder/attention: num_heads=3 must divide"):
        jn.serial(jn.named("encoder", jn.TransformerBlock(3))).init(key, (1, 4, 8))
    with pytest.raises(ShapeError, match=r"transformer_block: expected examples of shape \(time, features\)"):
        jn.TransformerBlock(2).init(key, (1, 8))


# ---- the language model ---------------------------------------------------------------------

def tokens(rng, shape, vocab=11, low=0):
    return jnp.asarray(rng.integers(low, vocab, size=shape), jnp.int32)


def lm(positional="learned", **kwargs):
    return transformer(11, **{"num_blocks": 2, "features": 8, "num_heads": 2, "max_length": 8,
                              "positional": positional, **kwargs})


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "rotary"])
def test_language_model_shapes_and_parameter_names(rng, positional):
    net = lm(positional)
    assert isinstance(net, jn.TransformerLM) and net.causal
    x = tokens(rng, (3, 6))
    params = net.init(jax.random.key(0), x)
    expected = {"embedding", "block_1", "block_2", "norm"}
    expected |= {"positional"} if positional == "learned" else set()
    assert set(params) == expected
    assert params["embedding"]["table"].shape == (11, 8)
    if positional == "learned":
        assert params["positional"]["table"].shape == (8, 8)
    assert net.apply(params, x).shape == (3, 6, 11)
    assert net.output_shape(x).shape == (3, 6, 11)


def test_untied_language_model_has_its_own_output_projection(rng):
    net = lm(tie_embeddings=False)
    x = tokens(rng, (6, 5))
    params = jax.tree.map(lambda a: a * 0.3, random_params(net, x[:1], rng))
    assert params["output"]["w"].shape == (8, 11)
    y = assert_contract(net, params, x)
    assert y.shape == (6, 5, 11)


def test_tied_language_model_runs_batched_jitted_mapped_and_one_example_at_a_time(rng):
    net = lm("rotary")
    x = tokens(rng, (6, 5))
    params = net.init(jax.random.key(0), x)
    y = net.apply(params, x)

    assert_token_readings_agree(net, params, x, y, example=2)


def test_tied_embeddings_are_one_table_used_twice(rng):
    """The tied model's table gradient is the sum of an untied model's embedding and output gradients."""
    tied, untied = lm(), lm(tie_embeddings=False)
    x, labels = tokens(rng, (2, 6)), tokens(rng, (2, 6))
    params = tied.init(jax.random.key(0), x)
    assert "output" not in params
    table = params["embedding"]["table"]
    untied_params = {**params, "output": {"w": table.T * 8 ** -0.5, "b": jnp.zeros(11)}}

    def loss(net, p):
        return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, x), labels).mean()

    np.testing.assert_allclose(tied.apply(params, x), untied.apply(untied_params, x), rtol=1e-5, atol=1e-5)
    g_tied = jax.grad(lambda p: loss(tied, p))(params)["embedding"]["table"]
    g_untied = jax.grad(lambda p: loss(untied, p))(untied_params)
    expected = g_untied["embedding"]["table"] + g_untied["output"]["w"].T * 8 ** -0.5
    np.testing.assert_allclose(g_tied, expected, rtol=1e-4, atol=1e-6)
    # ids absent from the input still get gradient, through the output projection alone
    absent = np.setdiff1d(np.arange(11), np.asarray(x))
    assert absent.size and np.all(np.abs(np.asarray(g_tied)[absent]).sum(axis=1) > 0)


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "rotary"])
def test_language_model_is_causal_end_to_end(rng, positional):
    net = lm(positional)
    x = tokens(rng, (2, 8))
    params = net.init(jax.random.key(0), x)
    changed = x.at[:, 5:].set((x[:, 5:] + 1) % 11)
    y, y_changed = net.apply(params, x), net.apply(params, changed)
    np.testing.assert_allclose(y[:, :5], y_changed[:, :5], rtol=1e-6, atol=1e-6)
    assert not np.allclose(y[:, 5:], y_changed[:, 5:])


def test_language_model_loss_falls_on_a_repeated_pattern():
    net = transformer(8, num_blocks=1, features=32, num_heads=2, max_length=16)
    pattern = jnp.tile(jnp.asarray([3, 1, 4, 1, 5, 7, 2, 6], jnp.int32), 3)
    x = jnp.stack([pattern[i:i + 17] for i in range(4)])  # (4, 17) shifted windows
    inputs, targets = x[:, :-1], x[:, 1:]
    params = net.init(jax.random.key(0), inputs)
    optimiser = optax.adam(1e-2)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, inputs), targets).mean()

    @jax.jit
    def step(p, opt_state):
        value, grads = jax.value_and_grad(loss)(p)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes its int step count with floats
            updates, opt_state = optimiser.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, value

    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimiser.init(params)
    losses = []
    for _ in range(50):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    assert losses[-1] < 0.25 * losses[0], losses[::10]
    assert losses[-1] < 0.5


def test_language_model_dropout_needs_a_key_in_training(rng):
    net = lm(drop_rate=0.2)
    x = tokens(rng, (2, 5))
    params = net.init(jax.random.key(0), x)
    assert net.needs_key and not lm().needs_key
    with pytest.raises(ValueError, match="needs a PRNG key"):
        net.apply(params, x, train=True)
    trained = net.apply(params, x, train=True, key=jax.random.key(3))
    assert trained.shape == (2, 5, 11) and not np.allclose(trained, net.apply(params, x))


def test_language_model_gradients_match_finite_differences(rng):
    net = transformer(5, num_blocks=1, features=4, num_heads=2, max_length=4, positional="rotary")
    x = tokens(rng, (2, 3), vocab=5)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), net.init(jax.random.key(0), x))
        # forward, not apply: apply checks params against init's float32 for integer inputs
        check_grads(lambda p: run(net, p, x), (params,), order=1, modes=("rev",),
                    eps=1e-3, atol=1e-3, rtol=1e-3)


# ---- the classifier ---------------------------------------------------------------------------

def classifier(**kwargs):
    return transformer(11, **{"num_blocks": 2, "features": 8, "num_heads": 2, "max_length": 10,
                              "num_classes": 3, "pad_id": 0, **kwargs})


def test_classifier_shapes_and_parameter_names(rng):
    # without pad_id: summaries record each leaf's input shape, which a (x, mask) pair has not yet
    net = classifier(pad_id=None)
    assert isinstance(net, jn.TransformerClassifier) and not net.causal
    x = tokens(rng, (6, 7), low=1)
    params = jax.tree.map(lambda a: a * 0.3, random_params(net, x[:1], rng))
    assert set(params) == {"embedding", "positional", "block_1", "block_2", "norm", "head"}
    assert params["head"]["w"].shape == (8, 3)
    y = assert_contract(net, params, x)
    assert y.shape == (6, 3)


def test_padded_classifier_runs_batched_jitted_mapped_and_one_example_at_a_time(rng):
    net = classifier()
    x = tokens(rng, (6, 7)).at[:, 5:].set(0)
    params = net.init(jax.random.key(0), x)
    y = net.apply(params, x)
    assert y.shape == (6, 3) and net.output_shape(x).shape == (6, 3)

    assert_token_readings_agree(net, params, x, y, example=4)


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "rotary"])
def test_padding_changes_nothing_for_the_classifier(rng, positional):
    net = classifier(positional=positional)
    real = tokens(rng, (2, 5), low=1)
    params = net.init(jax.random.key(0), real)
    y = net.apply(params, real)
    for pads in (1, 3, 5):
        padded = jnp.concatenate([real, jnp.zeros((2, pads), jnp.int32)], axis=1)
        np.testing.assert_allclose(net.apply(params, padded), y, rtol=1e-5, atol=1e-5)


def test_classifier_is_the_mean_of_real_token_features_through_the_head(rng):
    net = classifier(num_blocks=1)
    x = tokens(rng, (3, 6), low=1).at[1, 4:].set(0).at[2, 1:].set(0)
    params = net.init(jax.random.key(0), x)
    mask = x != 0
    h = jn.Embedding(11, 8).apply(params["embedding"], x)
    h = jn.LearnedPositionalEmbedding(10).apply(params["positional"], h)
    h = run(jn.TransformerBlock(2), params["block_1"], (h, mask))[0]
    h = np.asarray(jn.LayerNorm().apply(params["norm"], h), np.float64)
    m = np.asarray(mask)[..., None]
    pooled = (h * m).sum(axis=1) / m.sum(axis=1)
    expected = pooled @ np.asarray(params["head"]["w"], np.float64) + np.asarray(params["head"]["b"])
    np.testing.assert_allclose(net.apply(params, x), expected, rtol=1e-5, atol=1e-5)


def test_classifier_of_padding_only_gives_the_head_bias(rng):
    net = classifier()
    x = tokens(rng, (2, 4), low=1).at[1].set(0)
    params = jax.tree.map(lambda a: a * 0.3, random_params(net, x, rng))
    y = net.apply(params, x)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y[1], params["head"]["b"], rtol=1e-6)


def test_classifier_examples_are_independent(rng):
    net = classifier()
    x = tokens(rng, (3, 6), low=1)
    params = net.init(jax.random.key(0), x)
    changed = x.at[0].set(tokens(rng, (6,), low=1))
    np.testing.assert_array_equal(net.apply(params, x)[1:], net.apply(params, changed)[1:])


# ---- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(positional="alibi"),
     r"TransformerLM: positional must be one of \['learned', 'sinusoidal', 'rotary'\], got 'alibi'"),
    (dict(pad_id=11), "TransformerLM: pad_id must be a token id in 0 .. vocab_size - 1 = 10, got 11"),
    (dict(features=10, num_heads=4), "TransformerLM: num_heads=4 must divide features=10"),
    (dict(features=6, num_heads=2, positional="rotary"),
     "TransformerLM: rotary needs an even number of features per head"),
    (dict(num_blocks=0), "TransformerLM: num_blocks must be a positive integer, got 0"),
    (dict(drop_rate=-0.1), r"TransformerLM: drop_rate must be in \[0, 1\)"),
    (dict(num_classes=0), "TransformerClassifier: num_classes must be a positive integer, got 0"),
])
def test_bad_builder_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        transformer(11, **{"features": 8, "num_heads": 2, **kwargs})


def test_bad_token_inputs_raise_clear_errors(key):
    net = lm()
    with pytest.raises(TypeError, match=r"expected integer token ids \(batch, time\); got float32"):
        net.init(key, (2, 5))
    with pytest.raises(ShapeError, match="sequences of length 9 are longer than max_length=8"):
        net.init(key, jnp.zeros((2, 9), jnp.int32))
    with pytest.raises(ShapeError, match=r"expected examples of shape \(time,\) \(rank 1\)"):
        net.init(key, jnp.zeros((2, 3, 4), jnp.int32))
