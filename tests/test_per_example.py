import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnet as jn
from jaxnet.losses import mean_squared_error, softmax_cross_entropy
from jaxnet.per_example import (clip_per_example, dp_aggregate, per_example_grads,
                                per_example_losses, per_example_norms,
                                per_example_value_and_grads)

NETWORKS = {
    "dense": (lambda: jn.serial(jn.Flatten(), jn.Dense(7), jn.tanh, jn.Dense(4)), (5, 3)),
    "conv": (lambda: jn.serial(jn.Conv2D(3, 3), jn.relu, jn.MaxPool((2, 2)), jn.Flatten(),
                               jn.Dense(4)), (6, 6, 2)),
}


def problem(name, key, rng, n=9, dtype=np.float64):
    make, example = NETWORKS[name]
    net = make()
    x = rng.normal(size=(n, *example)).astype(dtype)
    y = rng.integers(0, 4, size=n).astype(np.int32)
    return net, net.init(key, x[:1]), x, y


def loop_of_grads(net, params, x, y, loss=softmax_cross_entropy):
    """The reference: jax.grad of each example's loss, one example at a time."""
    def one(p, xi, yi):
        return loss(net.apply(p, xi[None]), yi[None])[0]
    grad = jax.jit(jax.grad(one))  # compiled once, then called on each example
    grads = [grad(params, x[i], y[i]) for i in range(len(x))]
    return jax.tree.map(lambda *g: np.stack(g), *grads)


@pytest.mark.parametrize("name", NETWORKS)
def test_grads_equal_a_loop_of_jax_grad_in_float64(name, key, rng):
    with jax.enable_x64(True):
        net, params, x, y = problem(name, key, rng)
        expected = loop_of_grads(net, params, x, y)
        got = per_example_grads(net, params, x, y)
        jitted = jax.jit(per_example_grads, static_argnums=0)(net, params, x, y)
    assert jax.tree.structure(got) == jax.tree.structure(params)
    for g, j, e, p in zip(jax.tree.leaves(got), jax.tree.leaves(jitted), jax.tree.leaves(expected),
                          jax.tree.leaves(params)):
        assert g.shape == (9,) + p.shape and g.dtype == np.float64
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(j, e, rtol=1e-10, atol=1e-12)


def test_mean_of_per_example_grads_is_the_batch_gradient(key, rng):
    with jax.enable_x64(True):
        net, params, x, y = problem("dense", key, rng)
        batch = jax.grad(lambda p: softmax_cross_entropy(net.apply(p, x), y).mean())(params)
        per_example = per_example_grads(net, params, x, y)
    for g, b in zip(jax.tree.leaves(per_example), jax.tree.leaves(batch)):
        np.testing.assert_allclose(np.asarray(g).mean(0), b, rtol=1e-10, atol=1e-13)


def test_losses_and_values_equal_a_numpy_float64_forward(key, rng):
    with jax.enable_x64(True):
        net, params, x, y = problem("dense", key, rng)
        losses = per_example_losses(net, params, x, y)
        values, _ = per_example_value_and_grads(net, params, x, y)
    p = jax.tree.map(np.asarray, params)
    logits = np.tanh(x.reshape(9, -1) @ p["dense_1"]["w"] + p["dense_1"]["b"]) @ p["dense_2"]["w"] \
        + p["dense_2"]["b"]
    shifted = logits - logits.max(1, keepdims=True)
    expected = np.log(np.exp(shifted).sum(1)) - shifted[np.arange(9), y]
    assert losses.shape == (9,) and losses.dtype == np.float64
    np.testing.assert_allclose(losses, expected, rtol=1e-12)
    np.testing.assert_allclose(values, expected, rtol=1e-12)


def test_other_losses_and_stateful_networks(key, rng):
    net = jn.serial(jn.Dense(6), jn.BatchNorm(), jn.relu, jn.Dense(3))
    x = rng.normal(size=(8, 5)).astype(np.float32)
    targets = rng.normal(size=(8, 3)).astype(np.float32)
    params, state = net.init_with_state(key, x[:1])
    _, state = net.apply_with_state(params, state, x, train=True)

    def one(p, xi, ti):
        out, _ = net.apply_with_state(p, state, xi[None])
        return mean_squared_error(out, ti[None])[0]

    grad = jax.jit(jax.grad(one))
    expected = [grad(params, x[i], targets[i]) for i in range(8)]
    got = per_example_grads(net, params, x, targets, loss=mean_squared_error, model_state=state)
    for i in range(8):
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected[i])):
            np.testing.assert_allclose(g[i], e, rtol=2e-5, atol=1e-6)


def numpy_norms(grads):
    flat = np.concatenate([np.asarray(g, np.float64).reshape(len(g), -1)
                           for g in jax.tree.leaves(grads)], axis=1)
    return np.linalg.norm(flat, axis=1)


