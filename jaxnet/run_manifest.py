"""The run manifest: the size and SHA-256 of every file a ``jaxnet train`` run wrote.

A run directory's ``run_manifest.json`` is written atomically, and last: at the start of a
run it lists ``config.json``; when the run finishes it is rewritten to list every result file
(``config.json``, ``metrics.jsonl``, ``curves.png``, ``model_state.safetensors`` when the
network has state, and ``params.safetensors``). A manifest that lists ``params.safetensors``
describes a finished run. Readers (:func:`jaxnet.load_run`, so ``jaxnet eval``, ``predict``,
``export``, ``generate``; :func:`jaxnet.checkpoint.restore_params` of a run directory;
``jaxnet train --resume``) call :func:`verify_run` before reading anything: a flipped byte, a
file swapped for another (of the same architecture, too), a missing file or one added to a
finished run is refused with :class:`RunVerificationError` naming the file.

Checkpoints carry their own manifests (:mod:`jaxnet.checkpoint`); ``metrics.jsonl`` of a
running run changes every epoch and is listed only once the run has finished.

A run directory written before manifests existed has none: it is read as it is, and readers
warn (:class:`UnverifiedRunWarning`); :func:`seal_run` adds a manifest of the files as they are.

>>> write_run_manifest("runs/a", ["config.json"])   # jaxnet train, after config.json
>>> verify_run("runs/a", finished=True)             # raises: the run has not finished
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

from jaxnet._version import __version__
from jaxnet.tensorfile import atomic_write, open_regular, read_regular, unreadable_reason

MANIFEST_FILE = "run_manifest.json"
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
STATE_FILE = "model_state.safetensors"
# The files of a run directory a manifest may list, in the order a finished run writes them.
RESULT_FILES = (CONFIG_FILE, "metrics.jsonl", "curves.png", STATE_FILE, PARAMS_FILE)
RUN_FILES = RESULT_FILES + (MANIFEST_FILE,)  # every file jaxnet train writes (checkpoints aside)
FORMAT = "jaxnet-run-manifest"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20  # a manifest lists a handful of files
_CHUNK = 1 << 20  # files are hashed in chunks of this many bytes


class RunVerificationError(ValueError):
    """A run directory's files disagree with its manifest, or the manifest is damaged."""


class UnverifiedRunWarning(UserWarning):
    """A run directory without a manifest was read as it is (written by an older jaxnet)."""


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of a manifest without its ``manifest_sha256`` entry (canonical JSON: sorted keys,
    no spaces); checkpoint manifests use the same."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def write_run_manifest(run_dir, names) -> Path:
    """Writes ``run_dir/run_manifest.json`` (atomically) listing the files ``names`` as they are
    now: their size and SHA-256.

    Args:
      run_dir: the run directory.
      names: file names among :data:`RESULT_FILES`; ``config.json`` first.

    Returns:
      The manifest's path.

    Raises:
      ValueError: a name that is not a run's file.
      OSError: a file cannot be read, or the manifest cannot be written (naming the file).
    """
    run_dir = Path(run_dir)
    unknown = [name for name in names if name not in RESULT_FILES]
    if unknown:
        raise ValueError(f"write_run_manifest: {unknown} are not files of a run; expected "
                         f"names among {', '.join(RESULT_FILES)}")
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "files": {name: _describe(run_dir / name) for name in names},
                "jaxnet": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    path = run_dir / MANIFEST_FILE
    atomic_write(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path


def seal_run(run_dir) -> Path:
    """Writes a manifest for a run directory that has none (written by an older jaxnet), of its
    result files as they are now: from then on they are verified. Returns the manifest's path.

    Raises:
      FileExistsError: the directory already has a manifest.
      FileNotFoundError: it has no ``config.json``.
    """
    run_dir = Path(run_dir)
    if (run_dir / MANIFEST_FILE).exists():
        raise FileExistsError(f"{run_dir / MANIFEST_FILE}: already exists; {run_dir} is sealed")
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / CONFIG_FILE}: missing; is {run_dir} a jaxnet run "
                                "directory?")
    return write_run_manifest(run_dir, [n for n in RESULT_FILES if (run_dir / n).is_file()])


