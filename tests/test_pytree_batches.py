"""Batches as pytrees: inputs (and targets) that are dicts or tuples of arrays, in fit (resident
and streaming), evaluate and the train step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet.losses import softmax_cross_entropy
from jaxnet.train.chunks import is_streaming
from jaxnet.train.streaming import fit_streaming
from support import blobs


@dataclasses.dataclass(frozen=True, repr=False)
class MaskedBag(jn.Layer):
    """``{"tokens": (batch, time) int32, "mask": (batch, time) bool}`` -> ``(batch, features)``:
    the mean of the embeddings of the real (masked-in) tokens."""

    kind = "masked_bag"
    vocab: int
    features: int

    def init_params(self, key, x):
        return {"embedding": jax.random.normal(key, (self.vocab, self.features))}, {}

    def forward(self, params, state, x, *, train, key):
        mask = x["mask"].astype(jnp.float32)[..., None]
        summed = jnp.sum(jnp.take(params["embedding"], x["tokens"], axis=0) * mask, axis=1)
        return summed / jnp.maximum(jnp.sum(mask, axis=1), 1.0), state


@dataclasses.dataclass(frozen=True, repr=False)
class Concat(jn.Layer):
    """A ``(a, b)`` tuple input joined on the last axis."""

    kind = "concat"
    pointwise = True

    def init_params(self, key, x):
        return {}, {}

    def forward(self, params, state, x, *, train, key):
        return jnp.concatenate(x, axis=-1), state


def token_problem(rng, n=96, time=6, vocab=8):
    """Label 1 when token 3 is among the real tokens; the padding holds 3s too, so the mask
    must be read."""
    tokens = rng.integers(0, vocab, size=(n, time)).astype(np.int32)
    lengths = rng.integers(1, time + 1, size=n)
    mask = np.arange(time) < lengths[:, None]
    labels = np.any((tokens == 3) & mask, axis=1).astype(np.int32)
    return {"tokens": tokens, "mask": mask}, labels


def bag_net():
    return jn.serial(MaskedBag(8, 16), jn.Dense(16), jn.relu, jn.Dense(2))


def test_a_two_input_network_trains_and_evaluates_on_dict_batches(key, rng):
    x, y = token_problem(rng)
    net = bag_net()
    params = net.init(key, jax.tree.map(lambda a: a[:1], x))
    state, history = jn.fit(net, params, optax.adam(3e-2), (x, y), epochs=25, batch_size=20,
                            eval_data=(x, y), validation_split=0.25, progress=False)
    assert history[-1]["train_accuracy"] > 0.9 and history[-1]["val_accuracy"] > 0.75
    result = jn.evaluate(net, state.params, (x, y), batch_size=40)
    logits = net.apply(state.params, x, batch_ndim=1)
    assert result["accuracy"] == pytest.approx(np.mean(np.argmax(logits, -1) == y))
    assert result["loss"] == pytest.approx(float(softmax_cross_entropy(logits, y).mean()), rel=1e-5)
    step = jn.make_train_step(net, optax.adam(1e-2))
    batch = jax.tree.map(lambda a: a[:8], x)
    _, metrics = step(jn.init_train_state(net, optax.adam(1e-2), params), batch, y[:8])
    assert np.isfinite(float(metrics["loss"]))


def test_every_leaf_is_shuffled_gathered_and_padded_alike(key, rng):
    """A tuple input ``(x[:, :2], x[:, 2:])`` trains exactly like ``x`` itself, 10 examples in
    batches of 4 (the last one padded)."""
    x, y = blobs(rng, n=10)
    parts = (x[:, :2], x[:, 2:])
    plain = jn.serial(jn.Dense(8), jn.relu, jn.Dense(3))
    split = jn.serial(Concat(), jn.Dense(8), jn.relu, jn.Dense(3))
    params = plain.init(key, x[:1])
    want, _ = jn.fit(plain, params, optax.sgd(0.3), (x, y), epochs=2, batch_size=4,
                     eval_data=(x, y), progress=False)
    got, history = jn.fit(split, params, optax.sgd(0.3), (parts, y), epochs=2, batch_size=4,
                          eval_data=(parts, y), progress=False)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert history[-1]["test_accuracy"] == jn.evaluate(plain, want.params, (x, y))["accuracy"]


def test_targets_may_be_a_pytree_too(key, rng):
    """``y = {"label", "weight"}`` read by a per-example loss: no accuracy is guessed."""
    x, labels = blobs(rng, n=32)
    y = {"label": labels, "weight": np.where(labels == 0, 2.0, 1.0).astype(np.float32)}
    net = jn.serial(jn.Dense(3))

    def weighted_ce(logits, y):
        return y["weight"] * softmax_cross_entropy(logits, y["label"])

    state, history = jn.fit(net, net.init(key, x[:1]), optax.adam(1e-2), (x, y), epochs=2,
                            batch_size=8, loss=weighted_ce, progress=False)
    assert "train_accuracy" not in history[-1]
    result = jn.evaluate(net, state.params, (x, y), loss=weighted_ce)
    want = weighted_ce(net.apply(state.params, x), jax.tree.map(jnp.asarray, y)).mean()
    assert result == {"loss": pytest.approx(float(want), rel=1e-5)}


def test_leaves_of_different_lengths_are_named(key, rng):
    x, y = token_problem(rng, n=12)
    net = bag_net()
    params = net.init(key, jax.tree.map(lambda a: a[:1], x))
    short = {"tokens": x["tokens"], "mask": x["mask"][:11]}
    message = (r"train_data: every array must have the same number of examples \(its leading "
               r"axis\); found x\['mask'\] 11, x\['tokens'\] 12, y 12")
    with pytest.raises(ValueError, match=message):
        jn.fit(net, params, optax.sgd(0.1), (short, y), epochs=1, progress=False)
    with pytest.raises(ValueError, match=message.replace("train_data", "data")):
        jn.evaluate(net, params, (short, y))
    with pytest.raises(ValueError, match=r"train_data: batch 0: .*found x\['mask'\] 11"):
        jn.fit(net, params, optax.sgd(0.1), [(short, y)], epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"data: x\['tokens'\] is a scalar"):
        jn.evaluate(net, params, ({"tokens": np.int32(1), "mask": x["mask"]}, y))


def test_streamed_pytree_batches_train_like_the_resident_fit(key, rng, tmp_path):
    x, y = token_problem(rng, n=40)
    net = bag_net()
    params = net.init(key, jax.tree.map(lambda a: a[:1], x))
    for name, array in x.items():
        np.save(tmp_path / f"{name}.npy", array)
    mapped = {name: np.load(tmp_path / f"{name}.npy", mmap_mode="r") for name in x}
    resident, _ = jn.fit(net, params, optax.sgd(0.3), (x, y), epochs=2, batch_size=16,
                         progress=False)
    assert is_streaming((mapped, y)) and not is_streaming((x, y))
    streamed, _ = fit_streaming(net, params, optax.sgd(0.3), (mapped, y), epochs=2,
                                batch_size=16, progress=False, shuffle="global", chunk_steps=2)
    for a, b in zip(jax.tree.leaves(streamed.params), jax.tree.leaves(resident.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    batches = [(jax.tree.map(lambda a: a[i:i + 16], x), y[i:i + 16]) for i in range(0, 40, 16)]
    _, history = jn.fit(net, params, optax.sgd(0.3), batches, epochs=2, eval_data=batches,
                        progress=False)
    assert history[-1]["test_loss"] == pytest.approx(
        jn.evaluate(net, _final(net, params, batches), (x, y))["loss"], rel=1e-5)


def _final(net, params, batches):
    """The params after two epochs over ``batches`` with the train step."""
    step = jn.make_train_step(net, optax.sgd(0.3))
    state = jn.init_train_state(net, optax.sgd(0.3), params)
    for _ in range(2):
        for xb, yb in batches:
            state, _ = step(state, xb, yb)
    return state.params
