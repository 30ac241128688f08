"""Mixed precision: parameters kept in float32, matrix products on bfloat16 operands.

A :class:`Policy` names four dtypes. :func:`apply_with_policy` casts the float32 parameters and
the floating inputs to the compute dtype, runs the network, and casts its output (the logits) to
the output dtype, so the softmax and the loss see float32. With a ``matmul_dtype`` the network's
built-in layers also round the operands of every matrix product and convolution to it and
accumulate the product in float32, in the forward pass and in both gradient products of the
backward pass (``TraceOptions.matmul_dtype``, ``jaxnet/_xla/mixed.py``). Gradients reach the
float32 parameters through the casts (the VJP of a cast is the cast back), so the optimizer
updates a float32 master copy and its state stays float32. Normalisation layers compute their
statistics in float32 whatever the compute dtype (``jaxnet/nn/norm.py``), and BatchNorm keeps its
running statistics in float32.

Named policies:

* ``"f32"``: everything float32. For float32 parameters and inputs every cast is a no-op, so the
  compiled program is exactly the one without a policy.
* ``"bf16"``: bfloat16 matrix-product operands, everything else float32: the products of
  ``Dense``, ``Conv``, ``ConvTranspose``, ``MultiHeadAttention``'s projections, the recurrent
  layers and a tied embedding's output projection take bfloat16 operands and return float32,
  forward and backward; activations, parameters, gradients, optimizer state and loss are
  float32. This is the form a CPU's bfloat16 matrix units (AMX-BF16, AVX512-BF16) run fast
  (though XLA:CPU still runs bfloat16 convolutions in float32: docs/performance.md, finding 12),
  and what ``torch.autocast(dtype=torch.bfloat16)`` rounds too. Networks on integer ids
  (``Embedding``) work, since the compute dtype is float32.
* ``"bf16-full"``: float32 parameters, the whole forward pass in bfloat16 (activations
  included), float32 logits: what ``"bf16"`` meant before it became the policy above. It halves
  activation memory, for accelerators whose bfloat16 products are fast at any output dtype; on
  XLA:CPU its bfloat16-output products are slower than float32.
* ``"f16"``: float32 parameters, float16 compute, float32 logits; for evaluation and prediction
  only. float16's small range makes small gradients underflow to zero unless the loss is scaled,
  which jaxnet does not implement, so training refuses it (use ``"bf16"``).

bfloat16 has float32's exponent range, so gradients neither underflow nor overflow and need no
loss scaling.

Example:
  >>> policy = get_policy("bf16")
  >>> logits, _ = apply_with_policy(net, policy, params, {}, x)   # logits: float32
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxnet.nn.calls import matmul_operands
from jaxnet.nn.layer import Layer, Params, State
from jaxnet.trees import leaves_by_name

DTypeLike = Any


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which dtype each part of a training step uses.

    Attributes:
      param_dtype: the dtype parameters are kept (and updated) in.
      compute_dtype: the dtype of the forward pass: parameters and floating inputs are cast to
        it before the network runs, so its activations are in it.
      output_dtype: the network's output is cast to it before the loss (and the softmax).
      matmul_dtype: when not ``None``, the built-in layers' matrix products and convolutions
        round their operands to it and accumulate in float32, forward and backward; their
        results stay in the compute dtype.
    """

    param_dtype: DTypeLike = jnp.float32
    compute_dtype: DTypeLike = jnp.float32
    output_dtype: DTypeLike = jnp.float32
    matmul_dtype: DTypeLike | None = None

    def __post_init__(self):
        optional = () if self.matmul_dtype is None else ("matmul_dtype",)
        for field in ("param_dtype", "compute_dtype", "output_dtype") + optional:
            dtype = jnp.dtype(getattr(self, field))
            if not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(f"Policy: {field} must be a floating dtype, got {dtype}")
            object.__setattr__(self, field, dtype)

    @property
    def name(self) -> str:
        """The policy's name in :data:`POLICIES` (``"bf16"``), else its dtypes."""
        for name, policy in POLICIES.items():
            if policy == self:
                return name
        matmul = "" if self.matmul_dtype is None else f", matmul={self.matmul_dtype}"
        return (f"Policy(param={self.param_dtype}, compute={self.compute_dtype}, "
                f"output={self.output_dtype}{matmul})")

    @property
    def trainable(self) -> bool:
        """False for float16 compute or products: its gradients underflow without loss scaling."""
        return jnp.float16 not in (self.compute_dtype, self.matmul_dtype)


