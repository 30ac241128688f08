"""Pre-norm transformer blocks, and token-level models built from them (language model, classifier)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxnet.nn.attention import MultiHeadAttention
from jaxnet.nn.basic import Dense, Dropout, Embedding, check_positive, matmul_transposed
from jaxnet.nn.calls import ChildRunner, init_into
from jaxnet.validate import probability
from jaxnet.nn.layer import (Layer, ShapeError, require_example_ndim,
                             require_feature_axis, require_floating)
from jaxnet.nn.norm import LayerNorm, RMSNorm
from jaxnet.nn.positional import (LearnedPositionalEmbedding, SinusoidalPositionalEncoding,
                                  rejoin, sequence_and_mask)

_NORMS = {"layer": LayerNorm, "rms": RMSNorm}
POSITIONALS = ("learned", "sinusoidal", "rotary")


@dataclasses.dataclass(frozen=True, repr=False)
class FeedForward(Layer):
    """The transformer's position-wise MLP: ``gelu(x @ w_in + b_in) @ w_out + b_out``.

    Args:
      hidden: the hidden width; default ``4 * features``.

    Shapes:
      x: ``(batch, ..., features)`` floating; params ``in: {w: (features, hidden), b: (hidden,)}``,
      ``out: {w: (hidden, features), b: (features,)}``; y: like x.
    """

    hidden: int | None = None
    kind: ClassVar[str] = "mlp"
    pointwise: ClassVar[bool] = True

    def __post_init__(self):
        if self.hidden is not None:
            check_positive("FeedForward", "hidden", self.hidden)

    def init_params(self, key, x):
        require_floating(x)
        require_feature_axis(x)
        features = x.shape[-1]
        hidden = self.hidden or 4 * features
        k_in, k_out = jax.random.split(key)
        return {"in": Dense(hidden).init_params(k_in, x)[0],
                "out": Dense(features).init_params(
                    k_out, jax.ShapeDtypeStruct(x.shape[:-1] + (hidden,), x.dtype))[0]}, {}

    def forward(self, params, state, x, *, train, key):
        h = Dense(params["in"]["w"].shape[1]).forward(params["in"], {}, x, train=train, key=None)[0]
        h = jax.nn.gelu(h)
        return Dense(x.shape[-1]).forward(params["out"], {}, h, train=train, key=None)[0], state

    def flops(self, x_shape, y_shape, params):
        rows = math.prod(x_shape[:-1])
        hidden = params["in"]["w"].shape[1]
        return int(rows * (4 * x_shape[-1] * hidden + 2 * hidden + x_shape[-1]))  # products, biases, gelu


@dataclasses.dataclass(frozen=True, repr=False)
class TransformerBlock(Layer):
    """A pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``.

    The MLP is ``Dense(mlp_features), gelu, Dense(features)``. With ``drop_rate``, dropout acts
    on the attention and MLP outputs before each residual sum (training mode, with a key).

    Args:
      num_heads: attention heads (must divide the features).
      mlp_features: the MLP's hidden width; default ``4 * features``.
      causal: causal self-attention.
      drop_rate: dropout rate in ``[0, 1)``; 0 builds no dropout (and needs no key).
      num_kv_heads: grouped-query attention (see :class:`MultiHeadAttention`).
      rotary: rotary position embedding of queries and keys.
      norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm).

    Shapes:
      x: ``(batch, time, features)`` floating, or ``(x, mask)`` with ``mask`` ``(batch, time)``
      bool, True at real tokens; y: the same structure and shapes (the mask is passed through,
      so blocks chain in ``serial``). Padded positions never change outputs at real positions,
      and pass through the block unchanged. params: ``attention_norm``, ``attention``
      (:class:`MultiHeadAttention`), ``mlp_norm``, ``mlp`` (:class:`FeedForward`: ``in: {w:
      (features, mlp_features), b}``, ``out: {w: (mlp_features, features), b}``).
    """

    num_heads: int
    mlp_features: int | None = None
    causal: bool = False
    drop_rate: float = 0.0
    num_kv_heads: int | None = None
    rotary: bool = False
    norm: str = "layer"
    kind: ClassVar[str] = "transformer_block"
    example_ndim: ClassVar[int] = 2

    def __post_init__(self):
        if self.mlp_features is not None:
            check_positive("TransformerBlock", "mlp_features", self.mlp_features)
        probability("TransformerBlock", "drop_rate", self.drop_rate)
        if self.norm not in _NORMS:
            raise ValueError(f"TransformerBlock: norm must be one of {sorted(_NORMS)}, got {self.norm!r}")
        self._attention()  # checks num_heads, num_kv_heads, causal, rotary

    def _attention(self):
        return MultiHeadAttention(self.num_heads, num_kv_heads=self.num_kv_heads,
                                  causal=self.causal, rotary=self.rotary)

    def children(self):
        drop = (self.drop_rate > 0) * [Dropout(self.drop_rate)]
        return (("attention_norm", _NORMS[self.norm]()), ("attention", self._attention()),
                *(("attention_dropout", d) for d in drop),
                ("mlp_norm", _NORMS[self.norm]()), ("mlp", FeedForward(self.mlp_features)),
                *(("mlp_dropout", d) for d in drop))

    def init_params(self, key, x):
        seq, mask = sequence_and_mask(x)
        require_floating(seq)
        params, state = {}, {}
        h = seq
        for (name, child), k in zip(self.children(), jax.random.split(key, len(self.children()))):
            if name == "mlp_norm":
                h = seq  # the residual sum has the input's shape and dtype
            h = init_into(name, child, k, (h, mask) if name == "attention" and mask is not None else h,
                           params, state)
        return params, state

    def forward(self, params, state, x, *, train, key):
        seq, mask = sequence_and_mask(x)
        run = ChildRunner(self, params, state, key, train)
        h = run("attention_norm", seq)
        h = run("attention", h if mask is None else (h, mask))
        y = seq + (run("attention_dropout", h) if "attention_dropout" in run else h)
        h = run("mlp", run("mlp_norm", y))
        y = y + (run("mlp_dropout", h) if "mlp_dropout" in run else h)
        if mask is not None:  # padded positions pass through
            y = jnp.where(mask[..., None], y, seq)
        return rejoin(x, y, mask), run.new_state


@dataclasses.dataclass(frozen=True, repr=False)
class _TokenTransformer(Layer):
    """Token embedding, positions, pre-norm blocks and a final norm (shared by the LM and classifier)."""

    vocab_size: int
    num_blocks: int = 4
    features: int = 256
    num_heads: int = 4
    max_length: int = 128
    causal: bool = True
    positional: str = "learned"
    drop_rate: float = 0.0
    pad_id: int | None = None
    example_ndim: ClassVar[int] = 1  # a sequence of token ids, (time,)

    def __post_init__(self):
        name = type(self).__name__
        for field in ("vocab_size", "num_blocks", "features", "num_heads", "max_length"):
            check_positive(name, field, getattr(self, field))
        if self.positional not in POSITIONALS:
            raise ValueError(f"{name}: positional must be one of {list(POSITIONALS)}, got {self.positional!r}")
        probability(name, "drop_rate", self.drop_rate)
        pad = self.pad_id
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)
                                or not 0 <= pad < self.vocab_size):
            raise ValueError(f"{name}: pad_id must be a token id in 0 .. vocab_size - 1 = "
                             f"{self.vocab_size - 1}, got {self.pad_id!r}")
        if self.features % self.num_heads:
            raise ValueError(f"{name}: num_heads={self.num_heads} must divide features={self.features}")
        if self.positional == "rotary" and (self.features // self.num_heads) % 2:
            raise ValueError(f"{name}: rotary needs an even number of features per head, got "
                             f"{self.features} / {self.num_heads} = {self.features // self.num_heads}")

    def _trunk(self):
        positional = {"learned": (("positional", LearnedPositionalEmbedding(self.max_length)),),
                      "sinusoidal": (("positional", SinusoidalPositionalEncoding(self.max_length)),),
                      "rotary": ()}[self.positional]
        block = TransformerBlock(self.num_heads, causal=self.causal, drop_rate=self.drop_rate,
                                 rotary=self.positional == "rotary")
        return (("embedding", Embedding(self.vocab_size, self.features)), *positional,
                *((("dropout", Dropout(self.drop_rate)),) if self.drop_rate > 0 else ()),
                *((f"block_{i + 1}", block) for i in range(self.num_blocks)), ("norm", LayerNorm()))

    def _check_tokens(self, x):
        if not hasattr(x, "shape") or not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"expected integer token ids (batch, time); got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        require_example_ndim(x, 1, "(time,)")
        if x.shape[1] > self.max_length:
            raise ShapeError(f"sequences of length {x.shape[1]} are longer than max_length="
                             f"{self.max_length}")

    def init_params(self, key, x):
        self._check_tokens(x)
        mask = None if self.pad_id is None else jax.ShapeDtypeStruct(x.shape, jnp.bool_)
        params, state = {}, {}
        children = self.children()
        for (name, child), k in zip(children, jax.random.split(key, len(children))):
            if name.startswith("head") or name == "output":
                x = self._head_input(x, mask)
            elif name.startswith("block_") and mask is not None:
                x = (x, mask)
            x = init_into(name, child, k, x, params, state)
            if isinstance(x, tuple):
                x = x[0]
        return params, state

    def _features(self, params, state, tokens, train, key):
        """The final-norm features ``(batch, time, features)``, the mask, and the runner."""
        self._check_tokens(tokens)
        run = ChildRunner(self, params, state, key, train)
        mask = None if self.pad_id is None else tokens != self.pad_id
        h = run("embedding", tokens)
        for name in ("positional", "dropout"):
            if name in run:
                h = run(name, h)
        for i in range(self.num_blocks):
            h = run(f"block_{i + 1}", h if mask is None else (h, mask))
            h = h if mask is None else h[0]
        return run("norm", h), mask, run

    def _head_input(self, h, mask):
        return h


@dataclasses.dataclass(frozen=True, repr=False)
class TransformerLM(_TokenTransformer):
    """A decoder-only language model: token ids to next-token logits at every position.

    Embedding, positions (learned table, sinusoidal table or rotary in every attention), blocks
    of :class:`TransformerBlock`, a final LayerNorm and the output projection. With
    ``tie_embeddings`` the projection is the embedding table itself, transposed and scaled by
    ``features ** -0.5`` (the table's rows have unit variance), so there is one table in params.

    Args:
      vocab_size, num_blocks, features, num_heads, max_length: the sizes.
      causal: causal attention (True for a language model).
      positional: ``"learned"``, ``"sinusoidal"`` or ``"rotary"``.
      drop_rate: dropout after the embedding and in every block.
      pad_id: when set, tokens equal to it are padding: keys no real token attends to.
      tie_embeddings: share the embedding table with the output projection.

    Shapes:
      x: ``(batch, time)`` integer ids, ``time <= max_length``; y: ``(batch, time, vocab_size)``
      float32 logits. params: ``embedding: {table: (vocab_size, features)}``, ``positional``
      (learned only), ``block_1`` ... ``block_N``, ``norm``, and ``output: {w, b}`` when untied.
    """

    tie_embeddings: bool = True
    kind: ClassVar[str] = "transformer_lm"

    def children(self):
        head = () if self.tie_embeddings else (("output", Dense(self.vocab_size)),)
        return self._trunk() + head

    def forward(self, params, state, x, *, train, key):
        h, _, run = self._features(params, state, x, train, key)
        if not self.tie_embeddings:
            return run("output", h), run.new_state
        table = params["embedding"]["table"].astype(h.dtype)
        return (matmul_transposed(h, table) * jnp.asarray(self.features ** -0.5, h.dtype),
                run.new_state)


@dataclasses.dataclass(frozen=True, repr=False)
class TransformerClassifier(_TokenTransformer):
    """An encoder that classifies token sequences: blocks, then the mean over real tokens, then a Dense.

    Args:
      num_classes: output width.
      causal: causal attention (usually False for an encoder).
      pad_id: tokens equal to it are padding: no real token attends to them and the mean
        leaves them out (a sequence of padding only pools to zeros).
      (the other arguments as for :class:`TransformerLM`)

    Shapes:
      x: ``(batch, time)`` integer ids; y: ``(batch, num_classes)`` logits. params: as for
      :class:`TransformerLM`, with ``head: {w: (features, num_classes), b}``.
    """

    num_classes: int = 2
    causal: bool = False
    kind: ClassVar[str] = "transformer_classifier"

    def __post_init__(self):
        super().__post_init__()
        check_positive("TransformerClassifier", "num_classes", self.num_classes)

    def children(self):
        return self._trunk() + (("head", Dense(self.num_classes)),)

    def _head_input(self, h, mask):
        return jax.ShapeDtypeStruct((h.shape[0], h.shape[-1]), h.dtype)

    def forward(self, params, state, x, *, train, key):
        h, mask, run = self._features(params, state, x, train, key)
        if mask is None:
            pooled = jnp.mean(h, axis=1)
        else:
            count = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1).astype(h.dtype)
            pooled = jnp.sum(jnp.where(mask[..., None], h, jnp.zeros_like(h)), axis=1) / count
        return run("head", pooled), run.new_state