def verify_run(run_dir, *, finished: bool = True) -> dict | None:
    """Checks every file ``run_dir``'s manifest lists: a regular file of the recorded size
    (checked before reading) and SHA-256.

    Args:
      run_dir: the run directory.
      finished: also require a finished run (the manifest lists ``params.safetensors``), as
        readers of its results do; ``jaxnet train --resume`` passes False. Of a finished run,
        a result file present but not listed (added afterwards) is refused too.

    Returns:
      The manifest, or None when the directory has none (see :func:`warn_unverified`).

    Raises:
      RunVerificationError: the manifest is damaged, of another format or a newer version; a
        listed file is missing, not a regular file, or has another size or SHA-256; an
        unfinished run with ``finished``; a file added to a finished run. The message starts
        with the file it is about.
    """
    run_dir = Path(run_dir)
    manifest_file = run_dir / MANIFEST_FILE
    if not manifest_file.exists() and not manifest_file.is_symlink():
        return None
    manifest = _read_manifest(manifest_file)
    files = manifest["files"]
    for name, recorded in files.items():
        _check_file(run_dir / name, recorded, manifest_file)
    if PARAMS_FILE in files:
        added = [name for name in RESULT_FILES if name not in files and (run_dir / name).exists()]
        if added:
            raise RunVerificationError(
                f"{run_dir / added[0]}: not in {manifest_file}, which lists every file the "
                "finished run wrote (it was added afterwards); remove it")
    elif finished:
        raise RunVerificationError(
            f"{run_dir / PARAMS_FILE}: not in {manifest_file}: the run has not finished; "
            f"resume it (jaxnet train --resume {run_dir})")
    return manifest


def is_finished(run_dir, manifest: dict | None) -> bool:
    """Whether ``run_dir`` (with ``manifest`` from :func:`verify_run`) holds a finished run:
    its manifest lists ``params.safetensors``; without a manifest, the file exists."""
    if manifest is None:
        return (Path(run_dir) / PARAMS_FILE).exists()
    return PARAMS_FILE in manifest["files"]


def warn_unverified(run_dir) -> None:
    """Warns (:class:`UnverifiedRunWarning`) that ``run_dir``, a run without a manifest, was
    read unverified."""
    warnings.warn(f"{run_dir}: no {MANIFEST_FILE} (written by an older jaxnet, or killed "
                  "as it started): its files were read without verification; "
                  f"jaxnet.run_manifest.seal_run('{run_dir}') records them as they are",
                  UnverifiedRunWarning, stacklevel=3)


def _describe(path: Path) -> dict:
    f, size = open_regular(path)
    with f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": size, "sha256": digest}


def _check_file(path: Path, recorded: dict, manifest_file: Path) -> None:
    """``path`` is a regular file of the recorded size and SHA-256; its size is checked before
    anything is read, and no more than that is read."""
    try:
        f, size = open_regular(path)
    except FileNotFoundError:
        raise RunVerificationError(f"{path}: missing; {manifest_file} lists it") from None
    except (OSError, ValueError) as error:
        raise RunVerificationError(f"{path}: cannot be verified ({unreadable_reason(error)})"
                                   ) from None
    with f:
        if size != recorded["bytes"]:
            raise RunVerificationError(f"{path}: {size} bytes, {manifest_file} records "
                                       f"{recorded['bytes']} (truncated, extended or replaced)")
        digest, left = hashlib.sha256(), size
        while left and (chunk := f.read(min(left, _CHUNK))):
            digest.update(chunk)
            left -= len(chunk)
    if left or digest.hexdigest() != recorded["sha256"]:
        raise RunVerificationError(f"{path}: SHA-256 does not match {manifest_file} (the file "
                                   "is damaged or was replaced)")


def _read_manifest(manifest_file: Path) -> dict:
    try:
        manifest = json.loads(read_regular(manifest_file, MAX_MANIFEST_BYTES))
    except (OSError, ValueError, RecursionError) as error:  # also bad UTF-8 or JSON
        raise RunVerificationError(f"{manifest_file}: cannot be read as a run manifest "
                                   f"({unreadable_reason(error)})") from None

    def require(ok: bool, problem: str) -> None:
        if not ok:
            raise RunVerificationError(f"{manifest_file}: {problem}")

    require(isinstance(manifest, dict) and manifest.get("format") == FORMAT,
            f"not a jaxnet run manifest (expected \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    require(isinstance(version, int) and not isinstance(version, bool) and version >= 1,
            f"bad format_version {version!r}")
    require(version <= FORMAT_VERSION, f"format version {version} is newer than this jaxnet "
                                       f"reads ({FORMAT_VERSION}); upgrade jaxnet")
    require(manifest.get("manifest_sha256") == manifest_digest(manifest),
            "SHA-256 does not match its contents (the file is damaged or was edited)")
    files = manifest.get("files")
    require(isinstance(files, dict) and CONFIG_FILE in files, f"files must list {CONFIG_FILE}")
    for name, entry in files.items():
        require(name in RESULT_FILES, f"lists {name!r}, which is not a file of a run")
        require(isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and not isinstance(entry["bytes"], bool) and entry["bytes"] >= 0
                and isinstance(entry.get("sha256"), str),
                f"files.{name} must hold bytes and sha256")
    return manifest
