"""Sharded training and checkpoints on simulated CPU devices; used by tests/test_sharding.py.

The number of CPU devices is fixed when JAX's backend starts (``XLA_FLAGS`` from the test), so
these runs happen in fresh processes:

- ``python tests/sharding_worker.py meshes OUT.npz CKPT_DIR`` (8 devices): a small transformer
  and an MLP trained for a few steps on one device (the plain ``make_train_step``) and on the
  meshes ``MESHES``; bytes per device; a sharded checkpoint saved on 2x4 and restored on 1x8
  and 8x1, then trained one more step;
- ``python tests/sharding_worker.py cluster OUT.npz CKPT_DIR COORDINATOR PROCESS_ID`` (4
  devices in each of 2 processes): sharded training on a 2x2x2 mesh spanning both processes,
  a checkpoint both save, restored on 1x4x2; process 0 writes the results.

Everything is written to ``OUT.npz`` for the test to compare.
"""

import functools
import sys

import numpy as np

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8))
STEPS, BATCH, TIME, VOCAB = 3, 16, 8, 64


def models():
    import jaxnet as jn
    from jaxnet.losses import softmax_cross_entropy, token_cross_entropy

    transformer = jn.TransformerLM(vocab_size=VOCAB, num_blocks=1, features=32, num_heads=8,
                                   max_length=TIME, tie_embeddings=False)
    mlp = jn.models.mlp((64, 64), 8)
    return {"transformer": (transformer, token_cross_entropy, tokens),
            "mlp": (mlp, softmax_cross_entropy, features)}


def tokens(step):
    rng = np.random.default_rng(step)
    x = rng.integers(0, VOCAB, size=(BATCH, TIME)).astype(np.int32)
    return x, np.roll(x, -1, axis=1)


def features(step):
    rng = np.random.default_rng(100 + step)
    x = rng.normal(size=(BATCH, 32)).astype(np.float32)
    return x, (x[:, :8].argmax(axis=1)).astype(np.int32)


def rules():
    from jaxnet.sharding import ShardingRules
    return ShardingRules(fsdp_min_size=256)  # the small test models' weights are split too


OPTIMIZER_LR = 1e-2


@functools.cache
def builder(net, x_shape: tuple[int, ...], x_dtype: str):
    """A compiled ``key -> TrainState`` from ``net.init`` on one device, compiled once."""
    import jax
    import optax
    from jaxnet.train import init_train_state

    x = jax.ShapeDtypeStruct(x_shape, x_dtype)
    return jax.jit(lambda key: init_train_state(net, optax.adam(OPTIMIZER_LR), net.init(key, x)))


def fresh_state(net, batches):
    """A new ``TrainState`` from ``net.init`` on one device."""
    import jax
    x = batches(0)[0][:1]
    return builder(net, x.shape, x.dtype.name)(jax.random.key(0))


def reference(net, loss, batches, steps=STEPS):
    """``steps`` steps on one device with the plain train step: ``{"initial": the params,
    "state": the host arrays after STEPS steps, "state_<steps>": after steps}``, and the
    losses."""
    import optax
    from jaxnet.train import make_train_step

    state = fresh_state(net, batches)
    step = make_train_step(net, optax.adam(OPTIMIZER_LR), loss)
    losses, states = [], {"initial": host(state.params)}
    for i in range(steps):
        state, metrics = step(state, *batches(i))
        losses.append(float(metrics["loss"]))
        if i + 1 in (STEPS, steps):  # as host arrays: the next step donates the state
            states["state" if i + 1 == STEPS else f"state_{steps}"] = host(state)
    return states, np.array(losses)


_STEPS: dict = {}


def train_step(net, loss, mesh):
    """The sharded step of a model on a mesh, made (and compiled) once; it keeps the layout of
    the state it is given, placed by ``init_sharded``, ``shard_state`` or a restore."""
    import optax
    from jaxnet.train import make_train_step
    key = (net, loss, mesh)
    if key not in _STEPS:
        _STEPS[key] = make_train_step(net, optax.adam(OPTIMIZER_LR), loss, mesh=mesh,
                                      rules=rules())
    return _STEPS[key]


