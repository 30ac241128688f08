"""A model summary: one row per leaf layer with output shape, parameters, bytes and FLOPs."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax

from jaxnet.nn.layer import Layer, recording, shape_str
from jaxnet.nn.shapes import input_spec


class SummaryRow(NamedTuple):
    path: str
    layer: str
    output_shape: tuple[int, ...]
    parameters: int
    bytes: int
    flops: int


class Summary(NamedTuple):
    """Rows per leaf layer (in call order) and their totals; ``str()`` gives a table."""

    rows: tuple[SummaryRow, ...]

    @property
    def parameters(self) -> int:
        return sum(row.parameters for row in self.rows)

    @property
    def bytes(self) -> int:
        return sum(row.bytes for row in self.rows)

    @property
    def flops(self) -> int:
        return sum(row.flops for row in self.rows)

    def __str__(self) -> str:
        header = ("path", "layer", "output shape", "params", "bytes", "FLOPs")
        body = [(r.path, r.layer, shape_str(r.output_shape), f"{r.parameters:,}", f"{r.bytes:,}",
                 f"{r.flops:,}") for r in self.rows]
        total = ("total", "", "", f"{self.parameters:,}", f"{self.bytes:,}", f"{self.flops:,}")
        widths = [max(len(row[i]) for row in [header, total, *body]) for i in range(len(header))]

        def line(cells):
            return "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *map(line, body), rule, line(total)])


def summarize(network: Layer, x) -> Summary:
    """Summarises ``network`` for inputs like ``x`` without computing anything.

    Args:
      network: any jaxnet layer.
      x: an example batch ``(batch, *example)``, its shape, or a ``jax.ShapeDtypeStruct`` (or a
        pytree of them for a network with several inputs); FLOPs are counted for this batch
        size, and the rows show outputs as ``(batch, *output)``.

    Returns:
      A :class:`Summary`; ``print(summary)`` shows the table.
    """
    spec = input_spec(x)
    records: list = []

    def run(key):
        params, state = network.init_with_state(key, spec)
        inputs = jax.tree.map(lambda leaf: jax.numpy.zeros(leaf.shape, leaf.dtype), spec)
        with recording(records):
            network.apply_with_state(params, state, inputs, batch_ndim=1)

    jax.eval_shape(run, jax.random.key(0))
    batch = jax.tree.leaves(spec)[0].shape[0]
    rows = []
    for path, layer, x_shape, y, params in records:
        leaves = jax.tree_util.tree_leaves(params)
        output_shape = jax.tree.map(lambda a: (batch,) + tuple(a.shape[1:]), y)
        rows.append(SummaryRow(
            path=path, layer=repr(layer), output_shape=output_shape,
            parameters=sum(math.prod(leaf.shape) for leaf in leaves),
            bytes=sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves),
            flops=layer.flops(x_shape, jax.tree.map(lambda a: tuple(a.shape), y), params)))
    return Summary(tuple(rows))
