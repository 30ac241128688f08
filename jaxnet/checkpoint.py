"""Checkpoints: the whole training state, saved atomically and verified on load; never pickle.

A checkpoint is a directory ``ckpt-<step>`` (``ckpt-000120``) inside a checkpoints directory:

- ``state.safetensors``: every leaf of the ``TrainState`` under its readable tree path
  (``params.dense_1.w``, ``opt_state.0.mu.dense_1.w``, ``step``, ``key``); PRNG keys are stored
  as their raw ``uint32`` key data;
- ``manifest.json``: the format version, step, every leaf's name, shape and dtype, the SHA-256
  and size of the tensor file, free-form ``metadata`` (the run config, the epoch, the history),
  library versions, and the SHA-256 of the manifest itself.

It is written into a temporary directory, each file fsynced, the directory renamed to its final
name and its parent fsynced: a ``ckpt-*`` directory either is complete or does not exist, and
older checkpoints are deleted only after the new one is complete; a non-finite state is never
saved. Restoring checks everything (regular files, sizes before reading, format, checksums,
the step against the directory's name, manifest against tensors, tensors against a template)
and raises :class:`CheckpointError` naming the file and the problem. See
``docs/checkpoints.md``.

>>> path = save_checkpoint("run/checkpoints", state, metadata={"epoch": 3}, keep=3)
>>> state, manifest = restore_checkpoint(latest_checkpoint("run/checkpoints"), template)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors
import safetensors.numpy

from jaxnet._version import __version__
from jaxnet.run_manifest import (PARAMS_FILE, RunVerificationError, manifest_digest,
                                 verify_run, warn_unverified)
from jaxnet.validate import positive_int
from jaxnet.tensorfile import (atomic_write, current_umask, fsync_directory, open_regular,
                               read_regular, read_safetensors, unreadable_reason)
from jaxnet.trees import differing_names, named_leaves

FORMAT = "jaxnet-checkpoint"
FORMAT_VERSION = 1
TENSOR_FILE = "state.safetensors"
MANIFEST_FILE = "manifest.json"
RUN_PARAMS_FILE = PARAMS_FILE  # a finished run directory's params (jaxnet train)
MAX_MANIFEST_BYTES = 1 << 26  # manifests hold the run's history: far less than this
_NAME = re.compile(r"ckpt-(\d+)")
_MAX_LISTED = 8  # entries of each kind a message names (mismatched leaves, non-finite ones)


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, from a newer jaxnet, or does not fit the model."""


class RestoreReport(NamedTuple):
    """What a partial restore took from the checkpoint (dotted leaf names, e.g. ``dense_1.w``).

    Attributes:
      restored: taken from the checkpoint.
      missing: in the template but not in the checkpoint; kept from the template.
      unexpected: in the checkpoint but not in the template; ignored.
      mismatched: in both with another shape or dtype, as ``"name: (64, 32) float32 in the
        checkpoint, (64, 16) float32 expected"``; kept from the template.
    """

    restored: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[str, ...]


# --- saving -------------------------------------------------------------------------------------


