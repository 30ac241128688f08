"""The "bf16" policy's products: bfloat16 operands, float32 accumulation, forward and backward.

A product of two bfloat16 values is exact in float32, so a product on rounded operands differs
from a float64 reference computed on the same rounded operands only by its float32 accumulation
(a tight tolerance); from the float32 product it differs by the operands' rounding (2^-9
relative each), a bfloat16 tolerance. The reverse-only custom VJPs also round the output
gradient before each gradient product, so their references round it too.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.test_util import check_grads

import jaxnet as jn
from jaxnet import train
from jaxnet._xla import conv_ops, dense_ops, mixed
from jaxnet.losses import token_cross_entropy
from jaxnet.nn.calls import matmul_operands
from jaxnet.precision import apply_with_policy, get_policy

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
TIGHT = 1e-5  # float32 accumulation against float64, relative to the output's scale
LOOSE = 3e-2  # bfloat16 operands against float32 operands, relative to the output's scale


def normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


def rounded(a) -> np.ndarray:
    """``a`` rounded to bfloat16 (to nearest even, as XLA does), as float64 NumPy values."""
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)


def error(got, want, scale=None) -> float:
    """The largest absolute difference, relative to ``scale`` (default: the largest ``|want|``)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / (np.abs(want).max() if scale is None else scale))


def tree_errors(got, want) -> list[float]:
    """:func:`error` of each leaf, relative to its largest ``|want|`` but at least 1% of the
    largest in the tree (a gradient that is zero in exact arithmetic, such as the key bias's
    in attention, holds only rounding noise)."""
    floor = 1e-2 * max(float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(want))
    return [error(a, b, max(float(np.abs(np.asarray(b)).max()), floor))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]


# ---- dense_ops: the reverse-only custom VJP and the differentiable product -------------------

@pytest.mark.parametrize("shape, features", [((32, 64), 32), ((16, 200), 130), ((2, 5, 6), 3)])
def test_matmul_and_its_gradients_match_float64_on_rounded_operands(rng, shape, features):
    """Narrow (< NARROW outputs: the transposed weight gradient), wide, and batch axes."""
    x, w = normal(rng, shape), normal(rng, (shape[-1], features))
    g = normal(rng, shape[:-1] + (features,))
    y, pullback = jax.vjp(lambda x, w: dense_ops.matmul(x, w, BF16), x, w)
    dx, dw = jax.jit(pullback)(g)
    assert (y.dtype, dx.dtype, dw.dtype) == (F32, F32, F32)
    assert error(y, rounded(x) @ rounded(w)) < TIGHT
    assert error(dx, rounded(g) @ rounded(w).T) < TIGHT
    rows, cols = rounded(x).reshape(-1, shape[-1]), rounded(g).reshape(-1, features)
    assert error(dw, rows.T @ cols) < TIGHT
    # and it really rounded: the float32 product is a bfloat16 tolerance away
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert 1e-4 < error(y, exact) < LOOSE


def test_the_differentiable_product_has_float32_derivatives_of_the_rounded_values(rng):
    x, w = normal(rng, (8, 24)), normal(rng, (24, 5))
    tx, tw, g = normal(rng, (8, 24)), normal(rng, (24, 5)), normal(rng, (8, 5))
    product = lambda x, w: dense_ops.product(x, w, BF16)
    y, tangent = jax.jvp(product, (x, w), (tx, tw))
    assert error(y, rounded(x) @ rounded(w)) < TIGHT
    f64 = lambda a: np.asarray(a, np.float64)
    assert error(tangent, f64(tx) @ rounded(w) + rounded(x) @ f64(tw)) < TIGHT
    dx, dw = jax.vjp(product, x, w)[1](g)
    assert error(dx, f64(g) @ rounded(w).T) < TIGHT
    assert error(dw, rounded(x).T @ f64(g)) < TIGHT
    np.testing.assert_array_equal(dense_ops.product(x, w), x @ w)  # no dtype: the plain product