def sharded(net, loss, batches, mesh, steps=STEPS, state=None, specs=None, first=0):
    """``steps`` sharded steps from ``state``, by default a fresh one: created sharded by
    ``init_sharded`` on a 2x4 mesh, placed by ``shard_state`` on the others. Returns
    ``(state, specs, losses, the initial params as host arrays)``."""
    import jax
    import optax
    from jaxnet import sharding
    from jaxnet.train import init_sharded

    if state is None and dict(mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}:
        state, specs = init_sharded(net, optax.adam(OPTIMIZER_LR), jax.random.key(0),
                                    batches(0)[0][:1], mesh, rules())
    elif state is None:
        state = fresh_state(net, batches)
        specs = sharding.param_specs(state.params, mesh, rules())
        state = sharding.shard_state(state, mesh, specs)
    initial = host(state.params)  # before the step donates them
    step = train_step(net, loss, mesh)
    losses = []
    for i in range(first, first + steps):
        state, metrics = step(state, *batches(i))
        losses.append(float(metrics["loss"]))
    return state, specs, np.array(losses), initial


def host(tree) -> dict[str, np.ndarray]:
    """``{dotted name: host array}`` of ``tree`` (PRNG keys as key data)."""
    from jaxnet.sharded_checkpoint import _storable
    return {name: np.asarray(a) for name, a in _storable(tree)[0].items()}


def record(results, prefix, arrays: dict[str, np.ndarray]):
    results.update((f"{prefix}/{name}", a) for name, a in arrays.items())


def abstract(tree):
    import jax
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def meshes(out_path, checkpoints):
    import jax
    from jaxnet import sharding
    from jaxnet.sharded_checkpoint import restore_sharded, save_sharded
    from jaxnet.trees import named_leaves

    results = {"devices": np.array(jax.device_count())}
    for name, (net, loss, batches) in models().items():
        states, losses = reference(net, loss, batches, STEPS + 1)
        for suffix, arrays in states.items():
            record(results, f"{name}/reference/{suffix}", arrays)
        results[f"{name}/reference/losses"] = losses[:STEPS]
        for shape in MESHES:
            mesh = sharding.make_mesh(*shape)
            tag = f"{name}/{'x'.join(map(str, shape))}"
            state, specs, losses, initial = sharded(net, loss, batches, mesh)
            if shape == (2, 4, 1):  # created sharded: the same values as net.init
                record(results, f"{tag}/initial", initial)
            record(results, f"{tag}/state", host(state))
            results[f"{tag}/losses"] = losses
            trained = (state.params, state.opt_state)
            results[f"{tag}/bytes"] = np.array(sorted(sharding.memory_per_device(trained).values()))
            shapes_only = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                      sharding=a.sharding), trained)
            results[f"{tag}/abstract_bytes"] = np.array(sorted(
                sharding.memory_per_device(shapes_only).values()))
            results[f"{tag}/specs"] = np.array([f"{n} {s}" for n, s in named_leaves(
                sharding.state_specs(state, specs))])
            results[f"{tag}/shards"] = np.array([  # every leaf: its global and its shard shape
                f"{n} {tuple(a.shape)} {tuple(a.addressable_shards[0].data.shape)}"
                for n, a in named_leaves(trained)])
            if name == "transformer" and shape == (2, 4, 1):
                path = save_sharded(checkpoints, state, metadata={"mesh": "2x4x1"})
                saved = state
    # restored on other meshes and trained one more step: as the one-device run goes on
    net, loss, batches = models()["transformer"]
    template = abstract(saved)
    for shape in ((1, 8, 1), (8, 1, 1)):
        mesh = sharding.make_mesh(*shape)
        specs = sharding.param_specs(template.params, mesh, rules())
        restored, manifest = restore_sharded(path, template, mesh, specs)
        tag = f"transformer/restored_{'x'.join(map(str, shape))}"
        record(results, f"{tag}/state", host(restored))
        results[f"{tag}/spec"] = np.array(str(
            restored.opt_state[0].mu["block_1"]["mlp"]["in"]["w"].sharding.spec))
        continued, *_ = sharded(net, loss, batches, mesh, 1, restored, specs, STEPS)
        record(results, f"{tag}/continued", host(continued))
    resharded = sharding.shard_state(saved, sharding.make_mesh(1, 1, 8), sharding.param_specs(
        template.params, sharding.make_mesh(1, 1, 8), rules()))  # from 2x4, device to device
    record(results, "transformer/resharded_1x1x8/state", host(resharded))
    results["transformer/resharded_1x1x8/spec"] = np.array(str(
        resharded.opt_state[0].nu["block_1"]["mlp"]["in"]["w"].sharding.spec))
    results["damaged"] = np.array(damaged_outcomes(path, template, mesh))
    results["manifest_step"] = np.array(manifest["step"])
    results["manifest_mesh"] = np.array(str(manifest["mesh"]))
    np.savez(out_path, **results)


