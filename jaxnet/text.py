"""Character-level text: a corpus of files as next-character windows, and sampling from a model.

A corpus is a directory of text files (by default the Python standard library's own ``.py``
sources, which every Python installation has). Files are split into train and test files
(every tenth file of a fixed shuffle is a test file, so no file is in both), read until
``max_chars`` characters, encoded with a character :class:`Vocabulary` and cut into windows of
``seq_len + 1`` characters: a model reads the first ``seq_len`` and predicts the last
``seq_len`` (each character's successor).
"""

from __future__ import annotations

import functools
import random
import sysconfig
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnet.data import DataError

TEST_EVERY = 10  # every tenth file of the shuffled list is a test file
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class Vocabulary:
    """The characters a model knows; a character's id is its index.

    Args:
      chars: distinct single characters, in id order.
    """

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("a vocabulary is a non-empty list of single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("a vocabulary's characters must be distinct")
        self.chars = tuple(chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def of(cls, texts: Sequence[str]) -> Vocabulary:
        """Every character of ``texts``, sorted by code point."""
        return cls(sorted(set().union(*map(set, texts))))

    def __len__(self) -> int:
        return len(self.chars)

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of ``text`` not in the vocabulary, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self._ids))

    def encode(self, text: str) -> np.ndarray:
        """``text`` as ``(len(text),)`` int32 ids.

        Raises:
          ValueError: ``text`` has characters outside the vocabulary (the message lists them).
        """
        if missing := self.unknown(text):
            shown = ", ".join(repr(c) for c in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise ValueError(f"characters not in the vocabulary: {shown}")
        return np.fromiter((self._ids[c] for c in text), np.int32, len(text))

    def decode(self, ids) -> str:
        """The characters of ``ids`` (any integer array)."""
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))


class Corpus(NamedTuple):
    """A text corpus as windows: ``train``/``test`` are ``(n, seq_len + 1)`` int32 ids."""

    train: np.ndarray
    test: np.ndarray
    vocab: Vocabulary
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]


def default_corpus_dir() -> Path:
    """The Python standard library's directory (its ``.py`` files are the default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def text_files(root, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """The files under ``root`` (recursively, sorted; hidden files and directories,
    ``site-packages`` and ``__pycache__`` left out), only those ending in ``suffixes`` if given."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory of text files")
    found = []
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if any(p.startswith(".") or p in _SKIPPED_DIRS for p in parts) or not path.is_file():
            continue
        if suffixes is None or path.suffix in suffixes:
            found.append(path)
    return found


