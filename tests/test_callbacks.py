"""fit's general training: task metrics, validation, callbacks, reduce-on-plateau."""

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet import metrics
from jaxnet.losses import mean_squared_error
from jaxnet.train.callbacks import (CSVLogger, Checkpointer, EarlyStopping, JSONLogger, best_index,
                                    improves, strict_json)


def regression_problem(rng, n=96):
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32)).astype(np.float32)  # (n, 1)
    return jnp.asarray(x), jnp.asarray(y)


def classification_problem(rng, n=96):
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def test_regression_records_mean_errors_and_no_accuracy(key, rng):
    x, y = regression_problem(rng)
    net = jn.serial(jn.Dense(1))
    state, history = jn.fit(net, net.init(key, x[:1]), optax.adam(0.1), (x, y), epochs=30,
                            batch_size=32, loss=mean_squared_error, eval_data=(x, y),
                            progress=False)
    assert "train_accuracy" not in history[-1] and "test_accuracy" not in history[-1]
    assert history[-1]["train_mae"] < 0.5 * history[0]["train_mae"]
    predicted = net.apply(state.params, x)
    np.testing.assert_allclose(history[-1]["test_mae"], np.mean(np.abs(predicted - y)), rtol=1e-5)
    np.testing.assert_allclose(history[-1]["test_loss"], np.mean((predicted - y) ** 2), rtol=1e-5)
    assert jn.evaluate(net, state.params, (x, y), loss=mean_squared_error).keys() == {"loss", "mae"}


def test_user_metrics_are_summed_per_example_and_named(key, rng):
    x, y = classification_problem(rng)
    net = jn.serial(jn.Dense(4))
    params = net.init(key, x[:1])
    result = jn.evaluate(net, params, (x, y), batch_size=40,  # 96 = 40 + 40 + 16, padding masked
                         metrics={"top2": metrics.top_k(2), "top4": metrics.top_k(4)})
    logits = np.asarray(net.apply(params, x))
    rank = (logits > logits[np.arange(len(y)), y][:, None]).sum(-1)
    assert result["top2"] == pytest.approx(np.mean(rank < 2))
    assert result["top4"] == 1.0
    assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == np.asarray(y)))


def test_a_metric_with_the_wrong_shape_is_refused(key, rng):
    x, y = classification_problem(rng)
    net = jn.serial(jn.Dense(4))
    with pytest.raises(ValueError, match=r"metric 'mean': expected one value per example, shape "
                                         r"\(96,\), got shape \(\)"):
        jn.evaluate(net, net.init(key, x[:1]), (x, y), metrics={"mean": metrics.accuracy})