def save_checkpoint(directory, state, *, metadata: dict[str, Any] | None = None,
                    keep: int | None = None) -> Path:
    """Saves ``state`` as ``directory/ckpt-<step>`` atomically and durably.

    Args:
      directory: the checkpoints directory (created if needed); one writer at a time.
      state: a ``TrainState`` (any pytree of arrays with an integer ``step`` attribute).
      metadata: JSON-serialisable values stored in the manifest (e.g. the run config, epoch).
      keep: when given, only the ``keep`` newest complete checkpoints are kept; older ones are
        deleted after the new one is complete.

    Returns:
      The new checkpoint's directory.

    Raises:
      FileExistsError: a checkpoint of this step already exists (or a ``ckpt-<step>`` entry
        that is not a complete checkpoint: the message says so).
      FloatingPointError: the state is not finite (see :func:`non_finite_leaves`); nothing is
        written, so a checkpoint never holds a diverged state.
      OSError: the disk is full or another write error (the message names the checkpoint). No
        checkpoint is damaged and no partial one is left behind; whether the new one exists
        depends on how far the save got, and if it is listed it is complete.
    """
    directory = Path(directory)
    if keep is not None:
        positive_int("save_checkpoint", "keep", keep)
    step = int(state.step)
    final = directory / f"ckpt-{step:06d}"
    if final.exists() or final.is_symlink():
        if final not in list_checkpoints(directory):
            raise FileExistsError(_incomplete_message(final))
        raise FileExistsError(f"{final}: a checkpoint of step {step} already exists")
    check_finite(state, f"{final}: not written")
    tensors, leaves = _to_host(state)
    tensor_bytes = safetensors.numpy.save(tensors)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
        "tensor_file": {"name": TENSOR_FILE, "bytes": len(tensor_bytes),
                        "sha256": hashlib.sha256(tensor_bytes).hexdigest()},
        "leaves": leaves, "metadata": metadata or {},
        "versions": {"jaxnet": __version__, "jax": jax.__version__,
                     "optax": optax.__version__, "safetensors": safetensors.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(directory)
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
    try:
        atomic_write(tmp / TENSOR_FILE, tensor_bytes)
        atomic_write(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())  # the marker
        os.rename(tmp, final)  # the checkpoint appears complete, or not at all
        fsync_directory(directory)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(error.errno, f"{final}: cannot write the checkpoint ({error.strerror or error}"
                                   "); earlier checkpoints are untouched") from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(directory)[:-keep]:
            delete_checkpoint(old)
    return final


def _to_host(state) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The tensors to store (PRNG keys as key data) and their manifest entries, in tree order."""
    tensors, leaves = {}, []
    for name, leaf in named_leaves(state):
        entry = {"name": name}
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            entry["key_impl"] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        tensors[name] = np.asarray(leaf)
        entry.update(shape=list(tensors[name].shape), dtype=tensors[name].dtype.name)
        leaves.append(entry)
    return tensors, leaves


def _remove_leftovers(directory: Path) -> None:
    """Removes what a killed writer left: ``.ckpt-*`` temporary and half-deleted directories."""
    for leftover in directory.glob(".ckpt-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def delete_checkpoint(checkpoint: Path) -> None:
    """Renames a checkpoint out of ``ckpt-*`` first, so that no half-deleted one is ever listed."""
    doomed = checkpoint.with_name(f".{checkpoint.name}.deleting")
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed)


def non_finite_leaves(state) -> list[str]:
    """The leaves of ``state`` (a ``TrainState`` or any pytree) that a checkpoint must not hold,
    as ``"params.dense_1.w (NaN)"``: floating leaves with a NaN, or, outside an optimizer state
    (a path through ``opt_state``), an infinity. An optimizer may hold an infinity on purpose
    (optax's ``reduce_on_plateau`` starts its best value at inf); a NaN it never means to.

    The tests run where the arrays are, in one compiled program, and one ``(leaves, 2)`` array
    comes back: a reduction per leaf, not a copy of the state. One program, not one per leaf:
    on a mesh the reductions of sharded leaves hold collectives, and several small programs
    with collectives in flight at once can deadlock XLA's CPU devices.
    """
    floating = [(name, leaf) for name, leaf in named_leaves(state)
                if jnp.issubdtype(getattr(leaf, "dtype", np.dtype(type(leaf))), jnp.inexact)]
    flags = np.asarray(_nan_inf([leaf for _, leaf in floating])) if floating else []
    found = []
    for (name, _), (nan, inf) in zip(floating, flags):
        if nan or (inf and "opt_state" not in name.split(".")):
            found.append(f"{name} ({'NaN' if nan else 'inf'})")
    return found


@jax.jit
def _nan_inf(leaves: list) -> jax.Array:
    """``bool (len(leaves), 2)``: whether each leaf holds a NaN, an infinity."""
    return jnp.stack([jnp.stack([jnp.isnan(leaf).any(), jnp.isinf(leaf).any()])
                      for leaf in leaves])


def check_finite(state, what: str) -> None:
    """Raises ``FloatingPointError`` starting with ``what`` when ``state`` holds leaves that
    :func:`non_finite_leaves` names (the first few are listed)."""
    found = non_finite_leaves(state)
    if found:
        raise FloatingPointError(f"{what}: the training state is not finite ({_listed(found)})")


# --- finding ------------------------------------------------------------------------------------


def list_checkpoints(directory) -> list[Path]:
    """The complete checkpoints in ``directory`` (those with a manifest), oldest step first.

    Temporary directories of an interrupted save are not listed. A missing directory has none.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _NAME.fullmatch(p.name)) and (p / MANIFEST_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None when there is none."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def incomplete_checkpoints(directory) -> list[Path]:
    """The ``ckpt-<number>`` entries of ``directory`` that are not complete checkpoints (no
    regular ``manifest.json``), oldest step first. ``save_checkpoint`` never leaves one (it
    renames a complete directory into place), so each is damage or a foreign file; it is never
    listed, and it would block the save of its step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    complete = set(list_checkpoints(directory))
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _NAME.fullmatch(p.name)) and p not in complete]
    return [p for _, p in sorted(found)]


def check_checkpoints(directory) -> None:
    """Raises :class:`CheckpointError` naming the first ``ckpt-<number>`` entry of
    ``directory`` that is not a complete checkpoint (see :func:`incomplete_checkpoints`):
    resuming past it would end in "a checkpoint of step N already exists" at every try."""
    if found := incomplete_checkpoints(directory):
        others = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise CheckpointError(_incomplete_message(found[0]) + others)


def _incomplete_message(path: Path) -> str:
    return (f"{path}: not a complete checkpoint (no regular {MANIFEST_FILE}; jaxnet never "
            "leaves one: it is damaged or was put there); remove it, as it blocks the save of "
            "its step")


# --- reading ------------------------------------------------------------------------------------


def read_checkpoint(path) -> tuple[dict[str, np.ndarray], dict]:
    """Reads and verifies a checkpoint directory; no code is run and nothing is unpickled.

    Returns:
      ``(tensors, manifest)``: the stored arrays by dotted name (PRNG keys as their ``uint32``
      key data) and the manifest (``step``, ``leaves``, ``metadata``, ``versions``, ...).

    Raises:
      CheckpointError: no manifest, a manifest that is not valid JSON, damaged (checksum), of
        another format or of a newer format version; a tensor file that is missing, truncated,
        damaged (checksum), unreadable, or disagrees with the manifest. The message names the file.
    """
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    manifest = _read_manifest(manifest_file)
    named = _NAME.fullmatch(path.name)
    if named and int(named.group(1)) != manifest["step"]:
        raise CheckpointError(f"{manifest_file}: step {manifest['step']}, but the directory "
                              f"{path.name} is named for step {int(named.group(1))} (renamed or "
                              "forged)")
    spec = manifest["tensor_file"]
    tensor_file = path / spec["name"]
    try:  # a regular file of the recorded size, checked before anything is read
        f, size = open_regular(tensor_file)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{tensor_file}: cannot read ({unreadable_reason(error)})") from None
    with f:
        if size != spec["bytes"]:
            raise CheckpointError(f"{tensor_file}: {size} bytes, the manifest says "
                                  f"{spec['bytes']} (truncated or replaced)")
        data = f.read(size)
    if len(data) != size or hashlib.sha256(data).hexdigest() != spec["sha256"]:
        raise CheckpointError(f"{tensor_file}: SHA-256 does not match the manifest (the file is "
                              "damaged)")
    try:
        tensors = safetensors.numpy.load(data)
    except (safetensors.SafetensorError, ValueError, TypeError) as error:
        raise CheckpointError(f"{tensor_file}: not a readable safetensors file ({error})") from None
    described = {leaf["name"]: (tuple(leaf["shape"]), leaf["dtype"]) for leaf in manifest["leaves"]}
    stored = {name: (a.shape, a.dtype.name) for name, a in tensors.items()}
    if described != stored:
        report = _compare(stored, described)
        raise CheckpointError(f"{tensor_file}: the tensors disagree with {manifest_file}: "
                              f"{_describe_problems(report, 'the manifest')}")
    if "step" in tensors and tensors["step"].shape == () and tensors["step"] != manifest["step"]:
        raise CheckpointError(f"{tensor_file}: holds step {int(tensors['step'])}, "
                              f"{manifest_file} says step {manifest['step']}")
    return {name: tensors[name] for name in described}, manifest  # in tree order


def _read_manifest(manifest_file: Path) -> dict:
    try:
        text = read_regular(manifest_file, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_file}: missing; {manifest_file.parent} is not a "
                              "complete jaxnet checkpoint") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{manifest_file}: cannot read ({unreadable_reason(error)})"
                              ) from None
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as error:  # bad UTF-8 or JSON; absurd nesting
        raise CheckpointError(f"{manifest_file}: not valid JSON ({error})") from None

    def require(ok: bool, problem: str) -> None:
        if not ok:
            raise CheckpointError(f"{manifest_file}: {problem}")

    require(isinstance(manifest, dict) and manifest.get("format") == FORMAT,
            f"not a jaxnet checkpoint manifest (expected \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    require(_is_int(version) and version >= 1, f"bad format_version {version!r}")
    require(version <= FORMAT_VERSION, f"format version {version} is newer than this jaxnet reads "
                                       f"({FORMAT_VERSION}); upgrade jaxnet to restore it")
    require(manifest.get("manifest_sha256") == manifest_digest(manifest),
            "SHA-256 does not match its contents (the file is damaged or was edited)")
    spec, leaves = manifest.get("tensor_file"), manifest.get("leaves")
    require(_is_int(manifest.get("step")) and manifest["step"] >= 0, "step must be an integer >= 0")
    require(isinstance(manifest.get("metadata"), dict), "metadata must be an object")
    require(isinstance(spec, dict) and isinstance(spec.get("name"), str)
            and Path(spec["name"]).name == spec["name"] and spec["name"] not in ("", ".", "..")
            and _is_int(spec.get("bytes")) and isinstance(spec.get("sha256"), str),
            "tensor_file must hold a plain file name, bytes and sha256")
    require(isinstance(leaves, list) and all(
        isinstance(leaf, dict) and isinstance(leaf.get("name"), str)
        and isinstance(leaf.get("dtype"), str) and isinstance(leaf.get("shape"), list)
        and all(_is_int(d) and d >= 0 for d in leaf["shape"])
        and isinstance(leaf.get("key_impl", ""), str) for leaf in leaves),
            "leaves must be a list of {name, shape, dtype} objects")
    names = [leaf["name"] for leaf in leaves]
    require(len(set(names)) == len(names), "leaf names repeat")
    return manifest


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- restoring ----------------------------------------------------------------------------------


def restore_checkpoint(path, template):
    """Restores a checkpoint into the structure of ``template``, verifying everything.

    Args:
      path: a checkpoint directory (e.g. from :func:`latest_checkpoint`).
      template: a pytree of the expected structure, shapes and dtypes, e.g. a fresh
        ``TrainState`` from ``init_train_state`` (arrays or ``jax.ShapeDtypeStruct`` leaves,
        such as ``jax.eval_shape`` gives).

    Returns:
      ``(state, manifest)``: ``template``'s structure holding the checkpoint's arrays (on the
      default device; PRNG keys rewrapped with their implementation), and the manifest.

    Raises:
      CheckpointError: see :func:`read_checkpoint`; also a checkpoint of another architecture
        or optimizer (naming the missing, unexpected and mis-shaped entries).
    """
    path = Path(path)
    tensors, manifest = read_checkpoint(path)
    impls = {leaf["name"]: leaf.get("key_impl") for leaf in manifest["leaves"]}
    expected = named_leaves(template)
    report = _compare(_descriptions(tensors, impls), _descriptions(dict(expected)))
    if report.missing or report.unexpected or report.mismatched:
        raise CheckpointError(f"{path}: does not fit the model: "
                              f"{_describe_problems(report, 'the model')}")
    leaves = [_to_device(tensors[name], impls[name], leaf, path / TENSOR_FILE, name)
              for name, leaf in expected]
    return jax.tree.unflatten(jax.tree.structure(template), leaves), manifest


def restore_params(path, template, *, partial: bool = False):
    """Restores only the parameters of a checkpoint or a run (for evaluation or fine-tuning).

    Args:
      path: a checkpoint directory, or a finished ``jaxnet train`` run directory (its
        ``params.safetensors`` is read).
      template: a params tree (from ``net.init`` or ``jax.eval_shape``) of the target network.
      partial: when False, the checkpoint's params must match ``template`` exactly; when True,
        every leaf with the same name, shape and dtype is restored and the others are kept
        from ``template`` (a new output layer for fine-tuning, say).

    Returns:
      ``(params, report)``: ``template``'s structure, and a :class:`RestoreReport` saying
      exactly which leaves came from the checkpoint and which did not, and why.

    Raises:
      CheckpointError: see :func:`read_checkpoint`; a directory that is neither a checkpoint nor
        a finished run; with ``partial=False``, also params that do not match ``template``.
    """
    path = Path(path)
    if path.is_dir() and not (path / MANIFEST_FILE).exists():
        stored = _run_params(path)
    else:
        tensors, manifest = read_checkpoint(path)
        prefix = "params."
        stored = {name[len(prefix):]: a for name, a in tensors.items() if name.startswith(prefix)}
    expected = named_leaves(template)
    report = _compare(_descriptions(stored), _descriptions(dict(expected)))
    if not partial and (report.missing or report.unexpected or report.mismatched):
        raise CheckpointError(f"{path}: params do not fit the model: "
                              f"{_describe_problems(report, 'the model')}; pass partial=True to "
                              "restore the matching ones")
    restored = set(report.restored)
    leaves = [jnp.asarray(stored[name]) if name in restored else leaf for name, leaf in expected]
    return jax.tree.unflatten(jax.tree.structure(template), leaves), report


def _run_params(run_dir: Path) -> dict[str, np.ndarray]:
    """The params of a finished run directory (``params.safetensors``), by dotted name, once
    the run's manifest has verified them (:func:`jaxnet.run_manifest.verify_run`)."""
    params_file = run_dir / RUN_PARAMS_FILE
    try:
        manifest = verify_run(run_dir)
    except RunVerificationError as error:
        raise CheckpointError(str(error)) from None
    if not params_file.is_file():
        raise CheckpointError(f"{run_dir}: neither a checkpoint (no {MANIFEST_FILE}) nor a "
                              f"finished run directory (no {RUN_PARAMS_FILE})")
    try:
        data = read_safetensors(params_file)
    except ValueError as error:  # names the file
        raise CheckpointError(str(error)) from None
    except OSError as error:
        raise CheckpointError(f"{params_file}: cannot read ({unreadable_reason(error)})") from None
    try:
        tensors = safetensors.numpy.load(data)
    except (safetensors.SafetensorError, ValueError, TypeError) as error:
        raise CheckpointError(f"{params_file}: not a readable safetensors file ({error})") from None
    if manifest is None:
        warn_unverified(run_dir)
    return tensors


def _descriptions(leaves: dict[str, Any], impls: dict[str, str | None] | None = None
                  ) -> dict[str, tuple]:
    """``{name: (shape, dtype name, is a PRNG key)}`` of stored arrays or template leaves.

    A template's PRNG key is described by its key data, as it is stored.
    """
    described = {}
    for name, leaf in leaves.items():
        is_key = jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        if is_key:
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        described[name] = (tuple(leaf.shape), np.dtype(leaf.dtype).name,
                           is_key or bool(impls and impls.get(name)))
    return described


def _compare(stored: dict[str, tuple], expected: dict[str, tuple]) -> RestoreReport:
    """Which of ``expected``'s leaves ``stored`` has, lacks, or has in another shape or dtype."""
    missing, unexpected, mismatched = differing_names(expected, stored, lambda a, b: a == b)
    return RestoreReport(
        restored=tuple(n for n in expected if n in stored and n not in mismatched),
        missing=missing, unexpected=unexpected,
        mismatched=tuple(f"{n}: {_spec(stored[n])} in the checkpoint, {_spec(expected[n])} "
                         "expected" for n in mismatched))


def _spec(description: tuple) -> str:
    shape, dtype = description[:2]
    return f"{shape} {dtype}" + (" (PRNG key data)" if description[2:] and description[2] else "")


def _listed(names) -> str:
    """The first few of ``names``, and how many more there are."""
    more = len(names) - _MAX_LISTED
    return ", ".join(names[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def _describe_problems(report: RestoreReport, other: str) -> str:
    parts = [f"missing {_listed(report.missing)}" if report.missing else "",
             f"unexpected {_listed(report.unexpected)} (not in {other})" if report.unexpected else "",
             f"mis-shaped {_listed(report.mismatched)}" if report.mismatched else ""]
    return "; ".join(p for p in parts if p)


def _to_device(array: np.ndarray, key_impl: str | None, template_leaf, where: Path,
               name: str) -> jax.Array:
    """A stored array on the device; PRNG key data rewrapped as a key like ``template_leaf``."""
    if not key_impl:
        return jnp.asarray(array)
    try:
        key = jax.random.wrap_key_data(array, impl=key_impl)
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{where}: {name} is not a {key_impl} PRNG key ({error})") from None
    if key.dtype != template_leaf.dtype:
        raise CheckpointError(f"{where}: {name} is a PRNG key of type {key.dtype}, the model "
                              f"expects {template_leaf.dtype}")
    return key


# --- interoperability ---------------------------------------------------------------------------

_TORCH_NAMES = {"w": "weight", "b": "bias", "scale": "weight", "bias": "bias", "table": "weight"}


def export_pytorch(params) -> dict[str, np.ndarray]:
    """The params in PyTorch's names and layouts, ready for ``module.load_state_dict``.

    ``Dense`` ``w (in, out)`` becomes ``weight (out, in)`` (``nn.Linear``); a ``Conv`` kernel
    ``(*kernel, in, out)`` (HWIO) becomes ``(out, in, *kernel)`` (OIHW, ``nn.Conv1d/2d/3d``);
    ``b`` becomes ``bias``; a norm's ``scale`` becomes ``weight``; an embedding
    ``table`` becomes ``weight``. Layer names are kept (``dense_1.weight``); map them to your
    module's names. This is the arrays-only path; :func:`jaxnet.to_torch` builds the whole
    module (with these names) and :func:`jaxnet.from_torch` loads weights back.

    Args:
      params: a jaxnet params tree.

    Returns:
      ``{"dense_1.weight": (out, in) array, "dense_1.bias": (out,) array, ...}``, writable
      C-contiguous NumPy arrays.

    Raises:
      ValueError: a leaf whose name has no PyTorch counterpart.
    """
    exported = {}
    for name, leaf in named_leaves(params):
        *layer, last = name.split(".")
        if last not in _TORCH_NAMES:
            raise ValueError(f"export_pytorch: no PyTorch name for {name}; known leaf names are "
                             f"{', '.join(_TORCH_NAMES)}")
        array = np.array(leaf)  # a writable copy, as torch.from_numpy wants
        if last == "w":  # (*kernel, in, out) -> (out, in, *kernel); Dense (in, out) -> (out, in)
            array = np.ascontiguousarray(np.moveaxis(array, (-1, -2), (0, 1)))
        exported[".".join([*layer, _TORCH_NAMES[last]])] = array
    return exported