def test_rounded_products_check_grads_and_vmap(rng):
    """Finite differences see the rounding as a staircase; with a step much wider than
    bfloat16's spacing they agree with the straight-through derivative to a few percent."""
    x, w = normal(rng, (6, 16)), normal(rng, (16, 4))
    tolerance = dict(atol=5e-2, rtol=5e-2, eps=0.5)
    check_grads(lambda x, w: dense_ops.product(x, w, BF16), (x, w), order=1,
                modes=("fwd", "rev"), **tolerance)
    check_grads(lambda x, w: dense_ops.matmul(x, w, BF16), (x, w), order=1, modes=("rev",),
                **tolerance)
    # per-example weight gradients: the custom VJP under vmap
    per_example = jax.vmap(jax.grad(lambda w, v: jnp.sum(dense_ops.matmul(v, w, BF16) ** 2)),
                           (None, 0))(w, x)
    expected = [2 * np.outer(rounded(v), rounded(rounded(v) @ rounded(w))) for v in x]
    assert error(per_example, expected) < 1e-2  # y rounds to bfloat16 on its way to 2y


# ---- conv_ops: the custom VJP with bfloat16 operands, and with an input dilation -----------

CONV_CASES = [  # spatial, kernel, strides, dilation, pads, lhs_dilation
    ((7, 6), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), None),
    ((9, 8), (3, 2), (2, 1), (1, 2), ((0, 1), (1, 0)), None),
    ((11,), (4,), (3,), (1,), ((2, 1),), None),
    ((4, 5), (3, 3), (1, 1), (1, 1), ((2, 2), (1, 2)), (2, 2)),   # ConvTranspose, strides 2
    ((5,), (4,), (1,), (1,), ((3, 2),), (3,)),                    # ConvTranspose1D, cropped
    ((4, 4), (2, 3), (1, 1), (1, 1), ((-1, 0), (2, -1)), (2, 3)),  # negative pads crop
]


def _lax_conv(x, w, strides, pads, dilation, lhs_dilation):
    return lax.conv_general_dilated(x, w, strides, pads, lhs_dilation=lhs_dilation,
                                    rhs_dilation=dilation,
                                    dimension_numbers=conv_ops.dimension_numbers(w.ndim - 2))


