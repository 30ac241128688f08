"""Bytes per device of a transformer's params and Adam state under each sharded layout.

Builds the training state of a ``TransformerLM`` abstractly (``jax.eval_shape``: nothing is
computed or allocated), lays it out with jaxnet's rules (:func:`jaxnet.sharding.param_specs`,
optimizer state following) on meshes of 8 simulated CPU devices, and sums the shard shapes
JAX assigns to each device (:func:`jaxnet.sharding.memory_per_device`); placed arrays hold
exactly these shards (tests/test_sharding.py compares the two). Activations and the transient
gradients are not counted.

    python benchmarks/sharding_memory.py      # prints a markdown table
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `python benchmarks/sharding_memory.py`
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)  # before anything starts the backend

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import jaxnet as jn  # noqa: E402
from jaxnet import sharding  # noqa: E402
from jaxnet.train import init_train_state  # noqa: E402

MODEL = {"vocab_size": 32768, "num_blocks": 8, "features": 1024, "num_heads": 16,
         "max_length": 512, "tie_embeddings": False}
MESHES = ((8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8))
MB = 1e6


def abstract_state():
    net = jn.TransformerLM(**MODEL)
    tokens = jax.ShapeDtypeStruct((1, MODEL["max_length"]), jnp.int32)
    return jax.eval_shape(
        lambda key: init_train_state(net, optax.adam(1e-3), net.init(key, tokens)),
        jax.random.key(0))


def laid_out(state, mesh):
    """``state``'s leaves as ``jax.ShapeDtypeStruct`` carrying their shardings on ``mesh``."""
    shardings = sharding.state_shardings(state, mesh, sharding.param_specs(state.params, mesh))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        state, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def table(state) -> list[str]:
    whole = max(sharding.memory_per_device(
        laid_out(state, sharding.make_mesh(8)).params).values())
    rows = ["| mesh (data x fsdp x model) | params / device | Adam mu + nu / device | "
            "total / device | of replicated |", "|---|---:|---:|---:|---:|"]
    for shape in MESHES:
        placed = laid_out(state, sharding.make_mesh(*shape))
        params = max(sharding.memory_per_device(placed.params).values())
        adam = max(sharding.memory_per_device(placed.opt_state).values())
        share = (params + adam) / (3 * whole)
        rows.append(f"| {' x '.join(map(str, shape))} | {params / MB:,.0f} MB | "
                    f"{adam / MB:,.0f} MB | {(params + adam) / MB:,.0f} MB | {share:.1%} |")
    return rows


def main() -> None:
    state = abstract_state()
    count = sum(a.size for a in jax.tree.leaves(state.params))
    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state.params))
    print(f"TransformerLM({', '.join(f'{k}={v}' for k, v in MODEL.items())}): "
          f"{count / 1e6:.1f}M params, {nbytes / MB:,.0f} MB float32; with Adam "
          f"{3 * nbytes / MB:,.0f} MB\n")
    print("\n".join(table(state)))


if __name__ == "__main__":
    main()
