"""MultiHeadAttention against a NumPy float64 reference and torch.nn.MultiheadAttention.

Covers self-attention, the ``(x, mask)`` and ``{"query", "context", "mask"}`` input forms,
grouped-query attention, causal masking, rotary embeddings, fully masked rows (zeros, never
NaN), jit, vmap, gradients and every validation message.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnet as jn
from contract import assert_contract, f64, random_params
from jaxnet.nn.layer import ShapeError

RTOL, ATOL = 2e-5, 2e-5  # float32 layer vs float64 reference


def normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


def spec(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def init(net, x, rng):
    """Random params for any input form (array, pair or dict), via ``init_params``."""
    shapes = jax.eval_shape(lambda k: net.init_params(k, spec(x))[0], jax.random.key(0))
    return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape) * 0.5, leaf.dtype), shapes)


def small_params(net, x, rng):
    """``random_params`` scaled so that outputs are O(1) (the contract compares at 1e-6)."""
    return jax.tree.map(lambda a: a * 0.3, random_params(net, x, rng))


def run(net, params, x):
    return net.forward(params, {}, x, train=False, key=None)[0]


# ---- the float64 reference -------------------------------------------------------------

def rotary_reference(x, base):
    """Rotates ``x`` ``(batch, time, heads, dim)``: pair ``(i, i + dim/2)`` by ``t * base**(-2i/dim)``."""
    out = np.array(x, np.float64)
    dim = x.shape[-1]
    half = dim // 2
    for t in range(x.shape[1]):
        for i in range(half):
            angle = t * base ** (-2.0 * i / dim)
            rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            pair = np.stack([x[:, t, :, i], x[:, t, :, i + half]], -1)  # (batch, heads, 2)
            turned = pair @ rotation.T
            out[:, t, :, i], out[:, t, :, i + half] = turned[..., 0], turned[..., 1]
    return out


def attention_reference(params, query, context=None, key_mask=None, query_mask=None, *, heads,
                        kv_heads=None, causal=False, rotary=False, base=10000.0):
    """Multi-head attention in float64, one head and one example at a time.

    Rows that see no key, and padded query rows, are zeros (the layer's documented output).
    """
    p = f64(params)
    query = np.asarray(query, np.float64)
    context = query if context is None else np.asarray(context, np.float64)
    kv_heads = kv_heads or heads

    def project(name, x):
        return x @ p[name]["w"] + p[name].get("b", 0.0)

    batch, time_q, time_k = query.shape[0], query.shape[1], context.shape[1]
    head = p["query"]["w"].shape[1] // heads
    q = project("query", query).reshape(batch, time_q, heads, head)
    k = project("key", context).reshape(batch, time_k, kv_heads, head)
    v = project("value", context).reshape(batch, time_k, kv_heads, head)
    if rotary:
        q, k = rotary_reference(q, base), rotary_reference(k, base)
    out = np.zeros((batch, time_q, heads, head))
    valid = np.ones((batch, time_q), bool)
    for b in range(batch):
        allowed = np.ones((time_q, time_k), bool)
        if key_mask is not None:
            allowed &= np.asarray(key_mask[b])[None, :]
        if causal:
            allowed &= np.tril(np.ones((time_q, time_k), bool))
        valid[b] &= allowed.any(axis=1)
        for h in range(heads):
            g = h // (heads // kv_heads)
            scores = q[b, :, h] @ k[b, :, g].T / np.sqrt(head)
            scores = np.where(allowed, scores, -np.inf)
            scores = scores - np.max(np.where(allowed, scores, -1e300), axis=1, keepdims=True)
            weights = np.where(allowed, np.exp(scores), 0.0)
            weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)
            out[b, :, h] = weights @ v[b, :, g]
    y = project("out", out.reshape(batch, time_q, heads * head))
    if query_mask is not None:
        valid &= np.asarray(query_mask)
    return np.where(valid[..., None], y, 0.0)


def padding_mask(lengths, time):
    return jnp.asarray(np.arange(time)[None, :] < np.asarray(lengths)[:, None])


# ---- against the reference --------------------------------------------------------------

@pytest.mark.parametrize("heads, kv_heads, causal, use_bias, rotary", [
    (1, None, False, True, False), (4, None, False, True, False), (4, 2, True, False, False),
    (4, 1, False, True, True), (2, None, True, True, True)])
def test_self_attention_matches_numpy(rng, heads, kv_heads, causal, use_bias, rotary):
    net = jn.MultiHeadAttention(heads, num_kv_heads=kv_heads, causal=causal, use_bias=use_bias,
                                rotary=rotary)
    x = normal(rng, (6, 5, 8))
    params = small_params(net, x[:1], rng)
    head = 8 // heads
    assert params["query"]["w"].shape == (8, heads * head)
    assert params["key"]["w"].shape == (8, (kv_heads or heads) * head)
    assert params["out"]["w"].shape == (heads * head, 8)
    assert ("b" in params["value"]) == use_bias
    y = assert_contract(net, params, x)
    expected = attention_reference(params, x, heads=heads, kv_heads=kv_heads, causal=causal,
                                   rotary=rotary)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_key_features_and_out_features_set_the_projection_widths(rng):
    net = jn.MultiHeadAttention(3, key_features=4, num_kv_heads=1, out_features=7)
    x = normal(rng, (6, 5, 10))
    params = small_params(net, x[:1], rng)
    assert jax.tree.map(jnp.shape, params) == {
        "query": {"w": (10, 12), "b": (12,)}, "key": {"w": (10, 4), "b": (4,)},
        "value": {"w": (10, 4), "b": (4,)}, "out": {"w": (12, 7), "b": (7,)}}
    y = assert_contract(net, params, x)
    np.testing.assert_allclose(y, attention_reference(params, x, heads=3, kv_heads=1),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_mask_matches_numpy_and_zeroes_padded_positions(rng, causal):
    net = jn.MultiHeadAttention(2, num_kv_heads=1, causal=causal)
    x = normal(rng, (3, 6, 8))
    mask = padding_mask([6, 3, 1], 6)
    params = init(net, (x, mask), rng)
    y = jax.jit(run, static_argnums=0)(net, params, (x, mask))
    expected = attention_reference(params, x, key_mask=mask, query_mask=mask, heads=2, kv_heads=1,
                                   causal=causal)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(y)[~np.asarray(mask)], 0.0)


def test_dict_without_context_is_the_pair_form(rng):
    net = jn.MultiHeadAttention(2, causal=True)
    x, mask = normal(rng, (3, 6, 8)), padding_mask([6, 3, 2], 6)
    params = init(net, x, rng)
    np.testing.assert_array_equal(run(net, params, {"query": x, "mask": mask}), run(net, params, (x, mask)))
    np.testing.assert_array_equal(run(net, params, {"query": x}), run(net, params, x))


@pytest.mark.parametrize("causal, rotary", [(False, False), (True, False), (False, True)])
def test_cross_attention_matches_numpy(rng, causal, rotary):
    net = jn.MultiHeadAttention(4, num_kv_heads=2, causal=causal, rotary=rotary, out_features=5)
    query, context = normal(rng, (3, 4, 8)), normal(rng, (3, 7, 6))
    mask = padding_mask([7, 2, 0], 7)  # the last example's context is all padding
    inputs = {"query": query, "context": context, "mask": mask}
    params = init(net, inputs, rng)
    assert params["key"]["w"].shape == (6, 4) and params["query"]["w"].shape == (8, 8)
    y = jax.jit(run, static_argnums=0)(net, params, inputs)
    assert y.shape == (3, 4, 5)
    expected = attention_reference(params, query, context, key_mask=mask, heads=4, kv_heads=2,
                                   causal=causal, rotary=rotary)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(y[2], 0.0)  # no key to attend to: zeros, not NaN


def test_a_query_that_sees_no_key_gives_zeros_and_finite_gradients(rng):
    net = jn.MultiHeadAttention(2, causal=True)
    query, context = normal(rng, (2, 3, 4)), normal(rng, (2, 5, 4))
    mask = jnp.asarray([[False, False, True, True, True], [False] * 5])
    inputs = {"query": query, "context": context, "mask": mask}
    params = init(net, inputs, rng)
    y = run(net, params, inputs)
    # causal: query t sees keys 0..t, so queries 0 and 1 of example 0 see none
    np.testing.assert_array_equal(y[0, :2], 0.0)
    assert np.all(np.asarray(y[0, 2]) != 0.0)
    np.testing.assert_array_equal(y[1], 0.0)
    grads = jax.grad(lambda p, q: jnp.sum(run(net, p, {**inputs, "query": q}) ** 2), (0, 1))(params, query)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads))


def test_grouped_query_attention_equals_attention_with_repeated_key_value_heads(rng):
    heads, kv_heads, head = 6, 2, 3
    gqa = jn.MultiHeadAttention(heads, key_features=head, num_kv_heads=kv_heads)
    mha = jn.MultiHeadAttention(heads, key_features=head)
    x = normal(rng, (2, 5, 8))
    p = init(gqa, x, rng)

    def repeat(leaf):  # kv head g serves query heads g*3 .. g*3+2
        blocks = jnp.split(leaf, kv_heads, axis=-1)
        return jnp.concatenate([b for b in blocks for _ in range(heads // kv_heads)], axis=-1)

    full = {**p, "key": jax.tree.map(repeat, p["key"]), "value": jax.tree.map(repeat, p["value"])}
    np.testing.assert_allclose(run(gqa, p, x), run(mha, full, x), rtol=1e-5, atol=1e-5)


# ---- against PyTorch ----------------------------------------------------------------------

@pytest.mark.parametrize("causal, use_bias", [(False, True), (True, True), (False, False)])
def test_self_attention_matches_torch_multihead_attention(rng, causal, use_bias):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(8, 2, bias=use_bias, batch_first=True).double()
    x = rng.normal(size=(3, 6, 8))
    mask = np.asarray(padding_mask([6, 4, 2], 6))
    attn_mask = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1) if causal else None
    with torch.no_grad():
        expected, _ = module(*(torch.tensor(x),) * 3, key_padding_mask=torch.tensor(~mask),
                             attn_mask=attn_mask, need_weights=False)
    net = jn.MultiHeadAttention(2, causal=causal, use_bias=use_bias)
    x32 = jnp.asarray(x, jnp.float32)
    params = jn.from_torch(module, net, x32[:1])  # torch's packed (3E, E) in_proj_weight, split
    y = run(net, params, (x32, jnp.asarray(mask)))
    np.testing.assert_allclose(np.asarray(y)[mask], expected.numpy()[mask], rtol=1e-4, atol=1e-5)


def test_cross_attention_matches_torch_multihead_attention(rng):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    module = torch.nn.MultiheadAttention(8, 4, kdim=5, vdim=5, batch_first=True).double()
    query, context = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 7, 5))
    mask = np.asarray(padding_mask([7, 4], 7))
    with torch.no_grad():
        expected, _ = module(torch.tensor(query), torch.tensor(context), torch.tensor(context),
                             key_padding_mask=torch.tensor(~mask), need_weights=False)
    net = jn.MultiHeadAttention(4)
    inputs = {"query": jnp.asarray(query, jnp.float32), "context": jnp.asarray(context, jnp.float32),
              "mask": jnp.asarray(mask)}
    params = jn.from_torch(module, net, jax.tree.map(lambda a: a[:1], inputs))  # q/k/v_proj_weight
    y = run(net, params, inputs)
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-4, atol=1e-5)


# ---- sequence properties ----------------------------------------------------------------

def test_causal_attention_ignores_future_tokens(rng):
    net = jn.MultiHeadAttention(2, num_kv_heads=1, causal=True, rotary=True)
    x = normal(rng, (2, 7, 8))
    params = init(net, x, rng)
    changed = x.at[:, 4:].set(normal(rng, (2, 3, 8)))
    y, y_changed = run(net, params, x), run(net, params, changed)
    np.testing.assert_array_equal(y[:, :4], y_changed[:, :4])
    assert not np.allclose(y[:, 4:], y_changed[:, 4:])


@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_change_nothing_at_real_positions(rng, causal):
    net = jn.MultiHeadAttention(2, causal=causal)
    x, mask = normal(rng, (3, 6, 8)), padding_mask([6, 4, 1], 6)
    params = init(net, x, rng)
    noise = normal(rng, x.shape) * 100
    changed = jnp.where(mask[..., None], x, noise)
    y, y_changed = run(net, params, (x, mask)), run(net, params, (changed, mask))
    np.testing.assert_allclose(y, y_changed, rtol=1e-6, atol=1e-6)
    # and in the dict form, padded context positions
    query = normal(rng, (3, 2, 8))
    a = run(net, params, {"query": query, "context": x, "mask": mask})
    b = run(net, params, {"query": query, "context": changed, "mask": mask})
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_examples_are_independent(rng):
    net = jn.MultiHeadAttention(2, causal=False)
    x, mask = normal(rng, (3, 5, 8)), padding_mask([5, 3, 2], 5)
    params = init(net, x, rng)
    changed = x.at[0].set(normal(rng, (5, 8)))
    changed_mask = mask.at[0].set(jnp.asarray([True, False, True, False, False]))
    y, y_changed = run(net, params, (x, mask)), run(net, params, (changed, changed_mask))
    np.testing.assert_array_equal(y[1:], y_changed[1:])
    assert not np.allclose(y[0], y_changed[0])


def test_jit_vmap_and_library_apply_agree_on_every_input_form(rng):
    net = jn.MultiHeadAttention(2, num_kv_heads=1, causal=True)
    x, mask, context = normal(rng, (4, 5, 8)), padding_mask([5, 3, 2, 4], 5), normal(rng, (4, 3, 8))
    for inputs in ((x, mask), {"query": x, "context": context, "mask": mask[:, :3]}):
        params = init(net, inputs, rng)
        eager = run(net, params, inputs)
        jitted = jax.jit(run, static_argnums=0)(net, params, inputs)
        # vmap over examples: each call sees a batch of one
        one = jax.vmap(lambda v: run(net, params, jax.tree.map(lambda a: a[None], v))[0])(inputs)
        np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(one, eager, rtol=1e-6, atol=1e-6)
        applied = net.apply(params, inputs)  # the library's entry point, pytree inputs
        np.testing.assert_allclose(applied, eager, rtol=1e-6, atol=1e-6)
        first = net.apply(params, jax.tree.map(lambda a: a[0], inputs))  # one example
        np.testing.assert_allclose(first, eager[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("form", ["array", "pair", "cross"])
def test_gradients_match_finite_differences(rng, form):
    net = jn.MultiHeadAttention(2, num_kv_heads=1, causal=form != "cross", rotary=True)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 4, 4)))
        mask = padding_mask([4, 2], 4)
        context = jnp.asarray(rng.normal(size=(2, 3, 4)))
        build = {"array": lambda v: v, "pair": lambda v: (v, mask),
                 "cross": lambda v: {"query": v, "context": context, "mask": mask[:, :3]}}[form]
        params = init(net, build(x), rng)
        # jax computes the softmax in float32 even for float64 inputs: tolerances of 1e-3
        check_grads(lambda p, v: run(net, p, build(v)), (params, x), order=2, modes=("rev",),
                    eps=1e-3, atol=1e-3, rtol=1e-3)


def _reverse_only(net, params, inputs):
    return net.apply_with_state(params, {}, inputs, reverse_only=True)[0]


@pytest.mark.parametrize("form", ["array", "pair", "cross", "empty"])
@pytest.mark.parametrize("kv_heads", [None, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_reverse_only_attention_equals_the_library_path_values_and_gradients(rng, form, kv_heads,
                                                                            causal):
    # fit's path (the CPU custom VJP of jaxnet._xla.attention_ops) against
    # jax.nn.dot_product_attention: outputs and gradients of params and inputs, with padding
    # masks, a sequence without real tokens ("empty"), grouped-query heads and rotary positions
    net = jn.MultiHeadAttention(4, num_kv_heads=kv_heads, causal=causal, rotary=True)
    x, context = normal(rng, (3, 6, 8)), normal(rng, (3, 5, 8))
    lengths = [6, 3, 0] if form == "empty" else [6, 3, 1]
    mask = padding_mask(lengths, 6)
    build = {"array": lambda v: v, "pair": lambda v: (v, mask), "empty": lambda v: (v, mask),
             "cross": lambda v: {"query": v, "context": context, "mask": mask[:, :5]}}[form]
    params = init(net, build(x), rng)
    weights = normal(rng, (3, 6, 8))
    loss = lambda p, v, fast: jnp.sum(jnp.tanh(
        net.apply_with_state(p, {}, build(v), reverse_only=fast)[0]) * weights)
    np.testing.assert_allclose(_reverse_only(net, params, build(x)), run(net, params, build(x)),
                               rtol=1e-5, atol=1e-6)
    slow, fast = (jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, x, f)
                  for f in (False, True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), slow, fast)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(fast))


def test_reverse_only_attention_gradients_match_finite_differences_in_float64_and_vmap(rng):
    net = jn.MultiHeadAttention(2, num_kv_heads=1, causal=True, rotary=True)
    with jax.enable_x64(True):
        x, mask = jnp.asarray(rng.normal(size=(2, 4, 4))), padding_mask([4, 2], 4)
        params = init(net, (x, mask), rng)
        # the custom VJP computes the softmax in float64: tight tolerances, unlike the library's
        check_grads(lambda p, v: _reverse_only(net, p, (v, mask)), (params, x), order=1,
                    modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)
        one = lambda p, v, m: jnp.sum(jnp.sin(_reverse_only(net, p, (v[None], m[None]))))
        batched = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, mask)
        for k in range(2):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a[k], b, rtol=1e-10, atol=1e-12),
                         batched, jax.grad(one)(params, x[k], mask[k]))


def test_bfloat16_inputs_give_bfloat16_outputs_close_to_float32(rng):
    net = jn.MultiHeadAttention(2, causal=True, rotary=True)
    x, mask = normal(rng, (2, 6, 8)), padding_mask([6, 4], 6)
    params = init(net, x, rng)
    y32 = run(net, params, (x, mask))
    y16 = run(net, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params),
              (x.astype(jnp.bfloat16), mask))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05)


def test_flops_count_projections_and_both_attention_products(rng):
    net = jn.MultiHeadAttention(2, num_kv_heads=1)
    x = normal(rng, (3, 5, 8))
    params = random_params(net, x[:1], rng)
    projections = 2 * 3 * 5 * (8 * 8 + 8 * 4 + 8 * 4 + 8 * 8)
    assert net.flops((3, 5, 8), (3, 5, 8), params) == projections + 4 * 3 * 5 * 5 * 8


# ---- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=0), "num_heads must be a positive integer, got 0"),
    (dict(num_heads=4, num_kv_heads=3),
     "num_kv_heads must divide num_heads, got num_kv_heads=3 for num_heads=4"),
    (dict(num_heads=2, key_features=-1), "key_features must be a positive integer"),
    (dict(num_heads=2, out_features=2.5), "out_features must be a positive integer"),
    (dict(num_heads=2, causal=1), "causal must be True or False, got 1"),
    (dict(num_heads=2, rotary=True, key_features=3), "rotary needs an even key_features, got 3"),
    (dict(num_heads=2, rotary_base=0), "rotary_base must be a positive number"),
    (dict(num_heads=2, implementation="flash"), "implementation must be None, 'xla' or 'cudnn'"),
    (dict(num_heads=2, weight_init="zeros"), "unknown weight_init 'zeros'"),
])
def test_bad_constructor_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match="MultiHeadAttention: " + message.replace("(", r"\(")):
        jn.MultiHeadAttention(**kwargs)


def f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def boolean(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.bool_)


@pytest.mark.parametrize("net, x, error, message", [
    (jn.MultiHeadAttention(3), f32(2, 5, 8), ShapeError,
     r"attention: num_heads=3 must divide the input's 8 features \(or set key_features\)"),
    (jn.MultiHeadAttention(4, rotary=True), f32(2, 5, 4), ShapeError,
     "rotary needs an even number of features per head; got 4 features / 4 heads = 1"),
    (jn.MultiHeadAttention(2), f32(2, 8), ShapeError,
     r"expected examples of shape \(time, features\) \(rank 2\); got examples of shape \(8,\)"),
    (jn.MultiHeadAttention(2), jax.ShapeDtypeStruct((2, 5, 8), jnp.int32), TypeError,
     "expected a floating-point input, got int32"),
    (jn.MultiHeadAttention(2), (f32(2, 5, 8), jax.ShapeDtypeStruct((2, 5), jnp.int32)), TypeError,
     r"mask must be bool \(True at real tokens, False at padding\); got int32"),
    (jn.MultiHeadAttention(2), (f32(2, 5, 8), boolean(2, 4)), ShapeError,
     r"mask of shape \(2, 4\) does not fit the sequence: expected \(batch, time\) = \(2, 5\)"),
    (jn.MultiHeadAttention(2), (f32(2, 5, 8), boolean(2, 5), boolean(2, 5)), TypeError,
     "or the pair \\(x, mask\\); got a tuple of 3 entries"),
    (jn.MultiHeadAttention(2), {"query": f32(2, 5, 8), "keys": f32(2, 5, 8)}, ValueError,
     r"an input dict needs 'query' and may hold 'context' and 'mask'; got entries \['keys', 'query'\]"),
    (jn.MultiHeadAttention(2), {"context": f32(2, 5, 8)}, ValueError, "needs 'query'"),
    (jn.MultiHeadAttention(2), {"query": f32(2, 5, 8), "context": f32(3, 4, 8)}, ShapeError,
     r"query and context batch sizes differ: query \(2, 5, 8\), context \(3, 4, 8\)"),
    (jn.MultiHeadAttention(2), {"query": f32(2, 5, 8), "context": f32(2, 8)}, ShapeError,
     r"context must be \(batch, time_k, features\); got \(2, 8\)"),
    (jn.MultiHeadAttention(2), {"query": f32(2, 5, 8),
                                "context": jax.ShapeDtypeStruct((2, 4, 8), jnp.bfloat16)}, TypeError,
     "context dtype bfloat16 differs from query dtype float32"),
    (jn.MultiHeadAttention(2), {"query": f32(2, 5, 8), "context": f32(2, 4, 8), "mask": boolean(2, 5)},
     ShapeError, r"mask \(of the context\) of shape \(2, 5\) does not fit the sequence"),
])
def test_bad_inputs_raise_clear_errors(net, x, error, message):
    with pytest.raises(error, match=message):
        jn.named("attention", net).init(jax.random.key(0), x)
