"""Sharded checkpoints through Orbax: each process writes its own shards, restore on any mesh.

For a training state too large to gather on one host (see :mod:`jaxnet.sharding`); a state
that fits one host keeps the portable single-file format of :mod:`jaxnet.checkpoint`.

A checkpoint is a directory ``ckpt-<step>`` (``ckpt-000120``) written by Orbax's
``CompositeCheckpointHandler`` with two items:

- ``state``: every leaf of the ``TrainState`` under its dotted name (``params.dense_1.w``,
  ``opt_state.0.mu.dense_1.w``, ``step``, ``key``; PRNG keys as their ``uint32`` key data), as
  Orbax's OCDBT/Zarr array store. Each process writes the shards its devices hold (one copy
  of each shard: Orbax skips replicas), so nothing is gathered on one host;
- ``manifest``: jaxnet's JSON: the format and version, the step, each leaf's name, shape,
  dtype and checksum (and ``key_impl`` for PRNG keys), the mesh it was saved from, the
  caller's ``metadata``, library versions, and the SHA-256 of the manifest itself.

Atomic: Orbax writes into ``ckpt-<step>.orbax-checkpoint-tmp-<time>``, writes
``commit_success.txt`` last and renames the directory into place, after every process has
finished (barriers). A ``ckpt-<step>`` without ``commit_success.txt`` is refused as incomplete
and never listed by :func:`latest_sharded`.

Verified: a leaf's checksum does not depend on how it is sharded. It is the sum, modulo
``2**32``, of a hash of each element's bits mixed with its position in the whole array
(MurmurHash3's finaliser), twice with two seeds: each process sums the shards it holds (one
replica of each), and the processes add their sums (a few bytes per leaf cross the network,
never the arrays). Saving records it; restoring computes it again from the shards as placed on
the new mesh, so the values read back are checked whatever the layout. The same pass refuses
to save a state holding NaN. The manifest is compared with the template before any
array is read: a checkpoint of another model is refused naming the mismatched leaves. (Orbax's
OCDBT store checks a CRC-32C of its index nodes; a byte flipped inside an array's data was read
back without complaint in orbax-checkpoint 0.12.8, and is found by these checksums.)

>>> path = save_sharded("run/checkpoints", state)              # every process calls it
>>> state, manifest = restore_sharded(path, template, mesh, specs)   # any mesh
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxnet._version import __version__
from jaxnet.checkpoint import CheckpointError, delete_checkpoint
from jaxnet.run_manifest import manifest_digest
from jaxnet.sharding import param_specs, state_specs
from jaxnet.trees import compare_trees, named_leaves
from jaxnet.validate import positive_int

FORMAT = "jaxnet-sharded-checkpoint"
FORMAT_VERSION = 1
STATE_ITEM, MANIFEST_ITEM = "state", "manifest"
COMMIT_MARKER = "commit_success.txt"  # Orbax's: written last, inside the temporary directory
TEMPORARY_MARKER = ".orbax-checkpoint-tmp"  # in the name of an unfinished save's directory
_NAME = re.compile(r"ckpt-(\d+)")
_SEEDS = (0x9E3779B9, 0x7F4A7C15)  # two checksum seeds: 64 bits per leaf


def _orbax():
    try:
        import orbax.checkpoint as ocp  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise ImportError("sharded checkpoints need orbax-checkpoint: pip install "
                          "'jaxnet[sharding]'") from None
    return ocp


# --- checksums ----------------------------------------------------------------------------------


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser on ``uint32`` (wrapping): every input bit changes about
    half the output bits."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _words(block: np.ndarray) -> np.ndarray:
    """The bits of ``block`` as ``uint32`` words, ``(*block.shape, k)``: one word per element
    of up to 4 bytes, two for 8-byte elements."""
    block = np.ascontiguousarray(block)
    size = block.dtype.itemsize
    if size == 8:
        return block.view(np.uint32).reshape(*block.shape, 2)
    return block.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[size]).astype(np.uint32)[..., None]


def _shard_sums(block: np.ndarray, index: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    """``uint32[2]``: for each seed, the sum mod ``2**32`` of ``fmix(word ^ fmix(position +
    seed))`` over the words of one shard, ``position`` being the word's row-major index in the
    whole array (mod ``2**32``)."""
    words = _words(block)
    full = (*shape, words.shape[-1])
    position = np.zeros((), np.uint64)
    for axis, part in enumerate((*index, slice(None))):
        start, stop, _ = part.indices(full[axis])
        stride = np.uint64(math.prod(full[axis + 1:]) % 2**32)
        along = (np.arange(start, stop, dtype=np.uint64) * stride) % np.uint64(2**32)
        position = (position + along.reshape((-1,) + (1,) * (len(full) - axis - 1))) % np.uint64(
            2**32)
    position = np.broadcast_to(position.astype(np.uint32), words.shape)
    return np.array([np.sum(_fmix32(words ^ _fmix32(position + np.uint32(seed))),
                            dtype=np.uint32) for seed in _SEEDS], np.uint32)


def leaf_summaries(arrays: dict[str, jax.Array]) -> tuple[dict[str, str], list[str]]:
    """``({name: checksum}, non-finite leaves)`` of placed arrays, read shard by shard.

    The checksum (16 hex digits) does not depend on how an array is sharded: integer sums do
    not depend on their order, so each process sums the shards it holds (one replica of each)
    and the processes' sums are added (``process_allgather``, a few bytes per leaf). The same
    pass finds the leaves a checkpoint must not hold, by the rule of
    :func:`jaxnet.checkpoint.non_finite_leaves` (``"params.w (NaN)"``; an infinity only
    outside ``opt_state``).
    """
    names = list(arrays)
    sums = np.zeros((len(names), 4), np.uint64)  # two checksums, NaN seen, inf seen
    for row, name in enumerate(names):
        leaf = arrays[name]
        floating = jnp.issubdtype(leaf.dtype, jnp.inexact)
        for shard in leaf.addressable_shards:
            if shard.replica_id:
                continue
            block = np.asarray(shard.data)
            sums[row, :2] += _shard_sums(block, shard.index, leaf.shape)
            if floating:
                sums[row, 2:] += (np.isnan(block).any(), np.isinf(block).any())
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415 - multi-process only
        sums = np.asarray(multihost_utils.process_allgather(sums)).sum(axis=0, dtype=np.uint64)
    checksums = {name: "".join(f"{int(v) % 2**32:08x}" for v in sums[row, :2])
                 for row, name in enumerate(names)}
    non_finite = [f"{name} ({'NaN' if sums[row, 2] else 'inf'})" for row, name in enumerate(names)
                  if sums[row, 2] or (sums[row, 3] and "opt_state" not in name.split("."))]
    return checksums, non_finite


# --- what is stored -----------------------------------------------------------------------------


def _storable(state) -> tuple[dict[str, Any], set[str]]:
    """``({dotted name: leaf}, names of PRNG keys)`` with keys as their ``uint32`` key data;
    works on arrays and on ``jax.ShapeDtypeStruct`` leaves alike."""
    leaves, keys = {}, set()
    for name, leaf in named_leaves(state):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            keys.add(name)
            leaf = (jax.random.key_data(leaf) if isinstance(leaf, jax.Array)
                    else jax.eval_shape(jax.random.key_data, leaf))
        leaves[name] = leaf
    return leaves, keys


def _mesh_of(arrays: dict[str, jax.Array]) -> dict[str, int] | None:
    for leaf in arrays.values():
        if isinstance(leaf.sharding, NamedSharding):
            return {name: int(size) for name, size in leaf.sharding.mesh.shape.items()}
    return None


def _versions() -> dict[str, str]:
    return {"jaxnet": __version__, "jax": jax.__version__,
            "orbax-checkpoint": importlib.metadata.version("orbax-checkpoint")}


# --- saving -------------------------------------------------------------------------------------


def save_sharded(directory, state, step: int | None = None, *,
                 metadata: dict[str, Any] | None = None, keep: int | None = None) -> Path:
    """Saves a (sharded) ``state`` as ``directory/ckpt-<step>``; every process must call it.

    Args:
      directory: the checkpoints directory, on a file system every process can reach.
      state: a ``TrainState`` (or any pytree of ``jax.Array``), placed however it is: each
        process writes the shards of its own devices.
      step: the checkpoint's step; default ``int(state.step)``.
      metadata: JSON values stored in the manifest (the epoch, the run's config).
      keep: when given, only the ``keep`` newest complete sharded checkpoints are kept
        (process 0 removes the older ones, once every process has written).

    Returns:
      The checkpoint's directory.

    Raises:
      FileExistsError: ``ckpt-<step>`` exists already (complete or not: the message says).
      FloatingPointError: the state holds NaN (or inf outside the optimizer state); nothing is
        written.
      ImportError: orbax-checkpoint is not installed.
    """
    ocp = _orbax()
    if keep is not None:
        positive_int("save_sharded", "keep", keep)
    step = int(state.step) if step is None else int(step)
    final = Path(directory) / f"ckpt-{step:06d}"
    if final.exists() or final.is_symlink():
        complete = (final / COMMIT_MARKER).is_file()
        raise FileExistsError(f"{final}: a checkpoint of step {step} already exists" if complete
                              else _incomplete_message(final))
    arrays, keys = _storable(state)
    impls = {name: str(jax.random.key_impl(leaf)) for name, leaf in named_leaves(state)
             if name in keys}
    checksums, non_finite = leaf_summaries(arrays)
    if non_finite:
        raise FloatingPointError(f"{final}: not written: the training state is not finite "
                                 f"({', '.join(non_finite)})")
    leaves = [{"name": name, "shape": list(a.shape), "dtype": np.dtype(a.dtype).name,
               "checksum": checksums[name], **({"key_impl": impls[name]} if name in impls else {})}
              for name, a in arrays.items()]
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
                "leaves": leaves, "mesh": _mesh_of(arrays), "metadata": metadata or {},
                "versions": _versions()}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        checkpointer.save(final, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(arrays),
            MANIFEST_ITEM: ocp.args.JsonSave(manifest)}))
    finally:
        checkpointer.close()
    if keep is not None and jax.process_index() == 0:  # Orbax's save ends with a barrier
        for old in list_sharded(directory)[:-keep]:
            delete_checkpoint(old)
    return final


# --- finding ------------------------------------------------------------------------------------


def list_sharded(directory) -> list[Path]:
    """The complete sharded checkpoints in ``directory`` (with Orbax's commit marker), oldest
    step first; an interrupted save's directory is never listed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _NAME.fullmatch(p.name)) and (p / COMMIT_MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_sharded(directory) -> Path | None:
    """The newest complete sharded checkpoint in ``directory``, or None."""
    found = list_sharded(directory)
    return found[-1] if found else None


def _incomplete_message(path: Path) -> str:
    return (f"{path}: an incomplete sharded checkpoint (no {COMMIT_MARKER}, which Orbax writes "
            "last: the save was interrupted, or the directory was copied or damaged); remove it")


def _check_complete(path: Path) -> None:
    if TEMPORARY_MARKER in path.name:
        raise CheckpointError(f"{path}: the temporary directory of an unfinished save, not a "
                              "checkpoint; remove it")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not (path / COMMIT_MARKER).is_file():
        raise CheckpointError(_incomplete_message(path))
    for item in (STATE_ITEM, MANIFEST_ITEM):
        if not (path / item).is_dir():
            raise CheckpointError(f"{path}: no {item}/ (not a jaxnet sharded checkpoint, or "
                                  "damaged)")


# --- restoring ----------------------------------------------------------------------------------


def read_manifest(path) -> dict:
    """The verified manifest of the sharded checkpoint ``path``, no arrays read.

    Raises:
      CheckpointError: an incomplete or missing checkpoint, a manifest of another format, of a
        newer format version, or whose SHA-256 does not match (the message names the path).
    """
    ocp = _orbax()
    path = Path(path)
    _check_complete(path)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        manifest = checkpointer.restore(path, args=ocp.args.Composite(**{
            MANIFEST_ITEM: ocp.args.JsonRestore()}))[MANIFEST_ITEM]
    except (ValueError, OSError) as error:
        raise CheckpointError(f"{path}: cannot read the manifest ({error})") from None
    finally:
        checkpointer.close()

    def require(ok: bool, problem: str) -> None:
        if not ok:
            raise CheckpointError(f"{path / MANIFEST_ITEM}: {problem}")

    require(isinstance(manifest, dict) and manifest.get("format") == FORMAT,
            f"not a jaxnet sharded checkpoint manifest (expected \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    require(isinstance(version, int) and 1 <= version, f"bad format_version {version!r}")
    require(version <= FORMAT_VERSION, f"format version {version} is newer than this jaxnet "
                                       f"reads ({FORMAT_VERSION}); upgrade jaxnet to restore it")
    require(manifest.get("manifest_sha256") == manifest_digest(manifest),
            "SHA-256 does not match its contents (the file is damaged or was edited)")
    return manifest


def restore_sharded(path, template, mesh: jax.sharding.Mesh, specs=None):
    """Restores a sharded checkpoint onto ``mesh``, which may differ from the one it was saved
    from; each process reads only the shards its devices get.

    Args:
      path: a checkpoint directory (e.g. from :func:`latest_sharded`).
      template: a ``TrainState`` of the model and optimizer (arrays or ``jax.ShapeDtypeStruct``
        from ``jax.eval_shape``): its structure, shapes and dtypes.
      mesh: where to place the state.
      specs: the params' ``PartitionSpec`` tree on ``mesh`` (:func:`jaxnet.sharding.param_specs`);
        default: jaxnet's rules. The optimizer state follows the params.

    Returns:
      ``(state, manifest)``: ``template``'s structure holding the checkpoint's arrays, sharded
      on ``mesh``, and the manifest.

    Raises:
      CheckpointError: an incomplete save, a checkpoint of another model or optimizer (naming
        the missing, unexpected and mis-shaped leaves), a damaged manifest, or values whose
        checksum differs from the manifest's (naming the leaves).
      ImportError: orbax-checkpoint is not installed.
    """
    ocp = _orbax()
    path = Path(path)
    manifest = read_manifest(path)
    stored = {leaf["name"]: jax.ShapeDtypeStruct(tuple(leaf["shape"]), np.dtype(leaf["dtype"]))
              for leaf in manifest["leaves"]}
    expected, keys = _storable(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                             template))
    differences = compare_trees(expected, stored)
    if differences:
        raise CheckpointError(f"{path}: does not fit the model: {differences.describe()}")
    specs = param_specs(template.params, mesh) if specs is None else specs
    layout = dict(named_leaves(state_specs(template, specs)))
    target = {name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                         sharding=NamedSharding(mesh, layout[name]))
              for name, leaf in expected.items()}
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        arrays = checkpointer.restore(path, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(target)}))[STATE_ITEM]
    except (ValueError, OSError) as error:
        raise CheckpointError(f"{path}: cannot read the arrays ({error})") from None
    finally:
        checkpointer.close()
    recorded = {leaf["name"]: leaf["checksum"] for leaf in manifest["leaves"]}
    damaged = [name for name, value in leaf_summaries(arrays)[0].items()
               if value != recorded[name]]
    if damaged:
        raise CheckpointError(f"{path}: the values of {', '.join(damaged)} do not match the "
                              "manifest's checksums (the stored arrays are damaged)")
    impls = {leaf["name"]: leaf.get("key_impl") for leaf in manifest["leaves"]}
    leaves = [_as_key(arrays[name], impls[name], template_leaf, path, name) if name in keys
              else arrays[name] for name, template_leaf in named_leaves(template)]
    return jax.tree.unflatten(jax.tree.structure(template), leaves), manifest


def _as_key(data: jax.Array, impl: str | None, template_leaf, path: Path, name: str) -> jax.Array:
    """Stored key data rewrapped as a PRNG key of the template's type."""
    if not impl:
        raise CheckpointError(f"{path}: {name} is stored as plain data, the model expects a "
                              f"PRNG key of type {template_leaf.dtype}")
    key = jax.random.wrap_key_data(data, impl=impl)
    if key.dtype != template_leaf.dtype:
        raise CheckpointError(f"{path}: {name} is a PRNG key of type {key.dtype}, the model "
                              f"expects {template_leaf.dtype}")
    return key
