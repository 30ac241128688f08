"""W4: a population of 16 tiny MLPs (the W2 network, 64-32-10, batch 32), 200 steps each.

The unit of work is one step of every member. Variants, the first being the reference:

- raw-JAX donated step, members one after another, in a Python loop;
- the raw step under ``jax.vmap`` over the members, in a Python loop;
- the same ``vmap`` inside one ``lax.scan`` over the steps: the hand-written population that
  ``fit_population`` is measured against; and the same with each member's own learning rate
  (``optax.inject_hyperparams``, as the jaxnet population below trains), the like-for-like
  reference;
- jaxnet's train step, members one after another, in a Python loop;
- jaxnet's ``fit`` epoch program (the device loop), members one after another;
- jaxnet's population epoch (``fit_population``): every member in one program, with one shared
  data order and with each member's own order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import Variant, loop_variant
from benchmarks.workloads import W2, mlp, raw_apply, raw_init, raw_update, weights
from jaxnet.losses import softmax_cross_entropy
from jaxnet.population import init_population, make_population_epoch
from jaxnet.train import make_epoch, make_train_step

SIZES, BATCH = W2, 32


def _data(steps: int):
    key = jax.random.key(0)
    x = jax.random.normal(key, (steps * BATCH, SIZES[0]), jnp.float32)
    y = jax.random.randint(key, (steps * BATCH,), 0, SIZES[-1])
    return x, y


def _sequential(name: str, step, states: list, steps: int) -> Variant:
    """``steps`` calls of ``step`` for each member in turn; one call of ``run`` per ``steps`` units."""
    def one_round(states):
        out = []
        for s in states:
            for _ in range(steps):
                s = step(s)
            out.append(s)
        return out

    return loop_variant(name, one_round, states, units_per_call=steps)


def _vmap_scan_variant(update, stacked, x, y, steps: int, suffix: str = "") -> Variant:
    """The hand-written population: the ``vmap`` of the raw step over the members inside one
    ``lax.scan`` over the ``steps`` batches of ``(x, y)`` in order, one jitted call."""
    members_step = jax.vmap(update, (0, 0, None, None))
    xs, ys = x.reshape(steps, BATCH, -1), y.reshape(steps, BATCH)

    def run(params, opt_state):
        def body(carry, batch):
            params, opt_state, loss = members_step(*carry, *batch)
            return (params, opt_state), loss
        return jax.lax.scan(body, (params, opt_state), (xs, ys))[0]

    scan = jax.jit(run, donate_argnums=(0, 1))
    return loop_variant(f"raw-jax vmap of the step in one lax.scan over {steps} steps{suffix}",
                        lambda s: scan(*s), stacked, units_per_call=steps)


def _with_learning_rates(optimizer, params: list, lrs) -> tuple:
    """The members' ``(params, opt_state)`` stacked, each optimizer state (of an
    ``optax.inject_hyperparams`` optimizer) with its member's learning rate."""
    states = []
    for p, lr in zip(params, lrs):
        opt_state = optimizer.init(jax.tree.map(jnp.copy, p))
        opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        states.append((jax.tree.map(jnp.copy, p), opt_state))
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def population_variants(members: int = 16, steps: int = 200) -> list[Variant]:
    """The W4 variants; ``run(k)`` trains every member for ``k`` steps (``k`` a multiple of ``steps``)."""
    x, y = _data(steps)
    xb, yb = x[:BATCH], y[:BATCH]
    lrs = np.geomspace(1e-3, 1e-2, members)
    keys = jax.random.split(jax.random.key(0), members)

    update = functools.partial(raw_update, optax.adam(1e-3), raw_apply)
    raw_step = jax.jit(update, donate_argnums=(0, 1))
    raw_states = [(p, optax.adam(1e-3).init(p)) for p in (raw_init(k, SIZES) for k in keys)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *raw_states)
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    lr_state = _with_learning_rates(optimizer, [p for p, _ in raw_states], lrs)  # before donation
    variants = [_sequential(f"raw-jax step loop, {members} one after another",
                            lambda s: raw_step(*s, xb, yb)[:2], raw_states, steps)]
    scan_state = jax.tree.map(jnp.copy, stacked)  # each variant donates its own
    vmapped = jax.jit(jax.vmap(update, (0, 0, None, None)), donate_argnums=(0, 1))
    variants.append(loop_variant("raw-jax vmap of the step, step loop",
                                 lambda s: vmapped(*s, xb, yb)[:2], stacked, units_per_call=1))
    variants.append(_vmap_scan_variant(update, scan_state, x, y, steps))
    variants.append(_vmap_scan_variant(functools.partial(raw_update, optimizer, raw_apply),
                                       lr_state, x, y, steps, ", per-member learning rates"))

    net = mlp(SIZES)
    population = init_population(net, optimizer, x[:1], seeds=list(range(members)),
                                 hyperparams={"learning_rate": lrs})
    member_states = [population.member(i) for i in range(members)]
    jn_step = make_train_step(net, optimizer)
    variants.append(_sequential(f"jaxnet train step loop, {members} one after another",
                                lambda s: jn_step(s, xb, yb)[0],
                                [jax.tree.map(jnp.copy, s) for s in member_states], steps))

    epoch_fn, _ = make_epoch(net, optimizer, softmax_cross_entropy, x.shape[0], BATCH)
    epoch = jax.jit(epoch_fn, donate_argnums=0)

    def fit_round(states):
        return [epoch(s, x, y, jnp.int32(0))[0] for s in states]

    variants.append(loop_variant(f"jaxnet fit (device loop), {members} one after another",
                                 fit_round, [jax.tree.map(jnp.copy, s) for s in member_states],
                                 units_per_call=steps))
    for shared in (True, False):
        population_epoch, _ = make_population_epoch(net, optimizer, softmax_cross_entropy,
                                                     x.shape[0], BATCH, shared_order=shared)
        run = jax.jit(population_epoch, donate_argnums=0)
        variants.append(loop_variant(
            f"jaxnet population, {'shared' if shared else 'own'} data order",
            lambda p, run=run: run(p, x, y, jnp.int32(0))[0], jax.tree.map(jnp.copy, population),
            units_per_call=steps))
    return variants


def flops_per_unit(members: int = 16) -> float:
    """Training FLOPs of one step of every member (3x the forward pass's matrix products)."""
    return 6 * BATCH * members * weights(SIZES)
