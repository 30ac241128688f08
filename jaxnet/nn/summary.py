"""A model summary: one row per leaf layer with output shape, parameters, bytes and FLOPs."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax

from jaxnet.nn.layer import Layer, as_spec, recording, shape_str
from jaxnet.nn.shapes import infer_example_ndim


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
      x: an example batch ``(batch, *example)``, its shape, or a ``jax.ShapeDtypeStruct``;
        FLOPs are counted for this batch size.

    Returns:
      A :class:`Summary`; ``print(summary)`` shows the table.
    """
    spec = as_spec(x)
    records: list = []
    batch_shapes: list = []

    def run(key):
        params, state = network.init_with_state(key, spec)
        inputs = jax.numpy.zeros(spec.shape, spec.dtype)
        with recording(records):
            network.apply_with_state(params, state, inputs)
        example_ndim = infer_example_ndim(network, params, state, inputs)
        batch_shapes.append(spec.shape[:spec.ndim - example_ndim])

    jax.eval_shape(run, jax.random.key(0))
    # Layers see the batch axes of x flattened into one (e.g. (batch, time) ids into an Embedding);
    # rows show outputs with x's own batch axes, as apply returns them.
    batch_shape = batch_shapes[0]
    rows = []
    for path, layer, x_shape, y, params in records:
        leaves = jax.tree_util.tree_leaves(params)
        rows.append(SummaryRow(
            path=path, layer=repr(layer), output_shape=batch_shape + tuple(y.shape[1:]),
            parameters=sum(math.prod(leaf.shape) for leaf in leaves),
            bytes=sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves),
            flops=layer.flops(x_shape, tuple(y.shape), params)))
    return Summary(tuple(rows))