def test_clipping_bounds_each_norm_and_keeps_directions(key, rng):
    net, params, x, y = problem("dense", key, rng, n=32, dtype=np.float32)
    grads = per_example_grads(net, params, x, y)
    norms = numpy_norms(grads)
    max_norm = float(np.median(norms))  # half the examples are clipped
    np.testing.assert_allclose(per_example_norms(grads), norms, rtol=1e-5)
    clipped = clip_per_example(grads, max_norm)
    expected_scale = np.minimum(1, max_norm / norms)
    np.testing.assert_allclose(numpy_norms(clipped), norms * expected_scale, rtol=1e-5)
    assert (numpy_norms(clipped) <= max_norm * (1 + 1e-6)).all()
    for c, g in zip(jax.tree.leaves(clipped), jax.tree.leaves(grads)):
        scale = expected_scale.reshape((-1,) + (1,) * (g.ndim - 1))
        np.testing.assert_allclose(c, np.asarray(g, np.float64) * scale, rtol=1e-5, atol=1e-8)


def test_clipping_a_zero_gradient_gives_zero():
    grads = {"w": jnp.zeros((3, 4)).at[1].set(3.0), "b": jnp.zeros((3, 2))}
    clipped = clip_per_example(grads, 1.0)
    np.testing.assert_array_equal(clipped["w"][0], 0)
    np.testing.assert_allclose(clipped["w"][1], 0.5)  # norm 6 -> 1


def test_dp_aggregate_without_noise_is_the_mean_of_clipped_grads(key, rng):
    net, params, x, y = problem("dense", key, rng, n=16, dtype=np.float32)
    grads = per_example_grads(net, params, x, y)
    aggregate = dp_aggregate(grads, max_norm=0.5, noise_multiplier=0.0, key=key)
    for a, c in zip(jax.tree.leaves(aggregate), jax.tree.leaves(clip_per_example(grads, 0.5))):
        np.testing.assert_allclose(a, np.asarray(c).mean(0), rtol=1e-5, atol=1e-7)


def test_dp_aggregate_noise_has_the_promised_scale(key):
    n, max_norm, multiplier = 50, 2.0, 1.5
    grads = {"w": jnp.zeros((n, 300, 200)), "b": jnp.zeros((n, 200))}
    noisy = jax.jit(functools.partial(dp_aggregate, max_norm=max_norm,
                                      noise_multiplier=multiplier))(grads, key=key)
    values = np.concatenate([np.ravel(v) for v in jax.tree.leaves(noisy)])
    expected_std = multiplier * max_norm / n
    assert abs(values.mean()) < 4 * expected_std / np.sqrt(values.size)
    assert values.std() == pytest.approx(expected_std, rel=0.01)
    again = dp_aggregate(grads, max_norm=max_norm, noise_multiplier=multiplier, key=key)
    np.testing.assert_allclose(again["w"], noisy["w"], rtol=1e-6)  # a function of the key
    assert not np.allclose(noisy["w"][0], noisy["w"][1])


def test_mismatched_example_counts(key, rng):
    net, params, x, y = problem("dense", key, rng, dtype=np.float32)
    for fn in (per_example_losses, per_example_grads):
        with pytest.raises(ValueError, match=r"x has 9 examples \(shape \(9, 5, 3\)\) but y has 8 "
                                             r"\(shape \(8,\)\); expected one label per example"):
            fn(net, params, x, y[:8])


def test_single_example_and_wrong_shapes(key, rng):
    net, params, x, y = problem("dense", key, rng, dtype=np.float32)
    with pytest.raises(ValueError, match=r"need a leading example axis; got x of shape \(5, 3\) "
                                         r"and y of shape \(\)"):
        per_example_grads(net, params, x[0], y[0])
    with pytest.raises(ValueError, match=r"reads all of x, shape \(5, 3\), as a single example"):
        per_example_grads(net, params, x[0], y[:5])
    with pytest.raises(ValueError, match=r"dense_1.w has shape \(15, 7\), expected \(12, 7\)"):
        per_example_grads(net, params, x[:, :4], y)


def test_a_mean_loss_is_refused(key, rng):
    net, params, x, y = problem("dense", key, rng, dtype=np.float32)
    mean_loss = lambda out, labels: softmax_cross_entropy(out, labels).mean()  # noqa: E731
    for fn in (per_example_losses, per_example_grads):
        with pytest.raises(ValueError, match=r"loss must return one value per example, shape "
                                             r"\(\d+,\); got shape \(\)"):
            fn(net, params, x, y, loss=mean_loss)


def test_stateful_network_without_state(key, rng):
    net = jn.serial(jn.Dense(4), jn.BatchNorm())
    params, _ = net.init_with_state(key, np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="per_example_grads: this network keeps state"):
        per_example_grads(net, params, np.ones((2, 3), np.float32), np.ones((2, 4), np.float32),
                          loss=mean_squared_error)


def test_bad_clipping_and_noise_arguments(key):
    grads = {"w": jnp.ones((3, 4)), "b": jnp.ones((2, 4))}
    with pytest.raises(ValueError, match=r"leading sizes are \['b'\]: 2, \['w'\]: 3"):
        clip_per_example(grads, 1.0)
    good = {"w": jnp.ones((3, 4))}
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=rf"max_norm must be a finite number > 0, got {bad!r}"):
            clip_per_example(good, bad)
    with pytest.raises(ValueError, match=r"noise_multiplier must be a finite number >= 0, got -0.5"):
        dp_aggregate(good, max_norm=1.0, noise_multiplier=-0.5, key=key)
    with pytest.raises(TypeError, match="expected a PRNG key"):
        dp_aggregate(good, max_norm=1.0, noise_multiplier=1.0, key=3)
    with pytest.raises(ValueError, match="grads has no arrays"):
        per_example_norms({})