@pytest.mark.parametrize("spatial, kernel, strides, dilation, pads, lhs_dilation", CONV_CASES)
def test_canonical_conv_with_input_dilation_equals_lax(rng, spatial, kernel, strides, dilation,
                                                       pads, lhs_dilation):
    """Unrounded (float32), the custom VJP's gradients equal ``lax``'s autodiff, also with the
    input dilation ``ConvTranspose`` uses."""
    x, w = normal(rng, (3, *spatial, 4)), normal(rng, (*kernel, 4, 5))
    fast = lambda x, w: conv_ops.conv(x, w, strides, pads, dilation, None, lhs_dilation)
    plain = lambda x, w: _lax_conv(x, w, strides, pads, dilation, lhs_dilation)
    y, pullback = jax.vjp(fast, x, w)
    y_ref, pullback_ref = jax.vjp(plain, x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    g = normal(rng, y.shape)
    for got, want in zip(pullback(g), pullback_ref(g)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spatial, kernel, strides, dilation, pads, lhs_dilation", CONV_CASES)
def test_conv_and_its_gradients_match_float64_on_rounded_operands(rng, spatial, kernel, strides,
                                                                  dilation, pads, lhs_dilation):
    x, w = normal(rng, (3, *spatial, 4)), normal(rng, (*kernel, 4, 5))
    y, pullback = jax.vjp(
        lambda x, w: conv_ops.conv(x, w, strides, pads, dilation, BF16, lhs_dilation), x, w)
    g = normal(rng, y.shape)
    dx, dw = jax.jit(pullback)(g)
    assert (y.dtype, dx.dtype, dw.dtype) == (F32, F32, F32)
    with jax.enable_x64(True):  # float64 autodiff of lax's convolution on the rounded values
        y_ref, pullback_ref = jax.vjp(
            lambda x, w: _lax_conv(x, w, strides, pads, dilation, lhs_dilation),
            jnp.asarray(rounded(x)), jnp.asarray(rounded(w)))
        dx_ref, dw_ref = pullback_ref(jnp.asarray(rounded(g)))
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert error(got, want) < TIGHT


def test_the_differentiable_conv_rounds_forward_and_has_float32_derivatives(rng):
    x, w = normal(rng, (2, 6, 6, 4)), normal(rng, (3, 3, 2, 6))  # two groups
    conv = lambda x, w: conv_ops.product(x, w, (1, 1), "SAME", (1, 1), BF16,
                                         feature_group_count=2)
    plain = lambda x, w: conv_ops.product(x, w, (1, 1), "SAME", (1, 1), feature_group_count=2)
    y = conv(x, w)
    assert error(y, plain(jnp.asarray(rounded(x), F32), jnp.asarray(rounded(w), F32))) < TIGHT
    g = normal(rng, y.shape)
    for got, want in zip(jax.vjp(conv, x, w)[1](g), jax.vjp(plain, jnp.asarray(rounded(x), F32),
                                                             jnp.asarray(rounded(w), F32))[1](g)):
        assert error(got, want) < TIGHT
    check_grads(conv, (x, w), order=1, modes=("fwd", "rev"), atol=5e-2, rtol=5e-2, eps=0.5)


# ---- every layer kind under the policy ----------------------------------------------------

def tokens(rng, shape, vocab=11):
    return jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)


LAYERS = {  # name: (network, input)
    "dense": (lambda: jn.Dense(12), lambda rng: normal(rng, (6, 20))),
    "conv1d": (lambda: jn.Conv1D(5, 3, strides=2), lambda rng: normal(rng, (4, 9, 3))),
    "conv2d": (lambda: jn.Conv2D(6, 3), lambda rng: normal(rng, (4, 7, 7, 3))),
    "conv2d_grouped": (lambda: jn.Conv2D(6, 3, feature_group_count=3),
                       lambda rng: normal(rng, (4, 6, 6, 3))),
    "conv_transpose2d": (lambda: jn.ConvTranspose2D(4, 3, strides=2),
                         lambda rng: normal(rng, (3, 4, 4, 5))),
    "conv_transpose1d": (lambda: jn.ConvTranspose1D(4, 4, strides=3, padding="VALID"),
                         lambda rng: normal(rng, (3, 5, 2))),
    "attention": (lambda: jn.MultiHeadAttention(2, causal=True), lambda rng: normal(rng, (3, 5, 8))),
    "lstm": (lambda: jn.LSTM(6), lambda rng: normal(rng, (3, 5, 4))),
    "gru": (lambda: jn.GRU(6, return_sequences=False), lambda rng: normal(rng, (3, 5, 4))),
    "simple_rnn": (lambda: jn.SimpleRNN(6, reverse=True), lambda rng: normal(rng, (3, 5, 4))),
    "transformer_lm_tied": (lambda: jn.TransformerLM(vocab_size=11, num_blocks=1, features=8,
                                                     num_heads=2, max_length=6),
                            lambda rng: tokens(rng, (3, 6))),
}


def layer_case(name, rng):
    net, make_x = LAYERS[name]
    net, x = net(), make_x(rng)
    params = net.init(jax.random.key(0), x[:1])
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.5, p.dtype), params)
    return net, params, x


def outputs_and_gradients(net, policy, params, x, g):
    """``(y, d_params[, d_x])`` of a reverse-only call, as ``train_batch`` makes it."""
    def apply(params, x):
        return apply_with_policy(net, policy, params, {}, x, reverse_only=True)[0]

    if jnp.issubdtype(x.dtype, jnp.floating):
        y, pullback = jax.vjp(apply, params, x)
    else:
        y, pullback = jax.vjp(lambda p: apply(p, x), params)
    return y, pullback(g)


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow)
                                  if name.startswith("transformer") else name
                                  for name in sorted(LAYERS)])