def damaged_outcomes(path, template, mesh) -> list[str]:
    """Restores of copies of ``path``, each with one byte flipped in one of its two largest
    files of array data (OCDBT's ``d/`` directories), at 10%, 30%, ... 90% of the file: for
    each, ``"error: <message>"``, ``"intact"`` (the values read equal the saved ones: the byte
    was in a part of the file no read touched) or ``"WRONG VALUES"``.

    A read that Orbax fails ends its event loop while other reads are in flight, whose late
    callbacks then report "Event loop is closed" to stderr. Harmless here, so this runs in the
    worker rather than in the pytest process, where they would be charged to whichever test
    runs when they arrive.
    """
    import shutil
    from jaxnet.sharded_checkpoint import CheckpointError, restore_sharded

    saved, _ = restore_sharded(path, template, mesh)
    saved = host(saved)
    data = sorted((p for p in path.rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)[-2:]
    outcomes = []
    for i, original in enumerate(data):
        for fraction in (0.1, 0.3, 0.5, 0.7, 0.9):
            copy = path.with_name(f"damaged-{i}-{fraction}")
            shutil.copytree(path, copy)
            damaged = copy / original.relative_to(path)
            raw = bytearray(damaged.read_bytes())
            raw[int(len(raw) * fraction)] ^= 0xFF
            damaged.write_bytes(bytes(raw))
            try:
                restored, _ = restore_sharded(copy, template, mesh)
            except CheckpointError as error:
                outcomes.append(f"error: {str(error).removeprefix(str(copy))}")
                continue
            same = all(np.array_equal(a, saved[name]) for name, a in host(restored).items())
            outcomes.append("intact" if same else "WRONG VALUES")
    return outcomes


def cluster(out_path, checkpoints, coordinator, process_id):
    """One of two processes: train on a 2x2x2 mesh over both, save, restore on 1x4x2."""
    from jaxnet import data_parallel
    data_parallel.initialize(coordinator, 2, int(process_id))
    import jax  # noqa: PLC0415 - after initialize
    from jax.experimental import multihost_utils
    from jaxnet import sharding
    from jaxnet.sharded_checkpoint import restore_sharded, save_sharded

    net, loss, batches = models()["transformer"]
    mesh = sharding.make_mesh(2, 2, 2)
    state, specs, losses, _ = sharded(net, loss, batches, mesh)
    gather = lambda tree: multihost_utils.process_allgather(tree, tiled=True)  # noqa: E731
    trained = gather(state.params)
    path = save_sharded(checkpoints, state)
    other = sharding.make_mesh(1, 4, 2)
    template = abstract(state)
    restored, _ = restore_sharded(path, template, other,
                                  sharding.param_specs(template.params, other, rules()))
    results = {"processes": np.array(jax.process_count()), "losses": losses,
               "restored_spec": np.array(str(restored.params["block_1"]["mlp"]["in"]["w"]
                                             .sharding.spec)),
               "local_devices": np.array(jax.local_device_count())}
    record(results, "trained", host(trained))
    record(results, "restored", host(gather(restored.params)))
    if jax.process_index() == 0:
        states, reference_losses = reference(net, loss, batches)
        record(results, "reference", {name.removeprefix("params."): a for name, a in
                                      states["state"].items() if name.startswith("params.")})
        results["reference_losses"] = reference_losses
        np.savez(out_path, **results)


if __name__ == "__main__":
    {"meshes": meshes, "cluster": cluster}[sys.argv[1]](*sys.argv[2:])
