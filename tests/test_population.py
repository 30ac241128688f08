import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jaxnet as jn
from contract import assert_contract, f64, random_params
from jaxnet import population, train
from jaxnet.losses import softmax_cross_entropy
from jaxnet.population import (Ensemble, Population, best_member, chosen_epochs, fit_population,
                               init_population, make_population_epoch, set_hyperparams)
from support import blobs, count_compiles

LRS = [3e-3, 1e-2, 3e-2]
nan = float("nan")


def small_mlp(drop_rate=0.0):
    return jn.serial(jn.Dense(16), jn.relu, jn.Dropout(drop_rate), jn.Dense(3))


def adam():
    return optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@pytest.mark.parametrize("gather", ["epoch", "batch"])
def test_members_train_exactly_as_they_would_alone(rng, monkeypatch, gather):
    """Own data order: member i equals ``fit`` of member i's state, history and params."""
    if gather == "batch":  # K shuffled copies of the epoch "too big": gather each step's batches
        monkeypatch.setattr(population, "EPOCH_COPY_BYTES", 0)
    x, y = blobs(rng, n=90)  # 90 = 2 full batches of 40 and a masked one
    net, opt = small_mlp(), adam()
    pop = init_population(net, opt, x[:1], seeds=[0, 1, 2], hyperparams={"learning_rate": LRS})
    trained, history = fit_population(net, pop, opt, (x, y), epochs=3, batch_size=40,
                                      eval_data=(x, y), shared_order=False, progress=False)
    assert len(history) == 3 and len(history[0]["train_loss"]) == 3
    for i in range(3):
        alone, alone_history = train.fit(net, pop.member(i), opt, (x, y), epochs=3, batch_size=40,
                                         eval_data=(x, y), progress=False)
        assert_trees_close(trained.member(i).params, alone.params)
        assert_trees_close(trained.member(i).opt_state, alone.opt_state)
        for metric in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            np.testing.assert_allclose([r[metric][i] for r in history],
                                       [r[metric] for r in alone_history], rtol=1e-5)
    assert np.asarray(trained.members.step).tolist() == [9, 9, 9]


def test_a_member_matches_a_run_with_its_own_plain_optimizer(rng):
    """Seed s and learning rate lr: the same as ``fit`` with ``optax.adam(lr)`` from seed s."""
    x, y = blobs(rng, n=64)
    net, opt = small_mlp(), adam()
    pop = init_population(net, opt, x[:1], seeds=[5, 7, 5], hyperparams={"learning_rate": LRS})
    trained, _ = fit_population(net, pop, opt, (x, y), epochs=2, batch_size=16,
                                shared_order=False, progress=False)
    init_key, run_key = jax.random.split(jax.random.key(7))
    alone, _ = train.fit(net, net.init(init_key, x[:1]), optax.adam(LRS[1]), (x, y), epochs=2,
                         batch_size=16, key=run_key, progress=False)
    assert_trees_close(trained.member(1).params, alone.params)


def test_shared_order_trains_every_member_on_member_zeros_batches(rng):
    x, y = blobs(rng, n=64)
    net, opt = small_mlp(), adam()
    pop = init_population(net, opt, x[:1], seeds=[3, 4], hyperparams={"learning_rate": [1e-2, 1e-2]})
    trained, _ = fit_population(net, pop, opt, (x, y), epochs=2, batch_size=16, progress=False)
    first, _ = train.fit(net, pop.member(0), opt, (x, y), epochs=2, batch_size=16, progress=False)
    assert_trees_close(trained.member(0).params, first.params)
    # member 1 starts from its own init but sees member 0's order: it equals a run whose
    # shuffling key is member 0's
    second = pop.member(1)._replace(key=pop.member(0).key)
    second, _ = train.fit(net, second, opt, (x, y), epochs=2, batch_size=16, progress=False)
    assert_trees_close(trained.member(1).params, second.params)