def test_each_layer_matches_float64_on_rounded_operands_and_float32_within_bf16(rng, monkeypatch,
                                                                                name):
    """The float64 twin runs the same layer with float64 params, activations and accumulation,
    every product on bfloat16-rounded operands; the float32 run rounds nothing. (A network on
    integer ids takes float32 params from them, so its twin keeps float32 params and
    activations and differs in its accumulation only.)"""
    net, params, x = layer_case(name, rng)
    policy = get_policy("bf16")
    g = normal(rng, net.output_shape(x).shape)
    y, grads = jax.jit(lambda p, v: outputs_and_gradients(net, policy, p, v, g))(params, x)
    assert y.dtype == F32 and {a.dtype for a in jax.tree.leaves(grads)} == {F32}

    y32, grads32 = jax.jit(lambda p, v: outputs_and_gradients(net, None, p, v, g))(params, x)
    assert 1e-4 < error(y, y32) < LOOSE  # rounded, by a bfloat16 tolerance
    assert max(tree_errors(grads, grads32)) < 2 * LOOSE

    monkeypatch.setattr(mixed, "ACCUMULATION", jnp.float64)
    with jax.enable_x64(True), matmul_operands(jnp.bfloat16):
        wide = lambda tree: jax.tree.map(
            lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        g64 = wide(g) if floating else g
        y64, grads64 = jax.jit(lambda p, v: outputs_and_gradients(net, None, p, v, g64))(
            wide(params) if floating else params, wide(x))
        y64, grads64 = np.asarray(y64), jax.tree.map(np.asarray, grads64)
    assert error(y, y64) < 1e-3
    assert max(tree_errors(grads, grads64)) < 1e-3


# ---- the compiled programs: bfloat16 operands, float32 results -----------------------------

PRODUCT = re.compile(r"stablehlo\.(dot_general|convolution)\b.*:\s*\((.*)\)\s*->\s*(.*)$")


def products(text: str) -> list[tuple[str, list[str], str]]:
    """``(op, operand element types, result element type)`` of every product in StableHLO."""
    found = []
    for line in text.splitlines():
        match = PRODUCT.search(line)
        if match:
            element = lambda t: re.findall(r"tensor<(?:\d+x)*(\w+)>", t)
            found.append((match.group(1), element(match.group(2)), element(match.group(3))[0]))
    return found


def mlp():
    return jn.serial(jn.Flatten(), jn.Dense(32), jn.relu, jn.Dropout(0.1), jn.Dense(5))


def test_a_bf16_dense_train_step_runs_bf16_products_with_f32_results(key, rng):
    net = mlp()
    x, y = normal(rng, (16, 4, 5)), jnp.asarray(rng.integers(0, 5, 16), jnp.int32)
    state = train.init_train_state(net, optax.adam(1e-3), net.init(key, x[:1]))
    step = train.make_train_step(net, optax.adam(1e-3), precision="bf16")
    found = products(step.lower(state, x, y).as_text())
    # 2 forward, 2 weight gradients, 1 input gradient (of dense_2)
    assert [op for op, _, _ in found] == ["dot_general"] * 5, found
    assert all(operands == ["bf16", "bf16"] and result == "f32" for _, operands, result in found), found
    full = products(train.make_train_step(net, optax.adam(1e-3), precision="bf16-full")
                    .lower(state, x, y).as_text())
    assert {result for _, _, result in full} == {"bf16"}  # the old, all-bfloat16 forward pass


def compiled_dot_operands(text: str) -> list[tuple[str, str]]:
    """The element types of each ``dot`` instruction's two operands in compiled HLO text."""
    types, found = {}, []
    for line in text.splitlines():
        definition = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = (\w+)\[", line)
        if definition:
            types[definition.group(1)] = definition.group(2)
        call = re.search(r" dot\(%?([\w.-]+), %?([\w.-]+)\)", line)
        if call:
            found.append((types.get(call.group(1)), types.get(call.group(2))))
    return found


def test_xla_keeps_the_dots_in_bf16_when_it_compiles_the_step(key, rng):
    """XLA could legally upcast a bfloat16 dot to float32 (float normalisation); on CPU it
    keeps them, which is what the CPU's bfloat16 matrix units need."""
    net = mlp()
    x, y = normal(rng, (16, 4, 5)), jnp.asarray(rng.integers(0, 5, 16), jnp.int32)
    state = train.init_train_state(net, optax.adam(1e-3), net.init(key, x[:1]))
    text = train.make_train_step(net, optax.adam(1e-3), precision="bf16").lower(
        state, x, y).compile().as_text()
    dots = compiled_dot_operands(text)
    assert len(dots) == 5 and set(dots) == {("bf16", "bf16")}, dots


@pytest.mark.parametrize("name, float32_products", [
    ("conv2d", 0), ("conv_transpose2d", 0), ("lstm", 0), ("gru", 0),
    ("attention", 2 + 4),             # scores and values, forward and their 4 gradients
    ("transformer_lm_tied", 2 + 4)])  # its block's attention
def test_every_product_of_a_layer_takes_bf16_operands_forward_and_backward(rng, name,
                                                                           float32_products):
    """Every product but the attention's own (scores and values, kept in float32) has
    bfloat16 operands and a float32 result, in the forward and the backward pass."""
    net, params, x = layer_case(name, rng)
    g = jnp.ones(net.output_shape(x).shape, jnp.float32)
    text = jax.jit(lambda p, v: outputs_and_gradients(net, get_policy("bf16"), p, v, g)).lower(
        params, x).as_text()
    found = products(text)
    rounded_ = [p for p in found if p[1:] == (["bf16", "bf16"], "f32")]
    plain = [p for p in found if p[1:] == (["f32", "f32"], "f32")]
    assert len(plain) == float32_products and len(rounded_) + len(plain) == len(found), found
    assert len(rounded_) >= 3, found  # at least one product's forward and two gradients


# ---- training keeps float32 everywhere but the products' operands -------------------------

def test_fit_and_the_train_step_keep_params_optimizer_state_and_loss_in_float32(key, rng):
    net = jn.serial(jn.Conv2D(4, 3), jn.relu, jn.MaxPool((2, 2)), jn.Flatten(), jn.Dense(16),
                    jn.BatchNorm(), jn.relu, jn.Dense(3))
    x = normal(rng, (32, 6, 6, 2))
    y = jnp.asarray(rng.integers(0, 3, 32), jnp.int32)
    params, model_state = net.init_with_state(key, x[:1])
    state = train.init_train_state(net, optax.adam(1e-2), params, model_state=model_state)
    step = train.make_train_step(net, optax.adam(1e-2), precision="bf16")
    new, metrics = step(state, x, y)
    floating = lambda tree: {a.dtype for a in jax.tree.leaves(tree)
                             if jnp.issubdtype(a.dtype, jnp.floating)}
    assert floating((new.params, new.opt_state, new.model_state)) == {F32}
    assert metrics["loss"].dtype == F32
    trained, history = train.fit(net, params, optax.adam(1e-2), (x, y), epochs=4, batch_size=8,
                                 model_state=model_state, precision="bf16", progress=False)
    assert floating((trained.params, trained.opt_state, trained.model_state)) == {F32}
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_integer_id_networks_train_under_bf16(key, rng):
    """Unlike "bf16-full", the "bf16" policy computes in float32, so Embedding's ids work."""
    net = jn.TransformerLM(vocab_size=11, num_blocks=1, features=8, num_heads=2, max_length=6)
    ids = tokens(rng, (8, 6))
    params = net.init(key, ids[:1])
    logits = jn.predict(net, params, ids, precision="bf16")
    assert logits.dtype == np.float32
    assert error(logits, jn.predict(net, params, ids)) < LOOSE
    trained, history = train.fit(net, params, optax.adam(1e-2), (ids, ids), epochs=3,
                                 batch_size=4, loss=token_cross_entropy, precision="bf16",
                                 progress=False)
    assert np.isfinite(history[-1]["train_loss"])
    assert {a.dtype for a in jax.tree.leaves(trained.params)} == {F32}


def unfused_bf16_dots(text: str) -> list[str]:
    """The ``dot`` instructions of compiled HLO text on bfloat16 operands outside any fused
    computation: XLA:CPU runs those on its ``DotThunk``, which has no bfloat16 x bfloat16 ->
    float32 kernel."""
    types, found, fused = {}, [], False
    for line in text.splitlines():
        if re.match(r"^(ENTRY )?%?[\w.-]+ .*\{$", line):
            fused = line.startswith(("%fused", "fused"))
        definition = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = (\w+)\[", line)
        if definition:
            types[definition.group(1)] = definition.group(2)
        call = re.search(r" dot\(%?([\w.-]+), %?([\w.-]+)\)", line)
        if call and not fused and "bf16" in (types.get(call.group(1)), types.get(call.group(2))):
            found.append(line.strip()[:160])
    return found


def test_a_tied_language_model_trains_in_bf16_on_xla_cpu(key):
    """The tied output projection's table gradient once compiled to a folded-transpose dot that
    XLA:CPU cannot run in bfloat16 (``Unsupported element type for DotThunk::Execute: BF16 x
    BF16 = F32`` at W6's sizes)."""
    net = jn.TransformerLM(vocab_size=256, num_blocks=1, features=256, num_heads=4,
                           max_length=128)
    x = jax.random.randint(key, (32, 128), 0, 256)
    state = train.init_train_state(net, optax.adam(1e-3), net.init(key, x[:1]))
    step = train.make_train_step(net, optax.adam(1e-3), token_cross_entropy, precision="bf16")
    assert unfused_bf16_dots(step.lower(state, x, x).compile().as_text()) == []
    state, metrics = step(state, x, x)
    assert np.isfinite(float(metrics["loss"]))
