"""Model losses: ``(params, model_state, batch, key) -> (loss, aux)`` in fit, evaluate, the
train step and streaming."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet import metrics, train
from jaxnet.losses import (mean_squared_error, model_loss, softmax_cross_entropy,
                           weighted_mean)
from support import blobs

DECAY = 0.05


def small_mlp():
    return jn.serial(jn.Dense(8), jn.relu, jn.Dense(3))


def l2_penalised(net, decay=DECAY):
    """Cross-entropy plus ``decay / 2 * |params|^2``: the gradient of ``add_decayed_weights``."""
    @model_loss
    def loss(params, model_state, batch, key):
        logits, _ = net.apply_with_state(params, model_state, batch.x, key=key,
                                         train=batch.train, batch_ndim=1)
        ce = weighted_mean(softmax_cross_entropy(logits, batch.y), batch.weights)
        l2 = sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
        return ce + decay / 2 * l2, {"ce": ce, "l2": l2}
    return loss


def test_an_l2_penalty_as_a_model_loss_trains_like_optax_weight_decay(key, rng):
    """10 examples in batches of 4: the padded last batch must be masked for the two to agree."""
    x, y = blobs(rng, n=10)
    net = small_mlp()
    params = net.init(key, x[:1])
    decayed = optax.chain(optax.add_decayed_weights(DECAY), optax.sgd(0.3))
    want, _ = jn.fit(net, params, decayed, (x, y), epochs=3, batch_size=4, progress=False)
    got, history = jn.fit(net, params, optax.sgd(0.3), (x, y), epochs=3, batch_size=4,
                          loss=l2_penalised(net), eval_data=(x, y), progress=False)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    record = history[-1]
    assert "train_accuracy" not in record and "test_accuracy" not in record
    assert {"train_loss", "train_ce", "train_l2", "test_loss", "test_ce", "test_l2"} <= set(record)
    logits = net.apply(got.params, x)
    ce = float(softmax_cross_entropy(logits, jnp.asarray(y)).mean())
    l2 = float(sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(got.params)))
    assert record["test_ce"] == pytest.approx(ce, rel=1e-5)
    assert record["test_l2"] == pytest.approx(l2, rel=1e-5)
    assert record["test_loss"] == pytest.approx(ce + DECAY / 2 * l2, rel=1e-5)


def test_evaluate_and_the_train_step_take_a_model_loss(key, rng):
    x, y = blobs(rng, n=37)
    net = small_mlp()
    params = net.init(key, x[:1])
    loss = l2_penalised(net)
    result = jn.evaluate(net, params, (x, y), loss=loss, batch_size=8)  # 37 = 4 * 8 + 5 padded
    ce = float(softmax_cross_entropy(net.apply(params, x), jnp.asarray(y)).mean())
    assert result.keys() == {"loss", "ce", "l2"}
    assert result["ce"] == pytest.approx(ce, rel=1e-5)

    step = jn.make_train_step(net, optax.sgd(0.1), loss)
    state, metrics = step(jn.init_train_state(net, optax.sgd(0.1), params), x, y)
    assert list(metrics) == ["loss", "ce", "l2"] and len(metrics) == 3
    assert float(metrics["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(ce + DECAY / 2 * float(metrics["l2"]), rel=1e-5)
    assert int(state.step) == 1
    with pytest.raises(KeyError, match="accuracy"):
        metrics["accuracy"]


def test_an_auxiliary_head_trains_and_is_reported(key, rng):
    """A network with two outputs: class logits, and a reconstruction of its input as an
    auxiliary task weighted 0.1; dropout draws from the step's key."""
    x, y = blobs(rng, n=64)
    net = jn.serial(jn.Dense(16), jn.relu, jn.Dropout(0.1), jn.parallel(jn.Dense(3), jn.Dense(5),
                                                                   fan_in="tuple"))

    @model_loss
    def loss(params, model_state, batch, key):
        (logits, rebuilt), _ = net.apply_with_state(params, model_state, batch.x, key=key,
                                                    train=batch.train, batch_ndim=1)
        ce = weighted_mean(softmax_cross_entropy(logits, batch.y), batch.weights)
        rebuild = weighted_mean(mean_squared_error(rebuilt, batch.x), batch.weights)
        accuracy = weighted_mean(jnp.argmax(logits, -1) == batch.y, batch.weights)
        return ce + 0.1 * rebuild, {"ce": ce, "rebuild": rebuild, "accuracy": accuracy}

    params = net.init(key, x[:1])
    _, history = jn.fit(net, params, optax.adam(1e-2), (x, y), epochs=8, batch_size=16,
                        loss=loss, eval_data=(x, y), progress=False)
    assert history[-1]["train_rebuild"] < 0.5 * history[0]["train_rebuild"]
    assert history[-1]["train_ce"] < history[0]["train_ce"]
    assert history[-1]["test_accuracy"] > 0.9


def test_a_model_loss_carries_the_batch_norm_state(key, rng):
    x, y = blobs(rng, n=32)
    net = jn.serial(jn.Dense(8), jn.BatchNorm(), jn.relu, jn.Dense(3))
    params, model_state = net.init_with_state(key, x[:1])

    def loss_returning(keep_state):
        @model_loss
        def loss(params, model_state, batch, key):
            logits, new_state = net.apply_with_state(params, model_state, batch.x,
                                                     train=batch.train, batch_ndim=1)
            mean = weighted_mean(softmax_cross_entropy(logits, batch.y), batch.weights)
            return mean, {"model_state": new_state} if keep_state else {}
        return loss

    state, _ = jn.fit(net, params, optax.sgd(0.1), (x, y), epochs=2, batch_size=16,
                      loss=loss_returning(True), progress=False)
    assert not np.allclose(state.model_state["batch_norm_1"]["mean"],
                           model_state["batch_norm_1"]["mean"])
    with pytest.raises(ValueError, match=r"fit: the network has state .*aux\['model_state'\]"):
        jn.fit(net, params, optax.sgd(0.1), (x, y), epochs=1, batch_size=16,
               loss=loss_returning(False), progress=False)


