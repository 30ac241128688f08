"""``fit`` and ``evaluate`` on sharded meshes, and a sharded run killed and resumed; used by
tests/test_sharding_fit.py. Runs in a fresh process with 8 simulated CPU devices (the device
count is fixed when JAX's backend starts):

- ``python tests/sharding_fit_worker.py meshes OUT.npz``: an MLP and a small transformer LM
  trained by ``fit`` for 2 epochs on one device and on each mesh of ``MESHES`` (with
  ``rules``), and evaluated on each; writes params, losses, layouts to ``OUT.npz``;
- ``python tests/sharding_fit_worker.py killed CKPT_DIR``: ``fit`` on a 2x4 mesh with a
  ``Checkpointer`` every 2 steps, killed by SIGKILL right after the checkpoint of step 6
  (mid-epoch 2 of 3): the process never returns;
- ``python tests/sharding_fit_worker.py resume CKPT_DIR OUT.npz``: the latest checkpoint
  restored on the 2x4 mesh and on 2x2x2, each trained to the end, next to the uninterrupted
  run on 2x4.
"""

import os
import signal
import sys

import numpy as np

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8))
N, BATCH, TIME, VOCAB, EPOCHS = 64, 16, 8, 64, 2


def problems():
    """``{name: (net, loss, (x, y), (x_test, y_test))}``: the models and their data."""
    import jaxnet as jn
    from jaxnet.losses import softmax_cross_entropy, token_cross_entropy

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N + 16, 32)).astype(np.float32)
    y = x[:, :8].argmax(axis=1).astype(np.int32)
    tokens = rng.integers(0, VOCAB, size=(N + 16, TIME)).astype(np.int32)
    targets = np.roll(tokens, -1, axis=1)
    transformer = jn.TransformerLM(vocab_size=VOCAB, num_blocks=1, features=32, num_heads=8,
                                   max_length=TIME, tie_embeddings=False)
    return {"mlp": (jn.models.mlp((64, 64), 8), softmax_cross_entropy, (x[:N], y[:N]),
                    (x[N:], y[N:])),
            "transformer": (transformer, token_cross_entropy, (tokens[:N], targets[:N]),
                            (tokens[N:], targets[N:]))}


def rules():
    from jaxnet.sharding import ShardingRules
    return ShardingRules(fsdp_min_size=256)  # the small test models' weights are split too


def host(tree) -> dict[str, np.ndarray]:
    """Named host copies of the leaves (gathered from their shards; PRNG keys as key data)."""
    import jax
    from jaxnet.trees import named_leaves
    return {name: np.asarray(jax.random.key_data(a) if jax.dtypes.issubdtype(
        a.dtype, jax.dtypes.prng_key) else a) for name, a in named_leaves(tree)}


def train(net, loss, data, test, mesh=None, epochs=EPOCHS, params=None, callbacks=()):
    import jax
    import optax
    import jaxnet as jn

    if params is None:
        params = net.init(jax.random.key(0), data[0][:1])
    return jn.fit(net, params, optax.adam(1e-2), data, epochs=epochs, batch_size=BATCH,
                  loss=loss, eval_data=test, key=jax.random.key(1), progress=False, mesh=mesh,
                  rules=None if mesh is None else rules(), callbacks=callbacks)


def meshes(out_path):
    import jax
    import jaxnet as jn
    from jaxnet import sharding
    from jaxnet.trees import named_leaves

    results = {"devices": np.array(len(jax.devices()))}
    for name, (net, loss, data, test) in problems().items():
        state, history = train(net, loss, data, test)
        results.update({f"{name}/reference/{k}": v for k, v in host(state.params).items()})
        results[f"{name}/reference/losses"] = np.array([r["train_loss"] for r in history])
        results[f"{name}/reference/test_loss"] = np.array([r["test_loss"] for r in history])
        for shape in MESHES:
            tag = f"{name}/{'x'.join(map(str, shape))}"
            mesh = sharding.make_mesh(*shape)
            state, history = train(net, loss, data, test, mesh)
            results.update({f"{tag}/{k}": v for k, v in host(state.params).items()})
            results[f"{tag}/losses"] = np.array([r["train_loss"] for r in history])
            results[f"{tag}/test_loss"] = np.array([r["test_loss"] for r in history])
            results[f"{tag}/specs"] = np.array([f"{k} {a.sharding.spec}" for k, a in
                                                named_leaves(state)])
            results[f"{tag}/bytes"] = np.array(max(sharding.memory_per_device(
                (state.params, state.opt_state)).values()))
            results[f"{tag}/evaluate"] = np.array(jn.evaluate(
                net, state.params, test, loss=loss, mesh=mesh, rules=rules(),
                batch_size=BATCH)["loss"])
    np.savez(out_path, **results)


def killed(checkpoints):
    """Trains 3 epochs of 4 steps on 2x4, checkpointing every 2 steps; SIGKILL after step 6."""
    from jaxnet import sharding
    from jaxnet.train.callbacks import Checkpointer

    class Kill:
        every_steps = 2

        def on_step_end(self, step, record, state):
            if int(state.step) == 6:  # after the Checkpointer (listed first) saved step 6
                os.kill(os.getpid(), signal.SIGKILL)

        def on_epoch_end(self, record, state):
            return False

    net, loss, data, test = problems()["transformer"]
    train(net, loss, data, test, sharding.make_mesh(2, 4, 1), epochs=3,
          callbacks=[Checkpointer(checkpoints, every_steps=2, keep=2), Kill()])
    raise SystemExit("not killed")


def resume(checkpoints, out_path):
    import jax
    import optax
    from jaxnet import sharding
    from jaxnet.sharded_checkpoint import latest_sharded, list_sharded, restore_sharded
    from jaxnet.train import init_train_state

    net, loss, data, test = problems()["transformer"]
    whole, _ = train(net, loss, data, test, sharding.make_mesh(2, 4, 1), epochs=3)
    results = {"listed": np.array([p.name for p in list_sharded(checkpoints)])}
    results.update({f"uninterrupted/{k}": v for k, v in host(whole).items()})
    template = jax.eval_shape(lambda: init_train_state(
        net, optax.adam(1e-2), net.init(jax.random.key(0), data[0][:1]), key=jax.random.key(1)))
    for shape in ((2, 4, 1), (2, 2, 2)):
        mesh = sharding.make_mesh(*shape)
        specs = sharding.param_specs(template.params, mesh, rules())
        state, manifest = restore_sharded(latest_sharded(checkpoints), template, mesh, specs)
        tag = "x".join(map(str, shape))
        results[f"{tag}/restored_step"] = np.array(int(state.step))
        results[f"{tag}/record_step"] = np.array(manifest["metadata"]["record"]["step"])
        state, history = train(net, loss, data, test, mesh, epochs=3, params=state)
        results.update({f"{tag}/{k}": v for k, v in host(state).items()})
        results[f"{tag}/epochs"] = np.array([r["epoch"] for r in history])
    np.savez(out_path, **results)


if __name__ == "__main__":
    {"meshes": meshes, "killed": killed, "resume": resume}[sys.argv[1]](*sys.argv[2:])