POLICIES = {
    "f32": Policy(jnp.float32, jnp.float32, jnp.float32),
    "bf16": Policy(jnp.float32, jnp.float32, jnp.float32, matmul_dtype=jnp.bfloat16),
    "bf16-full": Policy(jnp.float32, jnp.bfloat16, jnp.float32),
    "f16": Policy(jnp.float32, jnp.float16, jnp.float32),
}
TRAINING_PRECISIONS = tuple(name for name, policy in POLICIES.items() if policy.trainable)


def get_policy(precision: str | Policy | None) -> Policy | None:
    """A :class:`Policy` from its name; a ``Policy`` or ``None`` (no policy) comes back as is.

    Raises:
      ValueError: an unknown name (the message lists the known ones).
      TypeError: neither a name, a ``Policy`` nor ``None``.
    """
    if precision is None or isinstance(precision, Policy):
        return precision
    if not isinstance(precision, str):
        raise TypeError(f"precision must be a policy name ({', '.join(POLICIES)}), a "
                        f"jaxnet.precision.Policy or None; got {type(precision).__name__}")
    if precision not in POLICIES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[precision]


def get_training_policy(precision: str | Policy | None, where: str) -> Policy | None:
    """:func:`get_policy`, refusing policies that cannot train (float16 compute or products).

    Args:
      where: the function asking, for the message (``"fit"``).
    """
    policy = get_policy(precision)
    if policy is not None and not policy.trainable:
        raise ValueError(
            f"{where}: precision {policy.name} (float16) is for evaluation and prediction "
            "only: float16 gradients underflow without loss scaling, which jaxnet does not "
            "implement; train with precision 'bf16'")
    return policy


def cast_floating(tree, dtype: DTypeLike):
    """``tree`` with every floating array cast to ``dtype``; other leaves (integers, keys) kept.

    A cast to an array's own dtype is a no-op: it adds nothing to the traced program.
    """
    def cast(leaf):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(leaf).astype(dtype)
        return leaf
    return jax.tree.map(cast, tree)


def check_params(policy: Policy | None, params: Params, where: str) -> None:
    """Raises ``TypeError`` unless every floating parameter is in ``policy.param_dtype``."""
    if policy is None:
        return
    for name, leaf in leaves_by_name(params).items():
        dtype = getattr(leaf, "dtype", None)
        if (dtype is not None and jnp.issubdtype(dtype, jnp.floating)
                and jnp.dtype(dtype) != policy.param_dtype):
            raise TypeError(
                f"{where}: precision {policy.name} keeps parameters in {policy.param_dtype}, but "
                f"{name} is {dtype}; initialise the network on {policy.param_dtype} inputs "
                f"(net.init(key, x.astype(jnp.{policy.param_dtype})))")


def apply_with_policy(net: Layer, policy: Policy | None, params: Params, state: State, x: jax.Array,
                      *, key: jax.Array | None = None, train: bool = False,
                      **options) -> tuple[Any, State]:
    """``net.apply_with_state`` in the policy's compute dtype, the output in its output dtype,
    with the built-in layers' products on operands in its matmul dtype.

    Args:
      net: the network.
      policy: the policy; ``None`` runs ``net.apply_with_state`` unchanged.
      params: the parameters, in ``policy.param_dtype`` (cast to the compute dtype here).
      state: the network's state; not cast (BatchNorm keeps float32 statistics).
      x: ``(*batch, *example)`` inputs; floating inputs are cast to the compute dtype. Integer
        inputs (token ids) work only with float32 compute: parameters take the input's dtype
        (float32 for integers), so a bfloat16 network needs bfloat16 inputs.
      key, train, options: passed to ``net.apply_with_state``.

    Returns:
      ``(y, new_state)``: ``y (*batch, *output)`` in ``policy.output_dtype``.
    """
    if policy is None:
        return net.apply_with_state(params, state, x, key=key, train=train, **options)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) and policy.compute_dtype != jnp.float32:
        raise TypeError(
            f"precision {policy.name}: the input is {x.dtype} of shape {tuple(x.shape)}; a "
            f"{policy.compute_dtype} forward pass needs floating inputs (a network on integer "
            "ids takes float32 parameters from them); use precision 'f32'")
    with matmul_operands(policy.matmul_dtype):
        y, new_state = net.apply_with_state(cast_floating(params, policy.compute_dtype), state,
                                            cast_floating(x, policy.compute_dtype), key=key,
                                            train=train, **options)
    return cast_floating(y, policy.output_dtype), new_state