def test_validation_split_holds_out_the_last_rows(key, rng):
    x, y = classification_problem(rng, 100)
    net = jn.serial(jn.Dense(4))
    params = net.init(key, x[:1])
    state, history = jn.fit(net, params, optax.adam(1e-2), (x, y), epochs=2, batch_size=16,
                            validation_split=0.2, progress=False)
    expected = jn.evaluate(net, state.params, (x[80:], y[80:]))
    assert history[-1]["val_loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert history[-1]["val_accuracy"] == pytest.approx(expected["accuracy"])
    same, _ = jn.fit(net, params, optax.adam(1e-2), (x[:80], y[:80]), epochs=2, batch_size=16,
                     progress=False)
    np.testing.assert_array_equal(same.params["dense_1"]["w"], state.params["dense_1"]["w"])


@pytest.mark.parametrize("split, message", [(1.0, r"must be in \(0, 1\), got 1.0"),
                                            (0.001, "leaves 0 for validation")])
def test_bad_validation_splits_are_refused(key, rng, split, message):
    x, y = classification_problem(rng)
    net = jn.serial(jn.Dense(4))
    with pytest.raises(ValueError, match="fit: validation_split" + ".*" + message):
        jn.fit(net, net.init(key, x[:1]), optax.sgd(0.1), (x, y), epochs=1, validation_split=split,
               progress=False)


def test_early_stopping_stops_and_returns_the_best_state(key, rng):
    x, y = classification_problem(rng)
    net = jn.serial(jn.Dense(4))
    stop = EarlyStopping(monitor="val_loss", patience=2)
    # a learning rate this large makes the validation loss rise after the first epochs
    state, history = jn.fit(net, net.init(key, x[:1]), optax.sgd(30.0), (x, y), epochs=40,
                            batch_size=8, validation_data=(x[:32], y[:32]), callbacks=[stop],
                            progress=False)
    losses = [record["val_loss"] for record in history]
    assert len(history) < 40 and len(history) == stop.best_epoch + 2
    assert stop.best_value == min(losses)
    assert jn.evaluate(net, state.params, (x[:32], y[:32]))["loss"] == pytest.approx(min(losses), rel=1e-5)
    assert int(state.step) == stop.best_epoch * 12


def test_early_stopping_names_a_missing_metric(key, rng):
    x, y = classification_problem(rng)
    net = jn.serial(jn.Dense(4))
    with pytest.raises(KeyError, match="no 'val_loss' in the epoch's record.*pass validation_data"):
        jn.fit(net, net.init(key, x[:1]), optax.sgd(0.1), (x, y), epochs=2,
               callbacks=[EarlyStopping()], progress=False)


def test_loggers_write_strict_json_and_csv(key, rng, tmp_path):
    x, y = classification_problem(rng)
    net = jn.serial(jn.Dense(4))
    jn.fit(net, net.init(key, x[:1]), optax.sgd(0.1), (x, y), epochs=3, batch_size=32,
           callbacks=[JSONLogger(tmp_path / "log.jsonl"), CSVLogger(tmp_path / "log.csv")],
           progress=False)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    csv_lines = (tmp_path / "log.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,train_loss,train_accuracy") and len(csv_lines) == 4
    assert strict_json({"loss": float("nan"), "each": [1.0, float("inf")]}) == \
        '{"loss": null, "each": [1.0, null]}'


def test_checkpointer_saves_states_that_resume_exactly(key, rng, tmp_path):
    x, y = classification_problem(rng)
    net = jn.serial(jn.Dense(4))
    params = net.init(key, x[:1])
    full, _ = jn.fit(net, params, optax.adam(1e-2), (x, y), epochs=4, batch_size=32,
                     callbacks=[Checkpointer(tmp_path, every=2)], progress=False)
    assert [p.name for p in jn.checkpoint.list_checkpoints(tmp_path)] == ["ckpt-000006", "ckpt-000012"]
    template = jn.init_train_state(net, optax.adam(1e-2), params)
    halfway, manifest = jn.restore_checkpoint(tmp_path / "ckpt-000006", template)
    assert manifest["metadata"]["record"]["epoch"] == 2
    resumed, _ = jn.fit(net, halfway, optax.adam(1e-2), (x, y), epochs=4, batch_size=32,
                        progress=False)
    np.testing.assert_array_equal(resumed.params["dense_1"]["w"], full.params["dense_1"]["w"])


def test_reduce_on_plateau_from_optax_works_in_fit(key, rng):
    x, y = classification_problem(rng)
    net = jn.serial(jn.Dense(4))
    optimizer = optax.chain(optax.sgd(30.0), optax.contrib.reduce_on_plateau(
        factor=0.5, patience=2, accumulation_size=3))
    state, history = jn.fit(net, net.init(key, x[:1]), optimizer, (x, y), epochs=10, batch_size=8,
                            progress=False)
    scale = float(state.opt_state[1].scale)
    assert scale < 1.0  # the plateau was seen through the loss passed as `value`
    assert all(np.isfinite(record["train_loss"]) for record in history)


def test_improvement_is_compared_key_by_key():
    modes = ("max", "min")  # accuracy, then loss
    assert improves([0.9, 0.3], None, modes)
    assert improves([0.9, 0.2], [0.9, 0.3], modes)  # a tie on accuracy, a lower loss
    assert not improves([0.9, 0.3], [0.9, 0.3], modes)  # equal: the earlier one stays
    assert not improves([0.8, 0.1], [0.9, 0.3], modes)
    assert not improves([float("nan"), 0.1], None, modes)
    assert not improves([0.95, 0.1], [0.9, 0.3], modes, min_delta=0.1)
    assert best_index([[0.5, 0.3], [0.9, 0.4], [0.9, 0.2], [0.9, 0.2]], modes) == 2
    assert best_index([[float("nan"), 0.1]], modes) is None


def test_early_stopping_on_several_keys_and_without_patience(key, rng):
    x, y = classification_problem(rng)
    net = jn.serial(jn.Dense(4))
    keep = EarlyStopping(("val_accuracy", "val_loss"), patience=None)
    state, history = jn.fit(net, net.init(key, x[:1]), optax.sgd(30.0), (x, y), epochs=12,
                            batch_size=8, validation_data=(x[:32], y[:32]), callbacks=[keep],
                            progress=False)
    assert len(history) == 12  # never stops
    best = max(history, key=lambda r: (r["val_accuracy"], -r["val_loss"], -r["epoch"]))
    assert keep.best_epoch == best["epoch"] and keep.best_values == (best["val_accuracy"],
                                                                      best["val_loss"])
    assert int(state.step) == keep.best_epoch * 12
    with pytest.raises(ValueError, match=r"mode must be 'min' or 'max' \(one per monitored key, 2\)"):
        EarlyStopping(("val_accuracy", "val_loss"), mode=("max",))


def test_early_stopping_resumes_from_the_history_and_the_kept_state(key, rng):
    x, y = classification_problem(rng)
    net = jn.serial(jn.Dense(4))
    params = net.init(key, x[:1])
    last = {}
    run = lambda start, epochs, stop: jn.fit(  # noqa: E731
        net, start, optax.sgd(30.0), (x, y), epochs=epochs, batch_size=8,
        validation_data=(x[:32], y[:32]), callbacks=[stop], progress=False,
        on_epoch=lambda record, state: last.update(state=state))  # a checkpoint's state
    whole = EarlyStopping(patience=3)
    best, history = run(params, 40, whole)
    first = EarlyStopping(patience=3)
    run(params, whole.best_epoch + 1, first)  # interrupted one epoch past the best
    assert int(last["state"].step) == (whole.best_epoch + 1) * 12
    again = EarlyStopping(patience=3)
    again.resume(history[:whole.best_epoch + 1], first.best_state)
    resumed, rest = run(last["state"], 40, again)  # from the last state, ending with the best
    assert again.best_epoch == whole.best_epoch and whole.best_epoch + 1 + len(rest) == len(history)
    np.testing.assert_array_equal(resumed.params["dense_1"]["w"], best.params["dense_1"]["w"])


def test_checkpointer_every_none_saves_only_mid_epoch(key, rng, tmp_path):
    x, y = classification_problem(rng)
    net = jn.serial(jn.Dense(4))
    jn.fit(net, net.init(key, x[:1]), optax.sgd(0.1), (x, y), epochs=2, batch_size=32,
           callbacks=[Checkpointer(tmp_path, every=None, every_steps=2, keep=None)],
           progress=False)
    assert [p.name for p in jn.checkpoint.list_checkpoints(tmp_path)] == ["ckpt-000002",
                                                                          "ckpt-000005"]
