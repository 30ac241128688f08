"""The benchmark workloads: the hand-written raw-JAX references and jaxnet's variants.

Each builder returns a list of ``benchmarks.harness.Variant``, the reference first; the peer
libraries' variants are in ``benchmarks.peers`` and W4's in ``benchmarks.population``.

  W1: MLP 784-512-512-10, Adam, float32, batch 128 (and 1024): train steps per second.
  W2: MLP 64-32-10, batch 32: the same, all per-step overhead.
  W3: forward pass of the W1 MLP on 8192 inputs: samples per second.
  W5: CNN conv3x3(32)-relu-maxpool2-conv3x3(64)-relu-maxpool2-dense(128)-relu-dense(10) on
      28x28x1, batch 128, Adam: train steps per second (raw JAX with ``lax`` convolutions and
      ``reduce_window`` max-pool as the reference), and the forward pass on 8192 inputs.

W1 and W5 also train with bfloat16 products (:func:`bf16_variants`): jaxnet's ``"bf16"``
precision policy, and a raw-JAX step whose products take bfloat16 operands and accumulate in
float32 forward and backward (:func:`bf16_product`); :func:`matmul_variants` times the isolated
float32 and bfloat16 x bfloat16 -> float32 products, the limits of both.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import Variant, loop_variant
from jaxnet._xla import options as xla_options
from jaxnet.inference import predict
from jaxnet.losses import softmax_cross_entropy
from jaxnet.models import cnn
from jaxnet.nn.activations import relu
from jaxnet.nn.basic import Dense
from jaxnet.nn.combinators import serial
from jaxnet.train import init_train_state, make_epoch, make_train_step

W1, W2 = (784, 512, 512, 10), (64, 32, 10)


# ---- the hand-written raw-JAX reference: what a careful user writes without a library ----------

def raw_init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [(jax.random.normal(k, (m, n), jnp.float32) / np.sqrt(m), jnp.zeros((n,), jnp.float32))
            for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def plain_product(op, a, b):
    """``op(a, b)``: the float32 reference's products, for ``product=`` arguments."""
    return op(a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def bf16_product(op, a, b):
    """``op(a, b, preferred_element_type=float32)`` on bfloat16 copies of ``a`` and ``b``, as a
    careful user writes it: a custom VJP whose gradients are the float32 VJP of ``op`` at the
    rounded operands and the rounded output gradient, the same numbers as bfloat16-operand
    products accumulated in float32 (into which XLA:CPU turns them: it runs a bfloat16 dot with
    a transposed operand, and every bfloat16 convolution, in float32)."""
    return op(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def _bf16_product_fwd(op, a, b):
    return bf16_product(op, a, b), (a, b)


def _bf16_product_bwd(op, residuals, g):
    rounded = [v.astype(jnp.bfloat16).astype(v.dtype) for v in (*residuals, g)]
    return jax.vjp(op, *rounded[:2])[1](rounded[2])


bf16_product.defvjp(_bf16_product_fwd, _bf16_product_bwd)


def raw_apply(params, x, product=plain_product):
    for w, b in params[:-1]:
        x = jax.nn.relu(product(jnp.matmul, x, w) + b)
    w, b = params[-1]
    return product(jnp.matmul, x, w) + b


def raw_update(optimizer, apply, params, opt_state, x, y):
    loss, grads = jax.value_and_grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean())(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def raw_variant(apply, params, x, y, *, donate: bool = True,
                compiler_options: dict | None = None) -> Variant:
    """The reference: a hand-written Adam step, jitted with donated buffers, in a Python loop
    (``donate=False``: the same without donation, the baseline peers are usually compared with;
    ``compiler_options``: XLA options for this program, e.g. ``{"xla_cpu_multi_thread_eigen":
    False}``)."""
    optimizer = optax.adam(1e-3)
    step = jax.jit(functools.partial(raw_update, optimizer, apply),
                   donate_argnums=(0, 1) if donate else (), compiler_options=compiler_options)
    name = "raw-jax step (donated)" if donate else "raw-jax step (no donation)"
    return loop_variant(name, lambda s: step(*s, x, y)[:2], (params, optimizer.init(params)))


def scan_updates(update, params, opt_state, xs, ys):
    """``update`` (:func:`raw_update` with its optimizer and apply bound) under ``lax.scan`` over
    the batches ``xs: (length, batch, ...)``, ``ys: (length, batch)``: ``(params, opt_state)``."""
    def body(carry, batch):
        params, opt_state, loss = update(*carry, *batch)
        return (params, opt_state), loss
    return jax.lax.scan(body, (params, opt_state), (xs, ys))[0]


def raw_scan_variant(apply, params, x, y, length: int, compiler_options: dict | None = None
                     ) -> Variant:
    """The raw Adam step under ``lax.scan`` over ``length`` resident batches in one jitted call."""
    optimizer = optax.adam(1e-3)
    steps = functools.partial(scan_updates, functools.partial(raw_update, optimizer, apply))
    scan = jax.jit(steps, donate_argnums=(0, 1), compiler_options=compiler_options)
    xs, ys = jnp.stack([x] * length), jnp.stack([y] * length)
    return loop_variant(f"raw-jax lax.scan over {length} steps", lambda s: scan(*s, xs, ys),
                        (params, optimizer.init(params)), units_per_call=length)


def raw_shuffled_epoch(optimizer, apply, length: int, batch: int):
    """``epoch(params, opt_state, key, xs, ys) -> (params, opt_state)``: the raw step under
    ``lax.scan`` over ``xs, ys`` (``length * batch`` examples) shuffled by
    ``jax.random.permutation(key)``, one gather, cut into ``length`` batches: what a careful
    user writes for a shuffled epoch on the device."""
    update = functools.partial(raw_update, optimizer, apply)

    def epoch(params, opt_state, key, xs, ys):
        order = jax.random.permutation(key, xs.shape[0]).reshape(length, batch)
        return scan_updates(update, params, opt_state, xs[order], ys[order])
    return epoch


def raw_shuffled_scan_variant(apply, params, x, y, length: int) -> Variant:
    """:func:`raw_shuffled_epoch` over ``x`` and ``y`` repeated ``length`` times (as fit's
    variant trains on), shuffled anew in every call, jitted with donated buffers and XLA's
    default options, as :func:`raw_scan_variant` is in :func:`train_variants`."""
    optimizer = optax.adam(1e-3)
    run = jax.jit(raw_shuffled_epoch(optimizer, apply, length, x.shape[0]), donate_argnums=(0, 1))
    xs, ys = jnp.concatenate([x] * length), jnp.concatenate([y] * length)

    def step(s):  # s: (params, opt_state, epoch number)
        return (*run(s[0], s[1], jax.random.fold_in(jax.random.key(1), s[2]), xs, ys), s[2] + 1)

    return loop_variant(f"raw-jax lax.scan over {length} steps of a shuffled epoch", step,
                        (params, optimizer.init(params), 0), units_per_call=length)


def mlp(sizes):
    layers = []
    for width in sizes[1:-1]:
        layers += [Dense(width), relu]
    return serial(*layers, Dense(sizes[-1]))


def mlp_batch(sizes, batch):
    """The batch every MLP variant trains on: ``x: (batch, sizes[0]) float32``, ``y: (batch,)``."""
    key = jax.random.key(0)
    return (jax.random.normal(key, (batch, sizes[0]), jnp.float32),
            jax.random.randint(key, (batch,), 0, sizes[-1]))


def train_variants(sizes, batch, steps_per_call) -> list[Variant]:
    """Raw-JAX step loop (the reference, first), the same without donation, under ``lax.scan``
    over ``steps_per_call`` steps (as many as fit's device loop runs per call) and over a
    shuffled epoch of as many steps, jaxnet's step loop and fit's device loop, all on
    ``mlp_batch(sizes, batch)``."""
    key = jax.random.key(0)
    x, y = mlp_batch(sizes, batch)
    return [raw_variant(raw_apply, raw_init(key, sizes), x, y),
            raw_variant(raw_apply, raw_init(key, sizes), x, y, donate=False),
            raw_scan_variant(raw_apply, raw_init(key, sizes), x, y, steps_per_call),
            raw_shuffled_scan_variant(raw_apply, raw_init(key, sizes), x, y, steps_per_call),
            *jaxnet_train_variants(mlp(sizes), x, y, steps_per_call)]


def workload_name(sizes, batch) -> str:
    return {W1: "W1", W2: "W2"}.get(tuple(sizes), "MLP") + (
        f" MLP {'-'.join(map(str, sizes))} b{batch}")


def weights(sizes) -> int:
    """The MLP's weight count (biases left out): its train step is ``6 * batch * weights``
    FLOPs, its forward pass ``2 * weights`` per example."""
    return sum(m * n for m, n in zip(sizes[:-1], sizes[1:]))


def jaxnet_train_variants(net, x, y, steps_per_call, precision: str | None = None
                          ) -> list[Variant]:
    """jaxnet's train step in a Python loop, and fit's epoch program over resident data, with
    the ``precision`` policy (its name ends the variants' names)."""
    key = jax.random.key(0)
    batch = x.shape[0]
    optimizer = optax.adam(1e-3)
    params = net.init(key, x[:1])
    suffix = "" if precision is None else f" {precision}"
    # donates its state: the step gets a copy
    jn_step = make_train_step(net, optimizer, precision=precision)
    step = loop_variant(f"jaxnet train step{suffix}", lambda s: jn_step(s, x, y)[0],
                        init_train_state(net, optimizer, jax.tree.map(jnp.copy, params)))

    # fit's epoch program over a resident data set of steps_per_call batches
    xs = jnp.concatenate([x] * steps_per_call)
    ys = jnp.concatenate([y] * steps_per_call)
    epoch_fn, _ = make_epoch(net, optimizer, softmax_cross_entropy, xs.shape[0], batch,
                             precision=precision)
    epoch = fit_program(epoch_fn)

    def run_epoch(s):  # s: (TrainState, epoch number)
        return epoch(s[0], xs, ys, jnp.int32(s[1]))[0], s[1] + 1

    fit = loop_variant(f"jaxnet fit (device loop){suffix}", run_epoch,
                       (init_train_state(net, optimizer, params), 0),
                       units_per_call=steps_per_call)
    return [step, fit]


def fit_program(epoch_fn):
    """``epoch_fn`` compiled as ``fit`` compiles it (``jaxnet._xla.options.compile``), at its
    first call, so that the variant's compile time counts it."""
    compiled = []

    def epoch(*args):
        if not compiled:
            compiled.append(xla_options.compile(xla_options.jit(epoch_fn, donate_argnums=0),
                                                *args))
        return compiled[0](*args)
    return epoch


def bf16_variants(raw_apply_fn, raw_params, net, x, y, steps_per_call) -> list[Variant]:
    """Training with bfloat16 products: the raw-JAX donated step on ``raw_apply_fn(params, x,
    product=bf16_product)``, and jaxnet's step loop and fit's device loop under
    ``precision="bf16"``."""
    raw = raw_variant(functools.partial(raw_apply_fn, product=bf16_product), raw_params, x, y)
    return ([dataclasses.replace(raw, name="raw-jax step (donated) bf16")]
            + jaxnet_train_variants(net, x, y, steps_per_call, precision="bf16"))


def mlp_bf16_variants(sizes, batch, steps_per_call) -> list[Variant]:
    """:func:`bf16_variants` of the MLP on ``mlp_batch(sizes, batch)``."""
    x, y = mlp_batch(sizes, batch)
    return bf16_variants(raw_apply, raw_init(jax.random.key(0), sizes), mlp(sizes), x, y,
                         steps_per_call)


MATMUL_SHAPES = ((2048, 2048, 2048), (25088, 288, 64))  # square; W5's conv2 as a product


def matmul_variants(m: int, k: int, n: int) -> list[Variant]:
    """The isolated jitted product ``(m, k) @ (k, n)`` in float32 (the reference), and on
    bfloat16 operands with a float32 result (``preferred_element_type``), the form of jaxnet's
    ``"bf16"`` products: the limits of both. One unit is one product."""
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
    dot = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
    return [_product_variant(f"jnp.dot {name}", dot, a.astype(dtype), b.astype(dtype))
            for name, dtype in (("float32", jnp.float32), ("bf16 -> float32", jnp.bfloat16))]


def _product_variant(name, dot, a, b) -> Variant:
    return loop_variant(name, lambda _: dot(a, b), None)


def inference_variants(raw_apply_fn, raw_params, net, x) -> list[Variant]:
    """A hand-written jitted forward pass (reference) against ``jaxnet.predict`` on ``x``."""
    raw = jax.jit(raw_apply_fn)
    params = net.init(jax.random.key(0), x[:1])
    return [loop_variant("raw-jax jit apply", lambda _: raw(raw_params, x), None),
            loop_variant("jaxnet predict",
                         lambda _: predict(net, params, x, batch_size=x.shape[0]), None)]


CNN_FLOPS_PER_EXAMPLE = 2 * (28 * 28 * 32 * 9 + 14 * 14 * 64 * 9 * 32 + 3136 * 128 + 128 * 10)


def raw_cnn_init(key):
    k = jax.random.split(key, 4)
    scale = lambda fan_in: 1 / np.sqrt(fan_in)
    return {"c1": (jax.random.normal(k[0], (3, 3, 1, 32)) * scale(9), jnp.zeros(32)),
            "c2": (jax.random.normal(k[1], (3, 3, 32, 64)) * scale(288), jnp.zeros(64)),
            "d1": (jax.random.normal(k[2], (3136, 128)) * scale(3136), jnp.zeros(128)),
            "d2": (jax.random.normal(k[3], (128, 10)) * scale(128), jnp.zeros(10))}


_same_conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))