def test_a_model_loss_streams_like_the_resident_fit(key, rng):
    x, y = blobs(rng, n=48)
    net = small_mlp()
    params = net.init(key, x[:1])
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]
    streamed, history = jn.fit(net, params, optax.sgd(0.3), batches, epochs=2,
                               loss=l2_penalised(net), eval_data=batches, progress=False)
    step = jn.make_train_step(net, optax.sgd(0.3), l2_penalised(net))
    state = jn.init_train_state(net, optax.sgd(0.3), params)
    for _ in range(2):
        for xb, yb in batches:
            state, _ = step(state, xb, yb)
    for a, b in zip(jax.tree.leaves(streamed.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert {"train_ce", "train_l2", "test_ce", "test_l2"} <= set(history[-1])
    assert "train_accuracy" not in history[-1]
    assert jn.evaluate(net, state.params, batches, loss=l2_penalised(net)).keys() == {
        "loss", "ce", "l2"}


def test_a_population_trains_each_member_with_a_model_loss(key, rng):
    """Each member with its own order is what fit makes of it alone; aux is not reported there."""
    x, y = blobs(rng, n=24)
    net = small_mlp()
    population = jn.init_population(net, optax.sgd(0.3), x[:1], seeds=[0, 1])
    trained, history = jn.fit_population(net, population, optax.sgd(0.3), (x, y), epochs=2,
                                         batch_size=8, loss=l2_penalised(net),
                                         shared_order=False, progress=False)
    alone, _ = jn.fit(net, population.member(1), optax.sgd(0.3), (x, y), epochs=2, batch_size=8,
                      loss=l2_penalised(net), progress=False)
    for a, b in zip(jax.tree.leaves(trained.member(1).params), jax.tree.leaves(alone.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert len(history[-1]["train_loss"]) == 2 and "train_ce" not in history[-1]
    dropping = jn.init_population(net, optax.sgd(0.3), x[:1], seeds=[0, 1], drop_rate=[0.1, 0.2])
    with pytest.raises(ValueError, match="a population's dropout rates cannot reach a model loss"):
        jn.fit_population(net, dropping, optax.sgd(0.3), (x, y), epochs=1, batch_size=8,
                          loss=l2_penalised(net), progress=False)


@pytest.mark.parametrize("returned, message", [
    (lambda mean: (jnp.full((4,), mean), {}),
     r"train_batch: a model loss must return a floating scalar loss .*got shape \(4,\)"),
    (lambda mean: (mean, [mean]), r"train_batch: a model loss's aux must be a dict .*got list"),
    (lambda mean: mean, r"train_batch: a model loss must return \(loss, aux\), got shape \(\)"),
    (lambda mean: (mean, {"ce": jnp.full((4,), mean)}),
     r"aux\['ce'\] must be a number \(a scalar metric\), got shape \(4,\) of float32"),
    (lambda mean: (mean, {"loss": mean}), r"aux cannot name a metric 'loss'"),
    (lambda mean: (mean, {"model_state": {"x": mean}}),
     r"aux\['model_state'\] must be the network's state tree"),
])
def test_model_loss_outputs_are_checked_when_the_step_is_traced(key, returned, message):
    net = jn.serial(jn.Dense(3))
    x, y = jnp.ones((4, 2)), jnp.zeros((4,), jnp.int32)

    @model_loss
    def loss(params, model_state, batch, key):
        logits = net.apply(params, batch.x)
        return returned(weighted_mean(softmax_cross_entropy(logits, batch.y), batch.weights))

    params = net.init(key, x[:1])
    with pytest.raises((TypeError, ValueError), match=message):
        jn.make_train_step(net, optax.sgd(0.1), loss)(
            jn.init_train_state(net, optax.sgd(0.1), params), x, y)


def test_what_cannot_reach_a_model_loss_is_refused(key):
    net = jn.serial(jn.Dense(3))
    x, y = jnp.ones((8, 2)), jnp.zeros((8,), jnp.int32)
    params = net.init(key, x[:1])
    loss = l2_penalised(net)
    with pytest.raises(ValueError, match=r"fit: metrics \(top2\) are functions of the network's "
                                         r"outputs.*report them in its aux dict"):
        jn.fit(net, params, optax.sgd(0.1), (x, y), epochs=1, loss=loss, progress=False,
               metrics={"top2": metrics.top_k(2)})
    with pytest.raises(ValueError, match="train_batch: precision bf16 cannot reach a model loss"):
        jn.fit(net, params, optax.sgd(0.1), (x, y), epochs=1, loss=loss, progress=False,
               precision="bf16")
    state = jn.init_train_state(net, optax.sgd(0.1), params)
    with pytest.raises(ValueError, match="a population's dropout rates cannot reach a model loss"):
        train.train_batch(net, optax.sgd(0.1), loss, state, x, y, drop_rate=jnp.float32(0.1))
    with pytest.raises(TypeError, match="model_loss: expected a function"):
        model_loss(3)
    with pytest.raises(ValueError, match=r"weighted_mean: values of shape \(8, 3\) need one value "
                                         r"per example, the weights' shape \(8,\)"):
        weighted_mean(jnp.ones((8, 3)), jnp.ones(8))
