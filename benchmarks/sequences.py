"""The sequence-model workloads: W6 (a causal transformer language model) and W7 (an LSTM).

Each builder returns a list of ``benchmarks.harness.Variant``, the hand-written raw-JAX
reference first, then jaxnet's, then PyTorch's (when it is installed):

  W6: causal transformer LM over bytes: 4 pre-norm blocks, d_model 256, 4 heads, GELU MLP of
      width 1024, learned positions, tied embeddings, sequence 128, batch 32, Adam: train steps
      (``benchmarks/run.py`` reports tokens, steps times 4096, per second). PyTorch runs eager
      and under ``torch.compile`` (its compile time is the variant's first-call time; skipped
      with ``torch_compile=False`` or when it fails).
  W7: LSTM hidden 256 over 28 steps of 28 features, batch 128, then Dense(10), Adam: train
      steps per second.

``TransformerSizes`` and ``LSTMSizes`` hold the sizes, so that tests run the same code small.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import Variant, loop_variant
from benchmarks.peers import missing_module, torch_train_variant
from benchmarks.workloads import fit_program, raw_update
from jaxnet.losses import softmax_cross_entropy, token_cross_entropy
from jaxnet.models import transformer
from jaxnet.nn.basic import Dense
from jaxnet.nn.combinators import serial
from jaxnet.nn.recurrent import LSTM
from jaxnet.train import init_train_state, make_epoch, make_train_step


@dataclasses.dataclass(frozen=True)
class TransformerSizes:
    num_blocks: int = 4
    features: int = 256
    num_heads: int = 4
    length: int = 128
    batch: int = 32
    vocab: int = 256

    def flops_per_step(self) -> float:
        """Forward matmuls (projections, MLP, both attention products counted in full, the
        output projection) per token, times 3 for the backward pass."""
        d, t = self.features, self.length
        per_token = self.num_blocks * (24 * d * d + 4 * t * d) + 2 * d * self.vocab
        return 3.0 * self.batch * t * per_token


@dataclasses.dataclass(frozen=True)
class LSTMSizes:
    hidden: int = 256
    steps: int = 28
    features: int = 28
    batch: int = 128
    classes: int = 10

    def flops_per_step(self) -> float:
        h = self.hidden
        per_example = 2 * self.steps * (self.features + h) * 4 * h + 2 * h * self.classes
        return 3.0 * self.batch * per_example


W6, W7 = TransformerSizes(), LSTMSizes()


def workload_name(sizes) -> str:
    """``"W6 transformer LM 4x256 h4 t128 b32"`` or ``"W7 LSTM 256 t28x28 b128"`` (the default
    sizes get the W6/W7 prefix)."""
    if isinstance(sizes, TransformerSizes):
        return (f"{'W6 ' if sizes == W6 else ''}transformer LM {sizes.num_blocks}x{sizes.features} "
                f"h{sizes.num_heads} t{sizes.length} b{sizes.batch}")
    return (f"{'W7 ' if sizes == W7 else ''}LSTM {sizes.hidden} t{sizes.steps}x{sizes.features} "
            f"b{sizes.batch}")


def token_batch(sizes: TransformerSizes):
    """Random bytes: inputs ``(batch, length)`` int32 and next-token targets of the same shape."""
    tokens = jax.random.randint(jax.random.key(0), (sizes.batch, sizes.length + 1), 0, sizes.vocab)
    return tokens[:, :-1], tokens[:, 1:]


def sequence_batch(sizes: LSTMSizes):
    """``x: (batch, steps, features)`` float32 and ``y: (batch,)`` class ids."""
    key = jax.random.key(0)
    return (jax.random.normal(key, (sizes.batch, sizes.steps, sizes.features), jnp.float32),
            jax.random.randint(key, (sizes.batch,), 0, sizes.classes))


# ---- W6: the hand-written raw-JAX transformer ------------------------------------------------

def raw_transformer_init(key, sizes: TransformerSizes) -> dict:
    """Params named as jaxnet's ``TransformerLM`` names them, so either network runs the other's."""
    d = sizes.features
    keys = iter(jax.random.split(key, 2 + 6 * sizes.num_blocks))
    dense = lambda m, n: {"w": jax.random.normal(next(keys), (m, n)) / np.sqrt(m),
                          "b": jnp.zeros(n)}
    norm = lambda: {"scale": jnp.ones(d), "bias": jnp.zeros(d)}
    params = {"embedding": {"table": jax.random.normal(next(keys), (sizes.vocab, d))},
              "positional": {"table": 0.02 * jax.random.normal(next(keys), (sizes.length, d))},
              "norm": norm()}
    for i in range(sizes.num_blocks):
        params[f"block_{i + 1}"] = {
            "attention_norm": norm(), "mlp_norm": norm(),
            "attention": {name: dense(d, d) for name in ("query", "key", "value", "out")},
            "mlp": {"in": dense(d, 4 * d), "out": dense(4 * d, d)}}
    return params


def _layer_norm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def raw_transformer_apply(num_heads: int, params, tokens):
    """Token ids ``(batch, time)`` to next-token logits ``(batch, time, vocab)``."""
    table = params["embedding"]["table"]
    x = table[tokens] + params["positional"]["table"][:tokens.shape[1]]
    b, t, d = x.shape
    for i in range(sum(name.startswith("block_") for name in params)):
        p = params[f"block_{i + 1}"]
        h = _layer_norm(p["attention_norm"], x)
        q, k, v = (h @ p["attention"][n]["w"] + p["attention"][n]["b"]
                   for n in ("query", "key", "value"))
        heads = lambda a: a.reshape(b, t, num_heads, d // num_heads)
        o = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + o.reshape(b, t, d) @ p["attention"]["out"]["w"] + p["attention"]["out"]["b"]
        h = jax.nn.gelu(_layer_norm(p["mlp_norm"], x) @ p["mlp"]["in"]["w"] + p["mlp"]["in"]["b"])
        x = x + h @ p["mlp"]["out"]["w"] + p["mlp"]["out"]["b"]
    return (_layer_norm(params["norm"], x) @ table.T) * d ** -0.5


def _raw_step_variant(apply, params, x, y) -> Variant:
    """A hand-written Adam step on the mean cross-entropy of ``apply(params, x)``'s logits
    (``benchmarks.workloads.raw_update``), jitted with donated buffers, in a Python loop."""
    optimizer = optax.adam(1e-3)
    step = jax.jit(functools.partial(raw_update, optimizer, apply), donate_argnums=(0, 1))
    return loop_variant("raw-jax step (donated)", lambda s: step(*s, x, y)[:2],
                        (params, optimizer.init(params)))


def jaxnet_transformer(sizes: TransformerSizes):
    return transformer(sizes.vocab, num_blocks=sizes.num_blocks, features=sizes.features,
                       num_heads=sizes.num_heads, max_length=sizes.length)


# ---- W7: the hand-written raw-JAX LSTM -------------------------------------------------------

def raw_lstm_init(key, sizes: LSTMSizes) -> dict:
    k = jax.random.split(key, 3)
    h, scale = sizes.hidden, 1 / np.sqrt(sizes.hidden)
    uniform = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -scale, scale)
    return {"wx": uniform(k[0], (sizes.features, 4 * h)), "wh": uniform(k[1], (h, 4 * h)),
            "b": jnp.zeros(4 * h),
            "head": (uniform(k[2], (h, sizes.classes)), jnp.zeros(sizes.classes))}


def raw_lstm_apply(params, x):
    """``x: (batch, time, features)`` to logits: one input projection, ``lax.scan`` over time."""
    batch, hidden = x.shape[0], params["wh"].shape[0]
    xs = jnp.swapaxes(x, 0, 1) @ params["wx"] + params["b"]  # (time, batch, 4 * hidden)

    def step(carry, xp):
        h, c = carry
        i, f, g, o = jnp.split(xp + h @ params["wh"], 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), None

    zeros = jnp.zeros((batch, hidden), x.dtype)
    (h, _), _ = jax.lax.scan(step, (zeros, zeros), xs)
    return h @ params["head"][0] + params["head"][1]


# ---- jaxnet: the train step and fit's device loop ------------------------------------------------

def jaxnet_variants(net, loss, x, y, steps_per_call: int, precision: str | None = None
                    ) -> list[Variant]:
    """``make_train_step`` in a Python loop, and fit's epoch program (``make_epoch``) over
    ``steps_per_call`` resident batches, as ``benchmarks.workloads.jaxnet_train_variants`` with
    the loss ``loss`` and the ``precision`` policy (its name ends the variants' names)."""
    batch, optimizer = x.shape[0], optax.adam(1e-3)
    params = net.init(jax.random.key(0), x[:1])
    suffix = "" if precision is None else f" {precision}"
    jn_step = make_train_step(net, optimizer, loss, precision=precision)
    step = loop_variant(f"jaxnet train step{suffix}", lambda s: jn_step(s, x, y)[0],
                        init_train_state(net, optimizer, params))
    xs, ys = jnp.concatenate([x] * steps_per_call), jnp.concatenate([y] * steps_per_call)
    epoch_fn, _ = make_epoch(net, optimizer, loss, xs.shape[0], batch, precision=precision)
    epoch = fit_program(epoch_fn)
    fit = loop_variant(f"jaxnet fit (device loop){suffix}",
                       lambda s: (epoch(s[0], xs, ys, jnp.int32(s[1]))[0], s[1] + 1),
                       (init_train_state(net, optimizer, params), 0), units_per_call=steps_per_call)
    return [step, fit]


# ---- PyTorch -------------------------------------------------------------------------------------

def torch_transformer(sizes: TransformerSizes):
    """The W6 model in PyTorch: ``nn.TransformerEncoderLayer`` (pre-norm, GELU) blocks under a
    causal mask, learned positions, a final LayerNorm and the tied, scaled output projection;
    it returns flattened logits ``(batch * time, vocab)``."""
    import torch
    from torch import nn

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            d = sizes.features
            self.embedding = nn.Embedding(sizes.vocab, d)
            self.positional = nn.Parameter(0.02 * torch.randn(sizes.length, d))
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(d, sizes.num_heads, 4 * d, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
                for _ in range(sizes.num_blocks))
            self.norm = nn.LayerNorm(d)
            self.register_buffer(
                "mask", nn.Transformer.generate_square_subsequent_mask(sizes.length))

        def forward(self, tokens):
            t = tokens.shape[1]
            x = self.embedding(tokens) + self.positional[:t]
            for block in self.blocks:
                x = block(x, src_mask=self.mask[:t, :t], is_causal=True)
            logits = self.norm(x) @ self.embedding.weight.T * sizes.features ** -0.5
            return logits.reshape(-1, sizes.vocab)

    torch.manual_seed(0)
    return LM()


def torch_transformer_variants(sizes: TransformerSizes, torch_compile: bool, skipped: list[dict]
                               ) -> list[Variant]:
    """PyTorch eager and ``torch.compile`` (of the model; the optimizer stays eager) on W6;
    nothing when PyTorch is missing (a note in ``skipped``), no compiled variant (and a note) when
    ``torch_compile`` is False or compilation fails."""
    reason = missing_module("torch")
    if reason:
        skipped.append({"workload": workload_name(sizes), "variant": "pytorch", "reason": reason})
        return []
    import torch
    x, y = (np.array(a) for a in token_batch(sizes))
    variants = [torch_train_variant(torch_transformer(sizes), x, y, autocast)
                for autocast in (False, True)]
    if not torch_compile:
        skipped.append({"workload": workload_name(sizes), "variant": "pytorch torch.compile",
                        "reason": "turned off (--no-torch-compile)"})
        return variants
    try:
        variants.append(torch_train_variant(
            torch.compile(torch_transformer(sizes)), x, y,
            name=f"pytorch {torch.__version__} torch.compile, fused adam"))
    except Exception as error:  # noqa: BLE001  (inductor needs a C++ compiler, may fail)
        skipped.append({"workload": workload_name(sizes), "variant": "pytorch torch.compile",
                        "reason": f"compilation failed: {type(error).__name__}: {error}"[:300]})
    return variants


def torch_lstm_model(sizes: LSTMSizes):
    """``nn.LSTM(batch_first=True)`` and a ``Linear`` on its last output."""
    import torch
    from torch import nn

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(sizes.features, sizes.hidden, batch_first=True)
            self.head = nn.Linear(sizes.hidden, sizes.classes)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    return Classifier()


def torch_lstm_variants(sizes: LSTMSizes, skipped: list[dict]) -> list[Variant]:
    """PyTorch eager on W7 (:func:`torch_lstm_model`), fused Adam; nothing when PyTorch is
    missing (a note in ``skipped``)."""
    reason = missing_module("torch")
    if reason:
        skipped.append({"workload": workload_name(sizes), "variant": "pytorch", "reason": reason})
        return []
    x, y = (np.array(a) for a in sequence_batch(sizes))
    return [torch_train_variant(torch_lstm_model(sizes), x, y, autocast)
            for autocast in (False, True)]


# ---- the workloads -------------------------------------------------------------------------------

def transformer_variants(sizes: TransformerSizes, steps_per_call: int, *,
                         torch_compile: bool = True, skipped: list[dict] | None = None
                         ) -> list[Variant]:
    """W6: raw JAX (reference), jaxnet's step and fit in float32 and ``"bf16"``, PyTorch eager
    (float32 and autocast bfloat16) and compiled."""
    x, y = token_batch(sizes)
    apply = functools.partial(raw_transformer_apply, sizes.num_heads)
    variants = [_raw_step_variant(apply, raw_transformer_init(jax.random.key(0), sizes), x, y),
                *(variant for precision in (None, "bf16") for variant in jaxnet_variants(
                    jaxnet_transformer(sizes), token_cross_entropy, x, y, steps_per_call,
                    precision))]
    return variants + torch_transformer_variants(sizes, torch_compile,
                                                 [] if skipped is None else skipped)


def lstm_variants(sizes: LSTMSizes, steps_per_call: int, *, skipped: list[dict] | None = None
                  ) -> list[Variant]:
    """W7: raw JAX (reference), jaxnet's step and fit in float32 and ``"bf16"``, PyTorch eager
    (float32 and autocast bfloat16)."""
    x, y = sequence_batch(sizes)
    net = serial(LSTM(sizes.hidden, return_sequences=False), Dense(sizes.classes))
    return ([_raw_step_variant(raw_lstm_apply, raw_lstm_init(jax.random.key(0), sizes), x, y)]
            + [variant for precision in (None, "bf16") for variant in jaxnet_variants(
                net, softmax_cross_entropy, x, y, steps_per_call, precision)]
            + torch_lstm_variants(sizes, [] if skipped is None else skipped))
