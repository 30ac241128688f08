"""jaxnet.text: character vocabulary, corpus windows from a directory, and sampling."""

import jax
import numpy as np
import pytest

import jaxnet as jn
from jaxnet.data import DataError
from jaxnet.text import Vocabulary, default_corpus_dir, generate, load_corpus, text_files, windows


@pytest.fixture
def corpus_dir(tmp_path):
    for i in range(12):
        (tmp_path / f"file_{i:02d}.txt").write_text(f"hello world {i}\n" * 40)
    (tmp_path / ".hidden").write_text("never read")
    (tmp_path / "binary.bin").write_bytes(b"\x00\x01\x02\xff")
    return tmp_path


def test_a_vocabulary_encodes_and_decodes_text_both_ways():
    vocab = Vocabulary.of(["abc", "cab d"])
    assert vocab.chars == (" ", "a", "b", "c", "d")
    ids = vocab.encode("bad c")
    assert ids.dtype == np.int32 and ids.tolist() == [2, 1, 4, 0, 3]
    assert vocab.decode(ids) == "bad c"


def test_unknown_characters_are_named_in_the_error():
    vocab = Vocabulary("ab")
    assert vocab.unknown("abxyx") == ["x", "y"]
    with pytest.raises(ValueError, match="not in the vocabulary: 'x', 'y'"):
        vocab.encode("abxyx")


def test_a_vocabulary_rejects_repeated_or_long_entries():
    with pytest.raises(ValueError, match="distinct"):
        Vocabulary("aa")
    with pytest.raises(ValueError, match="single characters"):
        Vocabulary(["ab"])


def test_windows_overlap_by_one_so_every_character_is_a_target_once():
    w = windows(np.arange(10, dtype=np.int32), 3)
    assert w.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert windows(np.arange(3, dtype=np.int32), 3).shape == (0, 4)


def test_the_corpus_splits_by_file_and_is_deterministic(corpus_dir):
    a = load_corpus(corpus_dir, seq_len=8, max_chars=100_000)
    b = load_corpus(corpus_dir, seq_len=8, max_chars=100_000)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.test, b.test)
    assert a.train_files == b.train_files and a.test_files
    assert not set(a.train_files) & set(a.test_files)
    assert len(a.train_files) + len(a.test_files) == 12  # no hidden or binary file
    assert a.train.shape[1] == 9 and a.train.dtype == np.int32
    assert a.vocab.decode(a.train[0]) in "".join((corpus_dir / f).read_text()
                                                   for f in a.train_files)


def test_the_corpus_reads_at_most_max_chars(corpus_dir):
    corpus = load_corpus(corpus_dir, seq_len=4, max_chars=200)
    assert corpus.train.size + corpus.test.size <= 200 + len(corpus.train) + len(corpus.test)
    assert len(corpus.test) >= 1 and len(corpus.train) >= 1


def test_corpus_errors_name_the_directory(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "one.txt").write_text("only one file")
    with pytest.raises(DataError, match=rf"{tmp_path}: needs at least two text files"):
        load_corpus(tmp_path)
    (tmp_path / "two.txt").write_text("x")
    with pytest.raises(DataError, match="too little"):
        load_corpus(tmp_path, seq_len=50)


def test_the_default_corpus_is_the_standard_librarys_python_files():
    files = text_files(default_corpus_dir(), (".py",))
    assert any(f.name == "os.py" for f in files)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)


@pytest.fixture(scope="module")
def lm():
    net = jn.serial(jn.Embedding(7, 8), jn.LSTM(8), jn.Dense(7))
    params = net.init(jax.random.key(1), jax.ShapeDtypeStruct((1, 5), np.int32))
    return net, params


def _greedy_reference(net, params, prompt, length, context):
    """Re-runs the model on the growing (left-truncated) context, without padding."""
    tokens = list(prompt)
    for _ in range(length):
        logits = net.apply(params, np.asarray(tokens[-context:], np.int32)[None])
        tokens.append(int(np.argmax(logits[0, -1])))
    return tokens[len(prompt):]


@pytest.mark.parametrize("prompt", [[3], [1, 2, 3, 4, 5, 6, 0]])
def test_temperature_zero_is_greedy_also_past_the_context(lm, prompt):
    net, params = lm
    got = generate(net, params, np.asarray(prompt), 9, context=5, temperature=0)
    assert got.dtype == np.int32 and got.shape == (9,)
    assert got.tolist() == _greedy_reference(net, params, prompt, 9, 5)


def test_sampling_is_deterministic_for_a_key_and_varies_with_it(lm):
    net, params = lm
    sample = lambda seed: generate(net, params, np.asarray([1, 2]), 30, context=5,
                                   temperature=1.5, key=jax.random.key(seed)).tolist()
    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert all(0 <= t < 7 for t in sample(2))


def test_a_transformer_language_model_samples_greedily_too():
    net = jn.models.transformer(11, num_blocks=1, features=8, num_heads=2, max_length=6)
    params = net.init(jax.random.key(0), jax.ShapeDtypeStruct((1, 6), np.int32))
    got = generate(net, params, np.asarray([4, 5, 6]), 8, context=6, temperature=0)
    assert got.tolist() == _greedy_reference(net, params, [4, 5, 6], 8, 6)


def test_generate_rejects_an_empty_prompt_and_negative_settings(lm):
    net, params = lm
    with pytest.raises(ValueError, match="at least one token"):
        generate(net, params, np.zeros(0, np.int32), 3, context=5)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(net, params, np.asarray([1]), 3, context=5, temperature=-1.0)
    with pytest.raises(ValueError, match="length must be"):
        generate(net, params, np.asarray([1]), -1, context=5)
    assert generate(net, params, np.asarray([1]), 0, context=5).shape == (0,)
