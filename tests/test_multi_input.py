"""Networks with several inputs and outputs: select, route, join and parallel(fan_in="tuple").

Outputs against NumPy float64 references, under jit and without, batched, one example at a time,
under vmap, with gradients checked; examples never mix; every error names what was expected.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnet as jn
from contract import f64, random_params

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(rng, n=6):
    return {"image": jnp.asarray(rng.normal(size=(n, 4, 3)), jnp.float32),
            "meta": jnp.asarray(rng.normal(size=(n, 5)), jnp.float32)}


def _two_input_net():
    return jn.serial(jn.route(image=jn.serial(jn.Flatten(), jn.Dense(7), jn.tanh), meta=jn.Dense(3)),
                     jn.join("concat"), jn.Dense(4))


def _reference(p, x):
    """The two-input network in float64 NumPy; dict entries joined in sorted order."""
    p, x = f64(p), f64(x)
    image = np.tanh(x["image"].reshape(len(x["image"]), -1) @ p["route_1"]["image"]["dense_1"]["w"]
                    + p["route_1"]["image"]["dense_1"]["b"])
    meta = x["meta"] @ p["route_1"]["meta"]["w"] + p["route_1"]["meta"]["b"]
    joined = np.concatenate([image, meta], axis=-1)
    return joined @ p["dense_1"]["w"] + p["dense_1"]["b"]


def _take(x, index):
    return jax.tree.map(lambda leaf: leaf[index], x)


def test_a_dict_input_network_matches_numpy_batched_jitted_one_example_and_vmapped():
    rng = np.random.default_rng(0)
    net, x = _two_input_net(), _inputs(rng)
    params = random_params(net, x, rng)
    expected = _reference(params, x)
    np.testing.assert_allclose(net.apply(params, x), expected, **TOL)

    @jax.jit
    def variants(params, x):
        return (net.apply(params, x), jax.vmap(net.apply, (None, 0))(params, x),
                net.apply(params, _take(x, 0)), net.apply(params, _take(x, 5)))

    jitted, mapped, first, last = variants(params, x)
    for got, want in ((jitted, expected), (mapped, expected), (first, expected[0]), (last, expected[5])):
        np.testing.assert_allclose(got, want, **TOL)
    assert net.output_shape(x).shape == (6, 4)
    assert [row.path for row in jn.summarize(net, x).rows] == [
        "route_1/image/flatten_1", "route_1/image/dense_1", "route_1/image/tanh_1",
        "route_1/meta", "join_1", "dense_1"]


def test_gradients_of_a_dict_input_network():
    rng = np.random.default_rng(1)
    net, x = _two_input_net(), _inputs(rng, 3)
    params = random_params(net, x, rng)
    with jax.enable_x64(True):
        x64, p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (x, params))
        check_grads(lambda p, v: net.apply(p, v), (p64, x64), order=2, modes=["rev"])


def test_changing_one_example_leaves_the_others_unchanged():
    rng = np.random.default_rng(2)
    net, x = _two_input_net(), _inputs(rng)
    params = random_params(net, x, rng)
    changed = {"image": x["image"].at[0].add(1.0), "meta": x["meta"].at[0].add(1.0)}
    before, after = net.apply(params, x), net.apply(params, changed)
    assert not np.allclose(before[0], after[0])
    np.testing.assert_array_equal(before[1:], after[1:])


def test_route_over_a_tuple_and_parallel_tuple_outputs():
    rng = np.random.default_rng(3)
    query, context = (jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                      jnp.asarray(rng.normal(size=(6, 2)), jnp.float32))
    net = jn.serial(jn.route(jn.Dense(3), jn.Dense(3)), jn.join("sum"),
                    jn.parallel(jn.Dense(2), jn.Dense(1), fan_in="tuple"))
    params = random_params(net, (query, context), rng)
    p = f64(params)
    hidden = (f64(query) @ p["route_1"]["dense_1"]["w"] + p["route_1"]["dense_1"]["b"]
              + f64(context) @ p["route_1"]["dense_2"]["w"] + p["route_1"]["dense_2"]["b"])
    heads = p["parallel_1"]
    first, second = jax.jit(net.apply)(params, (query, context))
    np.testing.assert_allclose(first, hidden @ heads["dense_1"]["w"] + heads["dense_1"]["b"], **TOL)
    np.testing.assert_allclose(second, hidden @ heads["dense_2"]["w"] + heads["dense_2"]["b"], **TOL)


def test_select_picks_entries_and_parts():
    tokens, mask = jnp.arange(6).reshape(2, 3), jnp.ones((2, 3), bool)
    empty = {}
    assert jn.select("tokens").apply(empty, {"tokens": tokens, "mask": mask}) is tokens
    swapped = jn.select(1, 0).apply(empty, (tokens, mask))
    assert swapped[0] is mask and swapped[1] is tokens
    net = jn.serial(jn.select("tokens"), jn.Embedding(6, 4))
    params = net.init(jax.random.key(0), {"tokens": tokens, "mask": mask})
    np.testing.assert_array_equal(net.apply(params, {"tokens": tokens, "mask": mask}),
                                  params["embedding_1"]["table"][tokens])


@pytest.mark.parametrize("net, x, message", [
    (jn.serial(jn.select("tokens"), jn.Dense(2)), {"ids": jnp.ones((2, 3))},
     "select_1: select needs input entries ['tokens']; the input dict has ['ids']"),
    (jn.select(2), (jnp.ones((2, 3)), jnp.ones((2, 3))),
     "select: select needs input parts [2]; the input is a tuple of 2"),
    (jn.route(jn.Dense(2), jn.Dense(2)), (jnp.ones((2, 3)),),
     "route: route with 2 branches needs a tuple of 2 inputs; got 1"),
    (jn.route(a=jn.Dense(2), b=jn.Dense(2)), {"a": jnp.ones((2, 3)), "c": jnp.ones((2, 3))},
     "route: route with 2 branches needs input entries ['a', 'b']; the input dict has ['a', 'c']"),
    (jn.route(jn.Dense(2)), jnp.ones((2, 3)),
     "route: route with 1 branches needs a tuple or dict input; got one array of shape (3,)"),
    (jn.join("concat"), (jnp.ones((2, 3)), jnp.ones((3, 3))),
     "join: fan_in='concat' joins the last axis and needs the other axes equal; got part 0 (3,), part 1 (3,)"),
    (jn.join("sum"), {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 4))},
     "join: fan_in='sum' needs outputs of one shape; got a (3,), b (4,)"),
    (jn.join(), jnp.ones((2, 3)), "join: join needs a tuple or dict of arrays; got one array of shape (3,)"),
])
def test_errors_name_what_was_expected_and_found(net, x, message):
    with pytest.raises(jn.ShapeError) as error:
        net.init(jax.random.key(0), x)
    assert message in str(error.value)


def test_constructor_errors():
    with pytest.raises(ValueError, match="route: give branches by position"):
        jn.route(jn.Dense(2), b=jn.Dense(2))
    with pytest.raises(ValueError, match="route: needs at least one branch"):
        jn.route()
    with pytest.raises(ValueError, match="select: name at least one input part"):
        jn.select()
    with pytest.raises(ValueError, match="join: fan_in must be 'concat' or 'sum', got 'tuple'"):
        jn.join("tuple")
    with pytest.raises(ValueError, match="parallel: fan_in must be one of concat, sum, tuple; got 'max'"):
        jn.parallel(jn.Dense(2), fan_in="max")