def _read_text(path: Path) -> str | None:
    """The file's text, or None for a file that is not UTF-8 text (binary, unreadable)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return None if "\0" in text else text


def windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """``(n, seq_len + 1)`` windows of ``ids``, each starting where the previous one's inputs end
    (stride ``seq_len``), so every character is predicted once; the leftover tail is dropped."""
    n = max(len(ids) - 1, 0) // seq_len
    starts = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return np.asarray(ids, np.int32)[starts] if n else np.zeros((0, seq_len + 1), np.int32)


def load_corpus(data_dir=None, *, seq_len: int = 128, max_chars: int = 2_000_000) -> Corpus:
    """Reads a directory of text files as train and test windows (deterministic).

    Files are listed sorted, shuffled with a fixed seed, and every tenth is a test file (the
    last one when there are fewer than ten). The test files get a tenth of ``max_chars``, the
    training files the rest; files are read in order until each budget is spent (the last one
    cut short). The vocabulary is every character read, sorted.

    Args:
      data_dir: the directory; ``None`` reads the standard library's ``.py`` files.
      seq_len: characters a model reads per window.
      max_chars: at most this many characters are read, in all.

    Raises:
      DataError: no directory, fewer than two text files, or too little text for one window
        in either split (the message names the directory).
    """
    root = default_corpus_dir() if data_dir is None else Path(data_dir)
    files = text_files(root, (".py",) if data_dir is None else None)
    if len(files) < 2:
        raise DataError(f"{root}: needs at least two text files (one for testing), found "
                        f"{len(files)}")
    random.Random(0).shuffle(files)
    test_at = {i for i in range(len(files)) if i % TEST_EVERY == TEST_EVERY - 1} or {len(files) - 1}
    budget = {"test": max(max_chars // TEST_EVERY, 1)}
    budget["train"] = max(max_chars - budget["test"], 1)
    texts, names = {"train": [], "test": []}, {"train": [], "test": []}
    for i, path in enumerate(files):
        split = "test" if i in test_at else "train"
        if budget[split] <= 0:
            if budget["train"] <= 0 and budget["test"] <= 0:
                break
            continue
        text = _read_text(path)
        if not text:
            continue
        text = text[:budget[split]]
        budget[split] -= len(text)
        texts[split].append(text)
        names[split].append(str(path.relative_to(root)))
    vocab = Vocabulary.of(texts["train"] + texts["test"]) if texts["train"] else None
    cut = {}
    for split in ("train", "test"):
        ids = vocab.encode("".join(texts[split])) if vocab and texts[split] else np.zeros(0, np.int32)
        cut[split] = windows(ids, seq_len)
        if not len(cut[split]):
            raise DataError(f"{root}: too little {split} text for one window of {seq_len + 1} "
                            f"characters (read {len(ids)} from {len(names[split])} files; raise "
                            "the character limit or add files)")
    return Corpus(cut["train"], cut["test"], vocab, tuple(names["train"]), tuple(names["test"]))


def generate(net, params, prompt: np.ndarray, length: int, *, context: int,
             temperature: float = 1.0, key=None, model_state=None) -> np.ndarray:
    """Samples ``length`` tokens after ``prompt`` from a causal model, one at a time.

    Every step runs the model on the last ``context`` tokens (left-truncated) held in a
    fixed-size buffer, padded on the right: causal outputs at real positions never depend on
    the padding, and one compiled program (a ``lax.scan`` over the steps) serves every step.

    Args:
      net: a causal model, ``(batch, time)`` ids to ``(batch, time, vocab)`` logits.
      params, model_state: its parameters and state.
      prompt: ``(n,)`` integer ids, ``n >= 1``.
      length: tokens to sample.
      context: the longest input the model takes (a trained window's length).
      temperature: logits are divided by it before sampling; 0 takes the most likely token.
      key: a PRNG key for sampling (default ``jax.random.key(0)``).

    Returns:
      ``(length,)`` int32 sampled ids.
    """
    prompt = np.asarray(prompt, np.int32).reshape(-1)
    if len(prompt) == 0:
        raise ValueError("the prompt must hold at least one token")
    if not (isinstance(length, int) and length >= 0):
        raise ValueError(f"length must be an integer >= 0, got {length!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if length == 0:
        return np.zeros(0, np.int32)
    tail = prompt[-context:]
    buffer = np.zeros(context, np.int32)
    buffer[:len(tail)] = tail
    key = jax.random.key(0) if key is None else key
    sample = _sampler(net, context, length, temperature == 0)
    tokens = sample(params, {} if model_state is None else model_state, jnp.asarray(buffer),
                    jnp.int32(len(tail)), key, jnp.float32(max(temperature, 1e-6)))
    return np.asarray(tokens, np.int32)


def _sampler(net, context: int, length: int, greedy: bool):
    def step(params, state, temperature, carry, _):
        buffer, pos, key = carry
        logits, _ = net.apply_with_state(params, state, buffer[None])
        last = lax.dynamic_index_in_dim(logits[0], pos - 1, keepdims=False).astype(jnp.float32)
        key, sub = jax.random.split(key)
        token = (jnp.argmax(last) if greedy else
                 jax.random.categorical(sub, last / temperature)).astype(jnp.int32)
        full = pos == context  # the context is full: drop its oldest token
        buffer = jnp.where(full, jnp.roll(buffer, -1), buffer)
        buffer = buffer.at[jnp.where(full, context - 1, pos)].set(token)
        return (buffer, jnp.minimum(pos + 1, context), key), token

    @jax.jit
    def sample(params, state, buffer, pos, key, temperature):
        _, tokens = lax.scan(functools.partial(step, params, state, temperature),
                             (buffer, pos, key), length=length)
        return tokens

    return sample