def test_a_bf16_population_trains_as_bf16_fit_does(rng):
    x, y = blobs(rng, n=64)
    net, opt = small_mlp(), adam()
    pop = init_population(net, opt, x[:1], seeds=[0, 1], hyperparams={"learning_rate": [1e-2, 3e-2]})
    trained, history = fit_population(net, pop, opt, (x, y), epochs=2, batch_size=16,
                                      eval_data=(x, y), shared_order=False, precision="bf16",
                                      progress=False)
    assert trained.member(1).params["dense_1"]["w"].dtype == jnp.float32
    alone, alone_history = train.fit(net, pop.member(1), opt, (x, y), epochs=2, batch_size=16,
                                     eval_data=(x, y), precision="bf16", progress=False)
    assert_trees_close(trained.member(1).params, alone.params, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(history[-1]["test_loss"][1], alone_history[-1]["test_loss"], rtol=1e-3)


def test_dropout_rate_and_init_scale_per_member(rng):
    x, y = blobs(rng, n=64)
    opt = adam()
    net = small_mlp(drop_rate=0.5)  # built with dropout; each member overrides the rate
    pop = init_population(net, opt, x[:1], seeds=[0, 0, 0], drop_rate=[0.0, 0.2, 0.4],
                          init_scale=[1.0, 1.0, 0.5])
    base = net.init(jax.random.split(jax.random.key(0))[0], x[:1])
    assert_trees_close(pop.member(1).params, base, rtol=0, atol=0)
    assert_trees_close(pop.member(2).params, jax.tree.map(lambda p: 0.5 * p, base), rtol=0, atol=0)
    trained, _ = fit_population(net, pop, opt, (x, y), epochs=2, batch_size=16,
                                shared_order=False, progress=False)
    for i, rate in ((0, 0.0), (1, 0.2)):
        alone, _ = train.fit(small_mlp(rate), pop.member(i), opt, (x, y), epochs=2, batch_size=16,
                             progress=False)
        assert_trees_close(trained.member(i).params, alone.params)


def test_new_hyperparameter_values_never_recompile(rng):
    x, y = blobs(rng, n=64)
    net, opt = small_mlp(0.1), adam()
    epoch, _ = make_population_epoch(net, opt, softmax_cross_entropy, 64, 16)
    run = jax.jit(epoch)
    settings = [([0, 1], [1e-3, 1e-2], [0.1, 0.2]), ([8, 9], [5e-2, 1e-4], [0.0, 0.3]),
                ([2, 3], [1.0, 2.0], [0.5, 0.5])]
    populations = [init_population(net, opt, x[:1], seeds=seeds, hyperparams={"learning_rate": lrs},
                                   drop_rate=rates) for seeds, lrs, rates in settings]
    losses = [run(populations[0], x, y, jnp.int32(0))[1].loss]
    with count_compiles() as compiles:
        losses += [run(pop, x, y, jnp.int32(e))[1].loss for e, pop in enumerate(populations[1:])]
    assert compiles[0] == 0  # other seeds, learning rates and dropout rates: the same program
    assert not np.allclose(losses[0], losses[1])


def test_a_diverging_member_leaves_the_others_alone(rng):
    x, y = blobs(rng, n=64)
    net, opt = small_mlp(), adam()
    pop = init_population(net, opt, x[:1], seeds=[0, 0], hyperparams={"learning_rate": [1e-2, 1e30]})
    trained, history = fit_population(net, pop, opt, (x, y), epochs=3, batch_size=16,
                                      eval_data=(x, y), validation_data=(x[:32], y[:32]),
                                      progress=False)
    assert not np.isfinite(history[-1]["test_loss"][1])
    assert not np.isfinite(history[-1]["val_loss"][1])
    assert history[-1]["test_accuracy"][0] > 0.9
    assert best_member(history) == 0
    assert best_member(history, "val_accuracy") == 0


def test_best_member_is_chosen_at_each_members_best_validation_epoch():
    history = [{"epoch": 1, "val_accuracy": [0.5, 0.9, 0.9], "val_loss": [0.3, 0.2, 0.1]},
               {"epoch": 2, "val_accuracy": [0.6, 0.8, 0.7], "val_loss": [0.05, 0.4, nan]}]
    assert chosen_epochs(history) == [2, 1, 1]
    assert best_member(history) == 0  # its epoch 2 has the lowest validation loss of all
    assert best_member(history, "val_accuracy") == 1  # the first of two at 0.9
    assert best_member(history, ("val_accuracy", "val_loss")) == 2  # the tie broken by the loss
    assert chosen_epochs([{"epoch": 1, "val_loss": [nan, 0.1]}]) == [None, 1]


def test_population_errors_name_the_argument(rng):
    x, y = blobs(rng, n=32)
    net, opt = small_mlp(), adam()
    with pytest.raises(ValueError, match=r"learning_rate needs one value per member, shape \(2,\); got shape \(3,\)"):
        init_population(net, opt, x[:1], seeds=[0, 1], hyperparams={"learning_rate": LRS})
    with pytest.raises(ValueError, match=r"\['momentum'\] not injected hyperparameters .*available: \['b1', 'b2', 'eps', 'eps_root', 'learning_rate'\]"):
        init_population(net, opt, x[:1], seeds=[0], hyperparams={"momentum": [0.9]})
    with pytest.raises(ValueError, match="build it with optax.inject_hyperparams"):
        init_population(net, optax.adam(1e-3), x[:1], seeds=[0], hyperparams={"learning_rate": [0.1]})
    with pytest.raises(ValueError, match="seeds must be a non-empty list of integers"):
        init_population(net, opt, x[:1], seeds=[0.5])
    with pytest.raises(ValueError, match=r"drop_rate values must be in \[0, 1\); got \[0.0, 1.0\]"):
        init_population(net, opt, x[:1], seeds=[0, 1], drop_rate=[0.0, 1.0])
    with pytest.raises(ValueError, match="init_scale has values that are not finite"):
        init_population(net, opt, x[:1], seeds=[0], init_scale=[float("nan")])
    pop = init_population(net, opt, x[:1], seeds=[0, 1])
    with pytest.raises(IndexError, match="index 2 out of range for 2 members"):
        pop.member(2)
    uneven = Population(pop.members._replace(step=jnp.asarray([0, 2], jnp.int32)))
    with pytest.raises(ValueError, match=r"one epoch boundary .* steps are \[0, 2\]"):
        fit_population(net, uneven, opt, (x, y), epochs=1, batch_size=16, progress=False)
    with pytest.raises(ValueError, match="train_data: x has 32 examples but y has 31"):
        fit_population(net, pop, opt, (x, y[:31]), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"no per-member 'val_loss' in the history \(has \['train_loss'\]\); pass validation_data"):
        best_member([{"train_loss": [0.1]}])
    with pytest.raises(ValueError, match="every member's val_loss is NaN or infinite"):
        best_member([{"val_loss": [float("nan")]}])
    with pytest.raises(ValueError, match="'test_accuracy' is a test metric; choose by validation"):
        best_member([{"test_accuracy": [0.5]}], "test_accuracy")
    with pytest.raises(ValueError, match="Ensemble: members must be a positive integer, got 0"):
        Ensemble(small_mlp(), 0)


def test_set_hyperparams_reaches_inside_a_chain():
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
    state = set_hyperparams(opt.init({"w": jnp.ones(2)}), {"learning_rate": 0.5})
    assert float(state[1].hyperparams["learning_rate"]) == 0.5


def softmax64(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def test_ensemble_is_the_mean_of_the_members_probabilities(rng):
    net = jn.serial(jn.Dense(8), jn.tanh, jn.Dense(4))
    x = rng.normal(size=(6, 5)).astype(np.float32)
    ensemble = Ensemble(net, 3)
    params = random_params(ensemble, x, rng)
    assert params["dense_1"]["w"].shape == (3, 5, 8)
    y = assert_contract(ensemble, params, x)
    p = f64(params)
    members = [np.tanh(x @ p["dense_1"]["w"][k] + p["dense_1"]["b"][k]) @ p["dense_2"]["w"][k]
               + p["dense_2"]["b"][k] for k in range(3)]
    expected = np.mean([softmax64(m) for m in members], axis=0)
    np.testing.assert_allclose(jax.nn.softmax(y), expected, rtol=1e-5, atol=1e-6)
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)
        params64 = random_params(ensemble, x64[:1], rng)
        check_grads(jax.jit(ensemble.apply), (params64, x64), order=1, modes=("fwd", "rev"))
    np.testing.assert_allclose(jn.predict(ensemble, params, x, proba=True, batch_size=4),
                               expected, rtol=1e-5, atol=1e-6)


def test_ensemble_of_a_trained_population_predicts(rng):
    x, y = blobs(rng, n=64)
    net, opt = small_mlp(), adam()
    pop = init_population(net, opt, x[:1], seeds=[0, 1, 2, 3],
                          hyperparams={"learning_rate": [1e-2] * 4})
    trained, history = fit_population(net, pop, opt, (x, y), epochs=3, batch_size=16,
                                      eval_data=(x, y), progress=False)
    logits = Ensemble(net, 4).apply(trained.members.params, x)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y))
    assert accuracy >= min(history[-1]["test_accuracy"]) - 1e-6
