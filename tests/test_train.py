import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet import train
from jaxnet.losses import softmax_cross_entropy
from support import blobs, count_compiles


def small_mlp(classes=3):
    return jn.serial(jn.Dense(16), jn.relu, jn.Dense(classes))


def test_loss_falls_and_accuracy_rises_on_a_known_problem(key, rng):
    x, y = blobs(rng)
    net = small_mlp()
    params = net.init(key, x[:1])
    state, history = train.fit(net, params, optax.adam(1e-2), (x, y), epochs=5, batch_size=32,
                               eval_data=(x, y), progress=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 2
    assert history[-1]["test_accuracy"] > 0.9
    assert jax.tree.structure(state.params) == jax.tree.structure(params)
    assert int(state.step) == 5 * 7
    assert set(history[0]) >= {"epoch", "train_loss", "train_accuracy", "test_loss",
                               "test_accuracy", "seconds", "examples_per_second",
                               "compile_seconds"}


def test_no_recompilation_after_the_first_epoch(key, rng):
    x, y = blobs(rng, n=100)
    net = small_mlp()
    params = net.init(key, x[:1])
    counts = {}
    train.fit(net, params, optax.sgd(0.1), (x, y), epochs=1, batch_size=32, eval_data=(x, y),
              progress=False)  # warm up: the first run in a process compiles small helpers too
    for epochs in (1, 4):
        with count_compiles() as compiles:
            train.fit(net, params, optax.sgd(0.1), (x, y), epochs=epochs, batch_size=32,
                      eval_data=(x, y), progress=False)
        counts[epochs] = compiles[0]
    assert counts[1] == counts[4] == 2  # one epoch program, one evaluation program


def test_fit_matches_a_hand_written_loop_with_a_masked_last_batch(key, rng):
    """10 examples in batches of 4: the last batch has 2 real examples, weighted as a mean of 2."""
    x, y = blobs(rng, n=10)
    net = small_mlp()
    params = net.init(key, x[:1])
    run_key = jax.random.key(7)
    state, _ = train.fit(net, params, optax.sgd(0.5), (x, y), epochs=1, batch_size=4,
                         key=run_key, progress=False)

    order = np.asarray(train.shuffled_order(jax.random.fold_in(jax.random.fold_in(run_key, 0), 0), 10))
    expected = params
    for batch in (order[0:4], order[4:8], order[8:10]):
        def loss(p):
            h = jax.nn.relu(x[batch] @ p["dense_1"]["w"] + p["dense_1"]["b"][None])
            logits = h @ p["dense_2"]["w"] + p["dense_2"]["b"][None]
            return softmax_cross_entropy(logits, y[batch]).mean()
        grads = jax.grad(loss)(expected)
        expected = jax.tree.map(lambda p, g: p - 0.5 * g, expected, grads)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_same_seed_same_run_other_seed_other_run(key, rng):
    x, y = blobs(rng, n=64)
    net = jn.serial(jn.Dense(16), jn.relu, jn.Dropout(0.3), jn.Dense(3))
    params = net.init(key, x[:1])

    def run(seed):
        state, history = train.fit(net, params, optax.adam(1e-2), (x, y), epochs=2, batch_size=16,
                                   key=jax.random.key(seed), progress=False)
        return state, [{k: v for k, v in r.items() if "second" not in k} for r in history]

    (a, ha), (b, hb), (_, hc) = run(1), run(1), run(2)
    assert ha == hb
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(u, v)
    assert ha != hc


def test_continuing_from_a_state_equals_one_uninterrupted_run(key, rng):
    x, y = blobs(rng, n=50)
    net = small_mlp()
    params = net.init(key, x[:1])
    full, _ = train.fit(net, params, optax.adam(1e-2), (x, y), epochs=3, batch_size=16, progress=False)
    first, _ = train.fit(net, params, optax.adam(1e-2), (x, y), epochs=1, batch_size=16, progress=False)
    resumed, history = train.fit(net, first, optax.adam(1e-2), (x, y), epochs=3, batch_size=16,
                                 progress=False)
    assert [r["epoch"] for r in history] == [2, 3]
    for u, v in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        if not jnp.issubdtype(u.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(u, v)


def test_batch_norm_state_is_trained_and_kept(key, rng):
    x, y = blobs(rng, n=64)
    net = jn.serial(jn.Dense(8), jn.BatchNorm(), jn.relu, jn.Dense(3))
    params, model_state = net.init_with_state(key, x[:1])
    state, history = train.fit(net, params, optax.adam(1e-2), (x, y), epochs=3, batch_size=16,
                               eval_data=(x, y), progress=False)
    assert jax.tree.structure(state.model_state) == jax.tree.structure(model_state)
    assert not np.allclose(state.model_state["batch_norm_1"]["mean"], 0)
    assert history[-1]["test_accuracy"] > 0.8


def test_schedules_and_inject_hyperparams_work(key, rng):
    x, y = blobs(rng, n=64)
    net = small_mlp()
    params = net.init(key, x[:1])
    optimizer = optax.inject_hyperparams(optax.adam)(
        learning_rate=optax.cosine_decay_schedule(1e-2, 20))
    state, history = train.fit(net, params, optimizer, (x, y), epochs=3, batch_size=16, progress=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert float(state.opt_state.hyperparams["learning_rate"]) < 1e-2


def test_train_step_donates_the_state(key, rng):
    x, y = blobs(rng, n=32)
    net = small_mlp()
    params = net.init(key, x[:1])
    state = train.init_train_state(net, optax.adam(1e-3), params)
    step = train.make_train_step(net, optax.adam(1e-3))
    new_state, metrics = step(state, x, y)
    assert state.params["dense_1"]["w"].is_deleted()
    assert int(new_state.step) == 1 and 0 <= float(metrics["accuracy"]) <= 1
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_train_step_metrics_are_the_batch_loss_and_accuracy_before_the_update(key, rng):
    x, y = blobs(rng, n=32)
    net = small_mlp()
    params = net.init(key, x[:1])
    logits = np.asarray(net.apply(params, x), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    step = train.make_train_step(net, optax.adam(1e-3))
    _, metrics = step(train.init_train_state(net, optax.adam(1e-3), params), x, y)
    assert list(metrics) == ["loss", "accuracy"] and len(metrics) == 2
    np.testing.assert_allclose(metrics["loss"], -log_probs[np.arange(32), y].mean(), rtol=1e-5)
    assert float(metrics["accuracy"]) == (logits.argmax(-1) == y).mean()
    assert metrics["loss"].dtype == jnp.float32 and metrics["loss"].shape == ()
    assert set(dict(metrics)) == {"loss", "accuracy"} and "StepMetrics({'loss'" in repr(metrics)
    with pytest.raises(KeyError, match="top5"):
        metrics["top5"]


def test_progress_reaches_the_host_from_the_device_loop(key, rng):
    x, y = blobs(rng, n=40)
    net = small_mlp()
    params = net.init(key, x[:1])
    state = train.init_train_state(net, optax.sgd(0.1), params)
    seen = []
    epoch, steps = train.make_epoch(net, optax.sgd(0.1), softmax_cross_entropy, 40, 8,
                                    lambda step, sums: seen.append((int(step), float(sums.count))), 2)
    jax.block_until_ready(jax.jit(epoch)(state, x, y, jnp.int32(0)))
    jax.effects_barrier()
    assert steps == 5 and seen == [(2, 16.0), (4, 32.0)]


def test_fit_shows_a_progress_bar(key, rng, capsys):
    x, y = blobs(rng, n=40)
    net = small_mlp()
    train.fit(net, net.init(key, x[:1]), optax.sgd(0.1), (x, y), epochs=2, batch_size=8,
              progress=True, progress_every=1)
    assert "epoch 2/2" in capsys.readouterr().err


def test_nan_loss_stops_with_the_epoch_named(key, rng):
    x, y = blobs(rng, n=32)
    x[0, 0] = np.nan
    net = small_mlp()
    with pytest.raises(FloatingPointError, match=r"loss became nan in epoch 1 \(steps 1-2\)"):
        train.fit(net, net.init(key, x[1:2]), optax.sgd(0.1), (x, y), epochs=2, batch_size=16,
                  progress=False)


def test_bad_labels_and_arguments_are_reported(key, rng):
    x, y = blobs(rng, n=32)
    net = small_mlp()
    params = net.init(key, x[:1])
    y_bad = y.copy()
    y_bad[5] = 3
    with pytest.raises(ValueError, match=r"train_data labels must be in \[0, 3\).*found 3 at index 5"):
        train.fit(net, params, optax.sgd(0.1), (x, y_bad), epochs=1, progress=False)
    with pytest.raises(ValueError, match="x has 32 examples but y has 31"):
        train.fit(net, params, optax.sgd(0.1), (x, y[:31]), epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        train.fit(net, params, optax.sgd(0.1), (x, y), epochs=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got -1"):
        train.fit(net, params, optax.sgd(0.1), (x, y), epochs=1, batch_size=-1)
    with pytest.raises(ValueError, match=r"dense_1.w has shape \(5, 16\), expected \(4, 16\)"):
        train.fit(net, params, optax.sgd(0.1), (x[:, :4], y), epochs=1, progress=False)


def test_evaluate_matches_a_direct_computation(key, rng):
    x, y = blobs(rng, n=37)
    net = small_mlp()
    params = net.init(key, x[:1])
    got = train.evaluate(net, params, (x, y), batch_size=8)
    logits = net.apply(params, x)
    np.testing.assert_allclose(got["loss"], softmax_cross_entropy(logits, jnp.asarray(y)).mean(), rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], float((logits.argmax(-1) == y).mean()), rtol=1e-6)


def test_a_loss_that_returns_the_batch_mean_is_refused_by_fit_and_the_step(key):
    net = jn.serial(jn.Dense(3))
    x, y = jnp.ones((8, 4)), jnp.zeros((8,), jnp.int32)
    params = net.init(key, x[:1])
    mean_loss = lambda logits, labels: softmax_cross_entropy(logits, labels).mean()  # noqa: E731
    message = r"loss must return one value per example, shape \(8,\); got shape \(\)"
    with pytest.raises(ValueError, match="train_batch: " + message):
        jn.fit(net, params, optax.sgd(0.1), (x, y), epochs=1, batch_size=8, loss=mean_loss,
               progress=False)
    step = jn.make_train_step(net, optax.sgd(0.1), mean_loss)
    with pytest.raises(ValueError, match=message):
        step(jn.init_train_state(net, optax.sgd(0.1), params), x, y)


def test_init_train_state_and_the_step_never_delete_the_callers_arrays(key):
    net = jn.serial(jn.Dense(3))
    x, y = jnp.ones((8, 4)), jnp.zeros((8,), jnp.int32)
    params, run_key = net.init(key, x[:1]), jax.random.key(3)
    step = jn.make_train_step(net, optax.sgd(0.1))
    state, _ = step(jn.init_train_state(net, optax.sgd(0.1), params, key=run_key), x, y)
    state, _ = step(state, x, y)
    np.testing.assert_array_equal(net.apply(params, x), net.apply(net.init(key, x[:1]), x))
    assert not run_key.is_deleted()


def test_on_epoch_receives_a_state_it_may_keep(key):
    net = jn.serial(jn.Dense(3))
    x, y = jnp.ones((16, 4)), jnp.zeros((16,), jnp.int32)
    kept = []
    jn.fit(net, net.init(key, x[:1]), optax.sgd(0.1), (x, y), epochs=3, batch_size=8,
           progress=False, on_epoch=lambda record, state: kept.append(state))
    assert [int(state.step) for state in kept] == [2, 4, 6]
    assert all(np.isfinite(np.asarray(s.params["dense_1"]["w"])).all() for s in kept)


def test_fit_trains_per_token_labels_with_padding(key):
    """A sequence model with (batch, time) labels: per-token loss and accuracy, padding ignored."""
    from jaxnet.losses import token_cross_entropy
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 5, size=(64, 6))
    labels = np.where(np.arange(6) < 4, tokens, -1).astype(np.int32)  # last two steps padded
    x = jax.nn.one_hot(tokens, 5)  # (64, 6, 5): learn to copy each token
    net = jn.serial(jn.Dense(16), jn.relu, jn.Dense(5))
    params = net.init(key, x[:1])
    state, history = jn.fit(net, params, optax.adam(1e-2), (x, labels), epochs=20, batch_size=16,
                            loss=token_cross_entropy, progress=False)
    assert history[-1]["train_accuracy"] == 1.0
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 5
    logits = net.apply(state.params, x)
    changed = logits.at[:, 4:].set(0.0)  # padded steps' outputs count for nothing
    np.testing.assert_allclose(token_cross_entropy(changed, labels), token_cross_entropy(logits, labels))


def test_augment_applies_to_training_batches_only(key, rng):
    """A deterministic augment (a shift) equals training on shifted data; validation sees the
    data as given."""
    x, y = blobs(rng, n=120)
    net = jn.serial(jn.Dense(8), jn.relu, jn.Dense(3))
    params = net.init(key, x)
    common = dict(epochs=2, batch_size=32, key=jax.random.key(3), validation_data=(x, y))
    shifted, history = jn.fit(net, params, optax.adam(1e-2), (x, y),
                              augment=lambda k, batch: batch + 1.5, **common)
    plain, _ = jn.fit(net, params, optax.adam(1e-2), (x + 1.5, y), **common)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 shifted.params, plain.params)
    on_validation = jn.evaluate(net, shifted.params, (x, y))
    np.testing.assert_allclose(history[-1]["val_loss"], on_validation["loss"], rtol=1e-5)


def test_random_augment_draws_a_new_key_every_step_reproducibly(key, rng):
    x, y = blobs(rng, n=64)
    net = jn.serial(jn.Dense(8), jn.relu, jn.Dense(3))
    params = net.init(key, x)
    seen = []

    def noise(k, batch):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), jax.random.key_data(k))
        return batch + 0.1 * jax.random.normal(k, batch.shape)

    runs = [jn.fit(net, params, optax.sgd(0.1), (x, y), epochs=1, batch_size=16,
                   key=jax.random.key(5), augment=noise)[0] for _ in range(2)]
    jax.tree.map(np.testing.assert_array_equal, runs[0].params, runs[1].params)
    assert len(seen) == 8 and len({v.tobytes() for v in seen[:4]}) == 4  # 4 steps, 4 keys
    unaugmented, _ = jn.fit(net, params, optax.sgd(0.1), (x, y), epochs=1, batch_size=16,
                            key=jax.random.key(5))
    assert not np.allclose(runs[0].params["dense_1"]["w"], unaugmented.params["dense_1"]["w"])


def test_multi_label_targets_get_the_fraction_of_labels_right_by_default(key, rng):
    x = rng.normal(size=(96, 6)).astype(np.float32)
    labels = np.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0, x[:, 3] < 0], axis=1).astype(np.int32)
    net = jn.serial(jn.Dense(16), jn.relu, jn.Dense(3))
    params = net.init(key, x)
    state, history = jn.fit(net, params, optax.adam(1e-2), (x, labels), epochs=30, batch_size=32,
                            loss=jn.losses.sigmoid_binary_cross_entropy, eval_data=(x, labels),
                            validation_split=None)
    assert "train_accuracy" not in history[-1] and "train_mae" not in history[-1]
    logits = np.asarray(net.apply(state.params, x))
    np.testing.assert_allclose(history[-1]["test_label_accuracy"],
                               np.mean((logits > 0) == (labels > 0.5)), rtol=1e-6)
    assert history[-1]["test_label_accuracy"] > 0.9
