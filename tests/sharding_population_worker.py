"""Populations and ``predict`` on meshes of 8 simulated CPU devices; used by
tests/test_sharding_population.py.

The number of CPU devices is fixed when JAX's backend starts (``XLA_FLAGS`` from the test), so
this runs in a fresh process: ``python tests/sharding_population_worker.py OUT.npz``.

An MLP population (8 members, each its own seed, learning rate, momentum and dropout rate)
is created and trained on one device (the reference) and on each mesh of ``MESHES`` (and with
a shared data order on one device and on 2x2x2); ``predict`` runs one member and the
population's ``Ensemble`` on one device and on each mesh. Results, layouts, bytes per device
and the messages of the errors that need several devices go to ``OUT.npz``, which the test
compares. ``setup`` and ``host`` serve the test's one-device checks too.
"""

import sys

import numpy as np

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8))
MEMBERS, FEATURES, CLASSES, EPOCHS, BATCH = 8, 32, 8, 2, 16
ROWS = 37  # predict: not a multiple of the batch size or of any mesh's data x fsdp


def setup():
    import optax

    import jaxnet as jn
    from jaxnet.sharding import ShardingRules

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, FEATURES)).astype(np.float32)
    y = x[:, :CLASSES].argmax(axis=1).astype(np.int32)
    net = jn.models.mlp((64, 64), CLASSES, drop_rate=0.1)
    # SGD: Adam would scale the rounding noise of a gradient that is zero in exact arithmetic
    # (a unit dropout or ReLU leaves idle), which differs with the layout, up to a full step
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    population = {"seeds": list(range(MEMBERS)),
                  "hyperparams": {"learning_rate": np.geomspace(1e-2, 3e-1, MEMBERS),
                                  "momentum": np.linspace(0.5, 0.9, MEMBERS)},
                  "drop_rate": np.linspace(0.0, 0.3, MEMBERS)}
    fit = {"epochs": EPOCHS, "batch_size": BATCH, "shared_order": False, "progress": False,
           "eval_data": (x[:40], y[:40]), "validation_data": (x[40:], y[40:])}
    rules = ShardingRules(fsdp_min_size=256)  # the small MLP's weights are split too
    return net, optimizer, (x, y), population, fit, rules


def host(tree) -> dict[str, np.ndarray]:
    """``{dotted name: host array}`` of ``tree`` (PRNG keys as their key data)."""
    import jax
    import jax.numpy as jnp
    from jaxnet.trees import named_leaves

    return {name: np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
                             else a) for name, a in named_leaves(tree)}


def record(results, prefix, arrays: dict[str, np.ndarray]):
    results.update((f"{prefix}/{name}", a) for name, a in arrays.items())


def metrics(history) -> dict[str, np.ndarray]:
    """``{metric: (epochs, members)}`` of the per-member lists of a history."""
    return {k: np.array([r[k] for r in history]) for k, v in history[0].items()
            if isinstance(v, list)}


def message(call) -> str:
    try:
        call()
    except ValueError as error:
        return str(error)
    return "no error"


def main(out_path):
    import jax
    import jax.numpy as jnp
    from jaxnet import inference, sharding
    from jaxnet.population import Ensemble, fit_population, init_population
    from jaxnet.trees import named_leaves

    net, optimizer, (x, y), members, fit, rules = setup()
    results = {"devices": np.array(jax.device_count())}
    start = init_population(net, optimizer, x[:1], **members)  # on one device
    record(results, "reference/initial", host(start))
    trained, history = fit_population(net, start, optimizer, (x, y), **fit)
    record(results, "reference/trained", host(trained))
    record(results, "reference/history", metrics(history))
    inputs = np.random.default_rng(1).normal(size=(ROWS, FEATURES)).astype(np.float32)
    one = trained.member(3).params
    results["reference/predict"] = inference.predict(net, one, inputs, batch_size=16)
    results["reference/proba"] = inference.predict_proba(net, one, inputs, batch_size=16)
    ensemble = Ensemble(net, MEMBERS)
    results["reference/ensemble"] = inference.predict(ensemble, trained.members.params, inputs,
                                                      batch_size=16, proba=True)

    for shape in MESHES:
        mesh = sharding.make_mesh(*shape)
        tag = "x".join(map(str, shape))
        # created on the mesh for 2x4x1; on the others, the one-device population is placed
        placed = (init_population(net, optimizer, x[:1], **members, mesh=mesh, rules=rules)
                  if shape == (2, 4, 1) else start)
        record(results, f"{tag}/initial", host(placed))
        pop, history = fit_population(net, placed, optimizer, (x, y), **fit, mesh=mesh,
                                      rules=rules)
        record(results, f"{tag}/trained", host(pop))
        record(results, f"{tag}/history", metrics(history))
        params = pop.members.params
        results[f"{tag}/shards"] = np.array([  # every param: its global and its shard shape
            f"{n} {tuple(a.shape)} {tuple(a.addressable_shards[0].data.shape)}"
            for n, a in named_leaves(params)])
        results[f"{tag}/specs"] = np.array([f"{n} {a.sharding.spec}"
                                            for n, a in named_leaves(pop)])
        results[f"{tag}/bytes"] = np.array(sorted(sharding.memory_per_device(
            (params, pop.members.opt_state)).values()))
        predict = dict(batch_size=16, mesh=mesh, rules=rules)
        results[f"{tag}/predict"] = inference.predict(net, one, inputs, **predict)
        results[f"{tag}/proba"] = inference.predict_proba(net, one, inputs, **predict)
        on_device = inference.predict(net, one, jnp.asarray(inputs), **predict)
        results[f"{tag}/on_device"] = np.asarray(on_device)
        results[f"{tag}/on_device_devices"] = np.array(len(on_device.sharding.device_set))
        # the trained population's params, already on the mesh: used as they are
        results[f"{tag}/ensemble"] = inference.predict(ensemble, params, inputs, proba=True,
                                                       batch_size=16, mesh=mesh)
        results[f"{tag}/kept_placed"] = np.array(inference._placed_params(params, mesh, None)
                                                 is params)

    # all members on member 0's batches (the shuffled epoch gathered once)
    shared = dict(fit, shared_order=True, eval_data=None, validation_data=None)
    for tag, mesh in (("reference", None), ("2x2x2", sharding.make_mesh(2, 2, 2))):
        pop, _ = fit_population(net, start, optimizer, (x, y), **shared, mesh=mesh,
                                rules=rules if mesh else None)
        record(results, f"shared/{tag}", host(pop))

    mesh = sharding.make_mesh(4, 2, 1)
    results["error/init"] = np.array(message(lambda: init_population(
        net, optimizer, x[:1], seeds=list(range(6)), mesh=mesh)))
    six = jax.tree.map(lambda a: a[:6], start)
    results["error/fit"] = np.array(message(
        lambda: fit_population(net, six, optimizer, (x, y), **fit, mesh=mesh)))
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
