"""Multi-head attention over ``jax.nn.dot_product_attention`` (self, cross, grouped-query, causal, RoPE)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from jaxnet._xla import attention_ops
from jaxnet.nn.basic import check_positive, matmul
from jaxnet.nn.initializers import check_weight_init, init_weight_and_bias
from jaxnet.nn.layer import (Layer, ShapeError, broadcast_trailing, require_example_ndim,
                             require_floating, shape_str, trace_options)
from jaxnet.nn.positional import SEQUENCE, apply_rotary, check_mask, sequence_and_mask

_ENTRIES = ("query", "context", "mask")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"MultiHeadAttention: {name} must be True or False, got {value!r}")


@dataclasses.dataclass(frozen=True, repr=False)
class MultiHeadAttention(Layer):
    """Scaled dot-product attention with several heads, optionally grouped-query, causal or rotary.

    Input forms:

    * ``x`` ``(batch, time, features)``: self-attention.
    * ``(x, mask)`` with ``mask`` ``(batch, time)`` bool, True at real tokens: self-attention
      over the real tokens only; outputs at padded positions are zeros.
    * ``{"query": q, "context": c, "mask": m}`` (``context`` and ``mask`` optional): queries from
      ``q`` attend to keys and values from ``c`` (default ``q``); ``m`` ``(batch, time_k)`` masks
      the context. Without ``context`` this is the ``(x, mask)`` form.

    A query that sees no key at all (its context fully masked; with ``causal``, every key up to
    its position masked) gets an output of zeros, never NaN.

    The attention itself is ``jax.nn.dot_product_attention`` (on CPU, when the caller promises
    reverse mode only, as ``fit`` does, ``jaxnet._xla.attention_ops.attention``: the same
    numbers with a faster gradient there, float32 and float64 inputs): on CPU its XLA implementation,
    which computes the softmax in float32 (so bfloat16 inputs are stable, and float64 inputs
    are only float32-accurate there); ``implementation="cudnn"`` selects the fused cuDNN kernel
    on NVIDIA GPUs (float16/bfloat16 only, with cuDNN's limits on head sizes). Under the
    ``"bf16"`` precision policy the four projections run on bfloat16 operands with float32
    accumulation, forward and backward; the attention itself (scores, softmax, values) stays in
    the compute dtype, float32: on bfloat16 inputs ``jax.nn.dot_product_attention``'s backward
    pass multiplies float32 score gradients with bfloat16 keys (a float32 product, and an error
    under strict dtype promotion). Its products cost ``time / (2 * features)`` of the
    projections' (a quarter at time 128 and 256 features).

    Args:
      num_heads: number of query heads.
      key_features: features per head for queries, keys and values; default
        ``features // num_heads`` (then ``num_heads`` must divide ``features``).
      num_kv_heads: number of key/value heads (grouped-query attention; 1 is multi-query);
        must divide ``num_heads``; default ``num_heads``. Query head ``h`` reads key/value head
        ``h // (num_heads // num_kv_heads)``.
      causal: query ``i`` attends to keys ``0 .. i`` only (aligned at the start when
        ``time_q != time_k``).
      use_bias: biases in the four projections.
      out_features: width of the output; default the query's ``features``.
      rotary: rotate queries and keys by their positions (RoPE, :func:`apply_rotary`); positions
        are ``0 .. time - 1`` in the query and in the context.
      rotary_base: RoPE's wavelength base.
      weight_init: as for :class:`~jaxnet.nn.Dense`.
      implementation: ``None`` (JAX's choice, XLA today), ``"xla"`` or ``"cudnn"``.

    Shapes:
      x/query: ``(batch, time_q, features)`` floating; context: ``(batch, time_k, context_features)``
      same dtype; mask: bool. params (in x's dtype), with ``D = key_features``,
      ``H = num_heads``, ``K = num_kv_heads``: ``query: {w: (features, H*D), b: (H*D,)}``,
      ``key`` and ``value``: ``{w: (context_features, K*D), b: (K*D,)}``,
      ``out: {w: (H*D, out_features), b: (out_features,)}``. y: ``(batch, time_q, out_features)``.
    """

    num_heads: int
    key_features: int | None = None
    num_kv_heads: int | None = None
    causal: bool = False
    use_bias: bool = True
    out_features: int | None = None
    rotary: bool = False
    rotary_base: float = 10000.0
    weight_init: Any = "lecun_normal"
    implementation: str | None = None
    kind: ClassVar[str] = "attention"
    example_ndim: ClassVar[int] = 2

    def __post_init__(self):
        check_positive("MultiHeadAttention", "num_heads", self.num_heads)
        for name in ("key_features", "num_kv_heads", "out_features"):
            if getattr(self, name) is not None:
                check_positive("MultiHeadAttention", name, getattr(self, name))
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"MultiHeadAttention: num_kv_heads must divide num_heads, got "
                             f"num_kv_heads={self.num_kv_heads} for num_heads={self.num_heads}")
        for name in ("causal", "use_bias", "rotary"):
            _check_flag(name, getattr(self, name))
        if not isinstance(self.rotary_base, (int, float)) or not self.rotary_base > 0:
            raise ValueError(f"MultiHeadAttention: rotary_base must be a positive number, got "
                             f"{self.rotary_base!r}")
        if self.rotary and self.key_features is not None and self.key_features % 2:
            raise ValueError(f"MultiHeadAttention: rotary needs an even key_features, got "
                             f"{self.key_features}")
        if self.implementation not in (None, "xla", "cudnn"):
            raise ValueError(f"MultiHeadAttention: implementation must be None, 'xla' or 'cudnn', "
                             f"got {self.implementation!r}")
        check_weight_init("MultiHeadAttention", self.weight_init)

    # ---- inputs ------------------------------------------------------------------------
    def _inputs(self, x):
        """``(query, context, key_mask, query_mask)`` from any input form, checked."""
        if not isinstance(x, dict):
            query, mask = sequence_and_mask(x)
            return query, query, mask, mask
        unknown = sorted(set(map(str, x)) - set(_ENTRIES))
        if unknown or "query" not in x:
            raise ValueError(f"an input dict needs 'query' and may hold 'context' and 'mask'; got "
                             f"entries {sorted(map(str, x))}")
        query, context, mask = x["query"], x.get("context"), x.get("mask")
        if context is None:
            return self._inputs(query if mask is None else (query, mask))
        require_example_ndim(query, 2, SEQUENCE)
        if not hasattr(context, "shape") or context.ndim != 3:
            raise ShapeError(f"context must be (batch, time_k, features); got "
                             f"{shape_str(getattr(context, 'shape', ()))}")
        if context.shape[0] != query.shape[0]:
            raise ShapeError(f"query and context batch sizes differ: query {shape_str(query.shape)}, "
                             f"context {shape_str(context.shape)}")
        if context.dtype != query.dtype:
            raise TypeError(f"context dtype {context.dtype} differs from query dtype {query.dtype}")
        if mask is not None:
            check_mask(mask, tuple(context.shape[:2]), "mask (of the context)")
        return query, context, mask, None

    def _head_features(self, features: int) -> int:
        if self.key_features is not None:
            return self.key_features
        if features % self.num_heads:
            raise ShapeError(f"num_heads={self.num_heads} must divide the input's {features} "
                             "features (or set key_features)")
        head = features // self.num_heads
        if self.rotary and head % 2:
            raise ShapeError(f"rotary needs an even number of features per head; got {features} "
                             f"features / {self.num_heads} heads = {head}")
        return head

    # ---- the protocol ------------------------------------------------------------------
    def init_params(self, key, x):
        query, context, _, _ = self._inputs(x)
        require_floating(query)
        heads, kv_heads = self.num_heads, self.num_kv_heads or self.num_heads
        head = self._head_features(query.shape[-1])
        features, context_features = query.shape[-1], context.shape[-1]
        out = self.out_features or features
        shapes = {"query": (features, heads * head), "key": (context_features, kv_heads * head),
                  "value": (context_features, kv_heads * head), "out": (heads * head, out)}
        keys = jax.random.split(key, len(shapes))
        return {name: init_weight_and_bias(k, self.weight_init, shape, shape[0], self.use_bias,
                                           query.dtype)
                for k, (name, shape) in zip(keys, shapes.items())}, {}

    def _project(self, params, x):
        y = matmul(x, params["w"])
        return y + broadcast_trailing(params["b"], y) if self.use_bias else y

    def forward(self, params, state, x, *, train, key):
        query, context, key_mask, query_mask = self._inputs(x)
        batch, time_q, time_k = query.shape[0], query.shape[1], context.shape[1]
        heads, kv_heads = self.num_heads, self.num_kv_heads or self.num_heads
        head = self._head_features(query.shape[-1])
        q = self._project(params["query"], query).reshape(batch, time_q, heads, head)
        k = self._project(params["key"], context).reshape(batch, time_k, kv_heads, head)
        v = self._project(params["value"], context).reshape(batch, time_k, kv_heads, head)
        if self.rotary:
            q = apply_rotary(q, jnp.arange(time_q)[:, None], self.rotary_base)
            k = apply_rotary(k, jnp.arange(time_k)[:, None], self.rotary_base)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        o = self._attend(q, k, v, mask)
        y = self._project(params["out"], o.reshape(batch, time_q, heads * head))
        valid = query_mask if query_mask is not None else self._sees_a_key(key_mask, time_q)
        if valid is not None:
            # a query without any key gets jax's uniform average over masked keys: zero it
            y = jnp.where(valid[..., None], y, jnp.zeros_like(y))
        return y, state

    def _attend(self, q, k, v, mask):
        """``(batch, time_q, heads, head)``: ``jax.nn.dot_product_attention``, or on CPU, when the
        caller promises reverse mode only, ``attention_ops.attention`` (the same numbers, a
        faster gradient there; float32 and float64 only, whose softmax it computes in place)."""
        def library(q, k, v):
            # jax promotes the logits' dtype with float32 implicitly, an error for float64 and
            # bfloat16 under jax_numpy_dtype_promotion="strict"; its promotions are deliberate
            with jax.numpy_dtype_promotion("standard"):
                return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal,
                                                    implementation=self.implementation)

        def heads_major(q, k, v):
            group = q.shape[2] // k.shape[2]  # grouped-query: key/value head h serves `group`
            if group > 1:
                k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
            o = attention_ops.attention(*(jnp.swapaxes(a, 1, 2) for a in (q, k, v)), mask,
                                        self.causal)
            return jnp.swapaxes(o, 1, 2)

        if (trace_options().reverse_only and self.implementation is None
                and q.dtype in (jnp.float32, jnp.float64)):
            return lax.platform_dependent(q, k, v, cpu=heads_major, default=library)
        return library(q, k, v)

    def _sees_a_key(self, key_mask, time_q):
        """``(batch, time_q)`` bool: the query attends to at least one key; ``None`` without a mask."""
        if key_mask is None:
            return None
        if not self.causal:
            return jnp.broadcast_to(jnp.any(key_mask, axis=1, keepdims=True),
                                    (key_mask.shape[0], time_q))
        seen = lax.cummax(key_mask.astype(jnp.int32), axis=1) > 0  # any real key at or before t
        last = jnp.minimum(jnp.arange(time_q), key_mask.shape[1] - 1)
        return seen[:, last]

    def flops(self, x_shape, y_shape, params):
        """Projections plus the two attention products; ``time_k`` taken as ``time_q``."""
        batch, time = y_shape[0], y_shape[1]
        projections = sum(2 * batch * time * params[n]["w"].shape[0] * params[n]["w"].shape[1]
                          for n in ("query", "key", "value", "out"))
        inner = params["query"]["w"].shape[1]
        return int(projections + 4 * batch * time * time * inner)
