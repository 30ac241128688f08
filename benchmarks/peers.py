"""Peer libraries on jaxnet's benchmark workloads: Flax NNX, Equinox, Haiku and PyTorch.

Each peer is written the way its own documentation recommends, neither handicapped nor tuned
beyond that: Flax NNX with an ``nnx.Optimizer`` and an ``nnx.jit`` train step; Equinox with
``eqx.nn.MLP`` (one example, ``jax.vmap`` over the batch), ``eqx.filter_value_and_grad`` and
``eqx.filter_jit``; Haiku with ``hk.transform`` of ``hk.nets.MLP`` and a ``jax.jit`` update;
PyTorch eager with ``torch.optim.Adam(fused=True)``, and ``torch.inference_mode`` for inference.
All train with Adam (learning rate 1e-3) on softmax cross-entropy, float32, like the raw-JAX
reference in ``benchmarks.workloads``. Next to jaxnet's bfloat16 variants (W1, W5), PyTorch also
trains under ``torch.autocast("cpu", dtype=torch.bfloat16)``: the forward pass's matrix products
and convolutions on bfloat16 operands, the backward pass outside the context as PyTorch
recommends, float32 params and optimizer.

The peers are optional (``pip install -e ".[peers]"``). A peer whose package is missing is
skipped: the builders return no variant for it and add a note to ``skipped``.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import jax
import numpy as np
import optax

from benchmarks.harness import Variant, loop_variant

INSTALL_HINT = "pip install -e '.[peers]'"


def _hidden_width(sizes) -> int:
    """The one hidden width of an MLP ``(in, h, ..., h, out)``, as Equinox's ``MLP`` needs."""
    if len(sizes) < 3 or len(set(sizes[1:-1])) != 1:
        raise ValueError(f"sizes must be (in, h, ..., h, out) with one hidden width h; got {sizes}")
    return sizes[1]


def _cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# ---- Flax NNX ------------------------------------------------------------------------------------

def _nnx_model(sizes):
    from flax import nnx

    rngs, layers = nnx.Rngs(0), []
    for m, n in zip(sizes[:-2], sizes[1:-1]):
        layers += [nnx.Linear(m, n, rngs=rngs), nnx.relu]
    return nnx.Sequential(*layers, nnx.Linear(sizes[-2], sizes[-1], rngs=rngs))


def nnx_train(sizes, x, y) -> Variant:
    import flax
    from flax import nnx

    model = _nnx_model(sizes)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: _cross_entropy(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    return loop_variant(f"flax {flax.__version__} nnx.jit", lambda _: train_step(model, optimizer, x, y),
                        None)


def nnx_apply(sizes, x) -> Variant:
    import flax
    from flax import nnx

    model, forward = _nnx_model(sizes), nnx.jit(lambda model, x: model(x))
    return loop_variant(f"flax {flax.__version__} nnx.jit apply", lambda _: forward(model, x), None)


# ---- Equinox -------------------------------------------------------------------------------------

def _equinox_model(sizes):
    import equinox as eqx

    return eqx.nn.MLP(sizes[0], sizes[-1], _hidden_width(sizes), len(sizes) - 2,
                      activation=jax.nn.relu, key=jax.random.key(0))


def equinox_train(sizes, x, y) -> Variant:
    import equinox as eqx

    optimizer = optax.adam(1e-3)
    model = _equinox_model(sizes)

    @eqx.filter_jit
    def make_step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(lambda m: _cross_entropy(jax.vmap(m)(x), y))(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    return loop_variant(f"equinox {eqx.__version__} filter_jit",
                        lambda s: make_step(*s, x, y)[:2],
                        (model, optimizer.init(eqx.filter(model, eqx.is_array))))


def equinox_apply(sizes, x) -> Variant:
    import equinox as eqx

    model, forward = _equinox_model(sizes), eqx.filter_jit(lambda model, x: jax.vmap(model)(x))
    return loop_variant(f"equinox {eqx.__version__} filter_jit apply", lambda _: forward(model, x),
                        None)


# ---- Haiku ---------------------------------------------------------------------------------------

def _haiku_model(sizes, x):
    import haiku as hk

    net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP(sizes[1:])(x)))
    return net, net.init(jax.random.key(0), x)


def haiku_train(sizes, x, y) -> Variant:
    import haiku as hk

    net, params = _haiku_model(sizes, x)
    optimizer = optax.adam(1e-3)

    @jax.jit
    def update(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: _cross_entropy(net.apply(p, x), y))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return loop_variant(f"haiku {hk.__version__} transform + jax.jit",
                        lambda s: update(*s, x, y)[:2], (params, optimizer.init(params)))


def haiku_apply(sizes, x) -> Variant:
    import haiku as hk

    net, params = _haiku_model(sizes, x)
    forward = jax.jit(net.apply)
    return loop_variant(f"haiku {hk.__version__} jax.jit apply", lambda _: forward(params, x), None)