def raw_cnn_apply(params, x, product=plain_product):
    """The CNN written directly with ``lax``: what the issue's raw-JAX figures measured."""
    def conv(x, wb):
        return product(_same_conv, x, wb[0]) + wb[1]

    def pool(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    x = pool(jax.nn.relu(conv(x, params["c1"])))
    x = pool(jax.nn.relu(conv(x, params["c2"])))
    x = jax.nn.relu(product(jnp.matmul, x.reshape(x.shape[0], -1), params["d1"][0]) + params["d1"][1])
    return product(jnp.matmul, x, params["d2"][0]) + params["d2"][1]


def cnn_variants(batch: int, steps_per_call: int, bf16: bool = False) -> list[Variant]:
    """The raw-JAX CNN step loop (the reference), jaxnet's step loop and fit's device loop;
    with ``bf16``, then :func:`bf16_variants` of the same."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, 28, 28, 1), jnp.float32)
    y = jax.random.randint(key, (batch,), 0, 10)
    variants = ([raw_variant(raw_cnn_apply, raw_cnn_init(key), x, y)]
                + jaxnet_train_variants(cnn(10), x, y, steps_per_call))
    if bf16:
        variants += bf16_variants(raw_cnn_apply, raw_cnn_init(key), cnn(10), x, y, steps_per_call)
    return variants
