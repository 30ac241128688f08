"""Pytree helpers shared by the library: readable leaf names and tree comparison.

A leaf's name joins its dict keys, NamedTuple fields and sequence indices with ``.``:
``params["dense_1"]["w"]`` is ``dense_1.w``, a ``TrainState``'s Adam moment
``opt_state.0.mu.dense_1.w``. Checkpoints, params files, validation errors and precision checks
all use these names.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np


def _key_name(entry) -> str:
    """One step of a ``jax.tree_util`` key path as text: a dict key, attribute name or index."""
    match entry:
        case jax.tree_util.DictKey(key=name) | jax.tree_util.FlattenedIndexKey(key=name):
            return str(name)
        case jax.tree_util.GetAttrKey(name=name):
            return name
        case jax.tree_util.SequenceKey(idx=index):
            return str(index)
    raise TypeError(f"unsupported pytree key {entry!r}")


def named_leaves(tree) -> list[tuple[str, Any]]:
    """The leaves of ``tree`` in flattening order, each with its dotted name.

    Raises:
      ValueError: two leaves get the same name (a dict key containing ``.``).
    """
    named = [(".".join(map(_key_name, path)), leaf)
             for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"tree leaves {duplicates} have the same dotted name; rename dict keys "
                         "that contain '.'")
    return named


def leaves_by_name(tree) -> dict[str, Any]:
    """``{dotted name: leaf}`` of ``tree``."""
    return dict(named_leaves(tree))


def shape_str(shape) -> str:
    """``(28, 28)``, ``(10,)``, ``()``: a shape as Python writes a tuple."""
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


class TreeDifferences(NamedTuple):
    """How a tree differs from the one expected, leaf by leaf (dotted names)."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()  # "name has shape (3,), expected (4,)"

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 10) -> str:
        """``"missing a.w; unexpected b.w; c.b has shape (3,), expected (4,)"``."""
        def listed(names):
            more = len(names) - limit
            return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")
        parts = [f"missing {listed(self.missing)}" if self.missing else "",
                 f"unexpected {listed(self.unexpected)}" if self.unexpected else "",
                 "; ".join(self.mismatched[:limit])]
        return "; ".join(p for p in parts if p)


def differing_names(expected: dict, actual: dict, same) -> tuple[tuple[str, ...], ...]:
    """``(missing, unexpected, mismatched)`` names of two ``{name: leaf}`` dicts, in order;
    ``same(expected_leaf, actual_leaf)`` says whether two leaves of one name agree. The one
    comparison that params checks and checkpoint restores share."""
    return (tuple(n for n in expected if n not in actual),
            tuple(n for n in actual if n not in expected),
            tuple(n for n in expected if n in actual and not same(expected[n], actual[n])))


def compare_trees(expected, actual, *, dtypes: bool = True) -> TreeDifferences:
    """Compares two trees' leaf names, shapes and (optionally) dtypes.

    Args:
      expected, actual: pytrees whose leaves have ``shape`` and ``dtype`` (arrays or
        ``jax.ShapeDtypeStruct``); a flat ``{dotted name: leaf}`` dict names its leaves alike.
    """
    expected, actual = leaves_by_name(expected), leaves_by_name(actual)

    def problem(want, got) -> str | None:
        shape, want_shape = tuple(np.shape(got)), tuple(want.shape)
        if shape != want_shape:
            return f"has shape {shape_str(shape)}, expected {shape_str(want_shape)}"
        if dtypes and getattr(got, "dtype", None) is not None and np.dtype(got.dtype) != np.dtype(want.dtype):
            return f"has dtype {got.dtype}, expected {want.dtype}"
        return None

    missing, unexpected, mismatched = differing_names(
        expected, actual, lambda want, got: problem(want, got) is None)
    return TreeDifferences(missing, unexpected, tuple(
        f"{name} {problem(expected[name], actual[name])}" for name in mismatched))