# ---- PyTorch -------------------------------------------------------------------------------------

def _torch_mlp(sizes):
    import torch

    torch.manual_seed(0)
    layers = []
    for m, n in zip(sizes[:-2], sizes[1:-1]):
        layers += [torch.nn.Linear(m, n), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-2], sizes[-1]))


def torch_train_variant(model, x, y, autocast: bool = False, name: str | None = None
                        ) -> Variant:
    """PyTorch eager training of ``model`` (logits ``(n, classes)``) on the NumPy-convertible
    batch ``x, y`` (labels flattened to ``(n,)``), fused Adam; with ``autocast``, the forward
    pass and loss under ``torch.autocast("cpu", bfloat16)``. ``name``: instead of the default
    ``pytorch <version> eager|autocast bf16, fused adam``."""
    import contextlib

    import torch

    optimizer = torch.optim.Adam(model.parameters(), 1e-3, fused=True)
    x, y = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y, np.int64).reshape(-1))
    forward = (functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16) if autocast
               else contextlib.nullcontext)

    def step(_):
        optimizer.zero_grad(set_to_none=True)
        with forward():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    mode = "autocast bf16" if autocast else "eager"
    return loop_variant(name or f"pytorch {torch.__version__} {mode}, fused adam", step, None)


def torch_train(sizes, x, y) -> Variant:
    return torch_train_variant(_torch_mlp(sizes), x, y)


def torch_mlp_variants(workload: str, sizes, x, y, skipped: list[dict], *,
                       eager: bool = True) -> list[Variant]:
    """PyTorch on the MLP ``sizes``: eager float32 (unless ``eager=False``, when the peers
    already run it) and ``torch.autocast`` bfloat16; one note in ``skipped`` without PyTorch."""
    reason = missing_module("torch")
    if reason is not None:
        skipped.append({"workload": workload, "variant": "pytorch autocast", "reason": reason})
        return []
    return (([torch_train(sizes, x, y)] if eager else [])
            + [torch_train_variant(_torch_mlp(sizes), x, y, autocast=True)])


def torch_apply(sizes, x) -> Variant:
    import torch

    model, x = _torch_mlp(sizes), torch.from_numpy(np.array(x))

    def forward(_):
        with torch.inference_mode():
            return model(x)

    return loop_variant(f"pytorch {torch.__version__} eager, inference_mode", forward, None)


def torch_cnn_variants(batch: int, bf16: bool = False) -> list[Variant]:
    """PyTorch eager (fused Adam) on W5's CNN (``benchmarks.workloads.cnn_variants``) at
    ``batch``, and with ``bf16`` the same under ``torch.autocast``, when PyTorch is installed;
    no variant, and no note, when it is not."""
    try:
        import torch
    except ImportError:
        return []

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(3136, 128), torch.nn.ReLU(),
            torch.nn.Linear(128, 10))

    x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28), np.float32)
    y = np.random.default_rng(1).integers(0, 10, batch)
    return [torch_train_variant(model(), x, y, autocast=autocast)
            for autocast in ((False, True) if bf16 else (False,))]


# ---- building the variants, skipping missing packages ------------------------------------------

# (peer, the module it needs, train-step builder, forward-pass builder)
PEERS: tuple[tuple[str, str, Callable, Callable], ...] = (
    ("flax nnx", "flax", nnx_train, nnx_apply),
    ("equinox", "equinox", equinox_train, equinox_apply),
    ("haiku", "haiku", haiku_train, haiku_apply),
    ("pytorch", "torch", torch_train, torch_apply),
)


def missing_module(module: str) -> str | None:
    """None when ``module`` imports, else why not (``"flax not installed (pip install ...)"``)."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        return f"{module} not installed or not importable ({error}); {INSTALL_HINT}"
    return None


def _build(workload: str, skipped: list[dict], which: int, *args) -> list[Variant]:
    variants = []
    for peer, module, *builders in PEERS:
        reason = missing_module(module)
        if reason is None:
            variants.append(builders[which](*args))
        else:
            skipped.append({"workload": workload, "variant": peer, "reason": reason})
    return variants


def peer_train_variants(workload: str, sizes, x, y, skipped: list[dict]) -> list[Variant]:
    """Each installed peer's train step on the MLP ``sizes`` and the batch ``x: (batch, sizes[0])
    float32``, ``y: (batch,) int32``; one note in ``skipped`` for each peer that is missing."""
    return _build(workload, skipped, 0, sizes, x, y)


def peer_inference_variants(workload: str, sizes, x, skipped: list[dict]) -> list[Variant]:
    """Each installed peer's jitted (PyTorch: ``inference_mode``) forward pass of the MLP ``sizes``
    on ``x: (n, sizes[0]) float32``; one note in ``skipped`` for each peer that is missing."""
    return _build(workload, skipped, 1, sizes, x)
