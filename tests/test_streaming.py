import os
import subprocess
import sys
import textwrap
import threading

import jax
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet import augment, train
from jaxnet.train import streaming
from support import CHILD_ENV, blobs


def small_mlp(classes=3):
    return jn.serial(jn.Dense(16), jn.relu, jn.Dense(classes))


def memmapped(tmp_path, x, y):
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return (np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r"))


def stream_threads():
    return [t for t in threading.enumerate() if t.name == streaming.THREAD_NAME]


def assert_same_tree(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_a_memmap_with_global_shuffle_trains_exactly_like_the_resident_fit(key, rng, tmp_path):
    """200 rows in batches of 32: 7 batches, chunks of 3 (the last chunk has 2 idle batches
    and its real batch 8 padded rows): the same batches in the same order as ``fit`` on arrays."""
    x, y = blobs(rng, n=200)
    xm, ym = memmapped(tmp_path, x, y)
    net = small_mlp()
    params = net.init(key, x[:1])
    run_key = jax.random.key(3)
    resident, resident_history = train.fit(net, params, optax.adam(1e-2), (x, y), epochs=3,
                                           batch_size=32, eval_data=(x, y), key=run_key,
                                           progress=False)
    streamed, history = streaming.fit_streaming(net, params, optax.adam(1e-2), (xm, ym), epochs=3,
                                                batch_size=32, eval_data=(xm, ym), key=run_key,
                                                progress=False, shuffle="global", chunk_steps=3)
    assert_same_tree(streamed.params, resident.params)
    assert int(streamed.step) == int(resident.step) == 21
    for a, b in zip(history, resident_history, strict=True):
        assert set(a) == set(b)
        for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert a[name] == b[name]
    assert not stream_threads()


def test_fit_streams_a_memmap_by_itself_and_the_loss_falls(key, rng, tmp_path):
    x, y = blobs(rng, n=300)
    data = memmapped(tmp_path, x, y)
    assert streaming.is_memmap(data[0]) and streaming.is_streaming(data)
    net = small_mlp()
    params = net.init(key, x[:1])
    state, history = train.fit(net, params, optax.adam(1e-2), data, epochs=4, batch_size=32,
                               eval_data=data, progress=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 2
    assert history[-1]["test_accuracy"] > 0.9
    assert set(history[0]) >= {"epoch", "train_loss", "train_accuracy", "test_loss",
                               "test_accuracy", "seconds", "examples_per_second",
                               "compile_seconds"}
    assert "compile_seconds" not in history[1]
    assert int(state.step) == 4 * 10


def test_window_shuffle_is_deterministic_in_the_key_and_changes_with_it(key, rng, tmp_path):
    x, y = blobs(rng, n=200)
    data = memmapped(tmp_path, x, y)
    net = small_mlp()
    params = net.init(key, x[:1])

    def run(seed):
        state, history = streaming.fit_streaming(net, params, optax.sgd(0.1), data, epochs=2,
                                                 batch_size=16, key=jax.random.key(seed),
                                                 progress=False, chunk_steps=4)
        return state.params, [r["train_loss"] for r in history]

    first, again, other = run(0), run(0), run(1)
    assert_same_tree(first, again)
    assert first[1] != other[1]


def test_window_shuffle_permutes_the_chunks_and_the_rows_within_each_window(rng):
    x = np.arange(40, dtype=np.float32)[:, None]
    source = streaming.MemmapSource(x, np.arange(40), batch_size=4, chunk_steps=2,
                                    shuffle="window")
    orders = []
    for epoch in (0, 1):
        chunks = list(source.chunks(jax.random.key(0), epoch))
        rows = [c[0][..., 0].reshape(-1) for c in chunks]
        assert all(w.all() for _, _, w in chunks)
        # each chunk is one window of 8 consecutive rows, in some order
        assert sorted(tuple(sorted(r)) for r in rows) == [tuple(range(s, s + 8)) for s in range(0, 40, 8)]
        orders.append(np.concatenate(rows))
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[0], np.arange(40))


def test_a_memmap_in_file_order_trains_like_the_same_list_of_batches(key, rng, tmp_path):
    """``shuffle="none"`` reads the file in order: the same steps as an iterable of its batches
    (the last one short, padded and masked)."""
    x, y = blobs(rng, n=100)
    data = memmapped(tmp_path, x, y)
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 100, 32)]
    net = small_mlp()
    params = net.init(key, x[:1])
    a, ha = streaming.fit_streaming(net, params, optax.adam(1e-2), data, epochs=2, batch_size=32,
                                    shuffle="none", progress=False, chunk_steps=3)
    b, hb = train.fit(net, params, optax.adam(1e-2), batches, epochs=2, progress=False)
    assert_same_tree(a.params, b.params)
    assert [r["train_loss"] for r in ha] == [r["train_loss"] for r in hb]
    assert int(a.step) == int(b.step) == 8


def test_an_iterable_of_batches_trains(key, rng):
    x, y = blobs(rng, n=256)
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    net = small_mlp()
    params = net.init(key, x[:1])
    state, history = train.fit(net, params, optax.adam(1e-2), batches, epochs=4,
                               eval_data=batches, progress=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 2
    assert history[-1]["test_accuracy"] > 0.9
    assert int(state.step) == 4 * 8
    assert history[0]["examples_per_second"] > 0


def test_a_generator_trains_one_epoch_and_a_second_epoch_is_an_error(key, rng):
    x, y = blobs(rng, n=64)
    net = small_mlp()
    params = net.init(key, x[:1])
    state, history = train.fit(net, params, optax.sgd(0.1),
                               ((x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)), epochs=1,
                               progress=False)
    assert int(state.step) == 4 and len(history) == 1
    with pytest.raises(ValueError, match="no batches in epoch 2.*one-shot iterator"):
        train.fit(net, params, optax.sgd(0.1),
                  ((x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)), epochs=2,
                  progress=False)
    assert not stream_threads()


def test_an_error_in_the_iterable_is_raised_by_fit_and_the_thread_stops(key, rng):
    x, y = blobs(rng, n=64)
    net = small_mlp()
    params = net.init(key, x[:1])
    error = RuntimeError("disk on fire")

    def batches():
        for i in range(5):
            if i == 3:
                raise error
            yield x[:16], y[:16]

    with pytest.raises(RuntimeError, match="disk on fire") as raised:
        streaming.fit_streaming(net, params, optax.sgd(0.1), batches(), epochs=1, chunk_steps=1,
                                progress=False)
    assert raised.value is error
    assert not stream_threads()


def test_bad_labels_are_reported_from_the_reading_thread(key, rng, tmp_path):
    x, y = blobs(rng, n=64)
    y[50] = 7
    net = small_mlp()
    params = net.init(key, x[:1])
    with pytest.raises(ValueError, match=r"train_data labels must be in \[0, 3\)"):
        train.fit(net, params, optax.sgd(0.1), memmapped(tmp_path, x, y), epochs=1,
                  progress=False)
    assert not stream_threads()


def test_idle_batches_of_a_short_chunk_change_nothing(key, rng):
    """5 batches (the last one of 4 real rows) in chunks of 2 or 3 steps (idle padding
    batches) train exactly like chunks of 5 (none) and count 5 steps per epoch."""
    x, y = blobs(rng, n=36)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 36, 8)]
    net = small_mlp()
    params = net.init(key, x[:1])
    runs = [streaming.fit_streaming(net, params, optax.adam(1e-2), batches, epochs=2,
                                    chunk_steps=k, progress=False) for k in (5, 3, 2)]
    for state, history in runs[1:]:
        assert_same_tree(state[:4], runs[0][0][:4])  # all but the key
        assert history[-1]["train_loss"] == runs[0][1][-1]["train_loss"]
        assert int(state.step) == 10


def test_padded_rows_carry_weight_zero(rng):
    x = np.arange(10, dtype=np.float32)[:, None]
    source = streaming.MemmapSource(x, np.arange(10), batch_size=4, chunk_steps=2, shuffle="none")
    chunks = list(source.chunks(jax.random.key(0), 0))
    assert [c[0].shape for c in chunks] == [(2, 4, 1), (2, 4, 1)]
    np.testing.assert_array_equal(chunks[1][2], [[1, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(chunks[1][0][0, :2, 0], [8, 9])


def test_evaluate_streams_memmaps_iterables_and_generators_like_arrays(key, rng, tmp_path):
    x, y = blobs(rng, n=150)
    net = small_mlp()
    params = net.init(key, x[:1])
    expected = train.evaluate(net, params, (x, y), batch_size=32)
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 150, 32)]
    for data in (memmapped(tmp_path, x, y), batches, iter(batches)):
        got = train.evaluate(net, params, data, batch_size=32)
        assert got.keys() == expected.keys()
        for name in got:
            assert got[name] == pytest.approx(expected[name], rel=1e-6)


def test_what_streams():
    x, y = np.zeros((4, 2), np.float32), np.zeros(4, np.int32)
    assert not streaming.is_streaming((x, y))
    assert not streaming.is_streaming([x, y])
    assert streaming.is_streaming([(x, y), (x, y)])
    assert streaming.is_streaming(iter([(x, y)]))
    # pytrees: an (x, y) pair whose x is a tuple or dict of arrays stays one resident pair
    assert not streaming.is_streaming(((x, x), y)) and not streaming.is_streaming(({"a": x}, y))
    assert streaming.is_streaming([({"a": x}, y), ({"a": x}, y)])
    assert not streaming.is_streaming({"x": x, "y": y})
    view = np.frombuffer(memoryview(b"\0" * 8), np.uint8)
    assert not streaming.is_memmap(view)


def test_load_memmap_maps_npy_and_uncompressed_npz_members(tmp_path, rng):
    x = rng.normal(size=(20, 3)).astype(np.float32)
    y = rng.integers(0, 3, 20).astype(np.int64)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "d.npz", x=x, y=y, f=np.asfortranarray(x))
    one = streaming.load_memmap(tmp_path / "x.npy")
    both = streaming.load_memmap(tmp_path / "d.npz")
    assert isinstance(one, np.memmap) and set(both) == {"x", "y", "f"}
    assert all(isinstance(a, np.memmap) for a in both.values())
    np.testing.assert_array_equal(one, x)
    np.testing.assert_array_equal(both["x"], x)
    np.testing.assert_array_equal(both["y"], y)
    np.testing.assert_array_equal(both["f"], x)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    with pytest.raises(ValueError, match="x.npy is compressed"):
        streaming.load_memmap(tmp_path / "c.npz")


def test_unsupported_options_and_bad_arguments_are_errors(key, rng, tmp_path):
    x, y = blobs(rng, n=32)
    data = memmapped(tmp_path, x, y)
    net = small_mlp()
    params = net.init(key, x[:1])
    with pytest.raises(ValueError, match="validation_split cannot be combined with streaming"):
        train.fit(net, params, optax.sgd(0.1), data, epochs=1, validation_split=0.5)
    with pytest.raises(ValueError, match="shuffle must be one of window, global, none"):
        streaming.fit_streaming(net, params, optax.sgd(0.1), data, epochs=1, shuffle="yes")
    with pytest.raises(TypeError, match="batch 0 is not an \\(x, y\\) pair"):
        train.fit(net, params, optax.sgd(0.1), iter([x, x]), epochs=1)
    with pytest.raises(ValueError, match="batch 1 has 8 rows, more than the first batch's 4"):
        train.fit(net, params, optax.sgd(0.1), [(x[:4], y[:4]), (x[:8], y[:8])], epochs=1,
                  progress=False)
    with pytest.raises(ValueError, match="yielded no batches"):
        train.fit(net, params, optax.sgd(0.1), iter([]), epochs=1)
    assert not stream_threads()


def test_a_grain_data_loader_trains(key, rng):
    grain = pytest.importorskip("grain")
    x, y = blobs(rng, n=128)
    records = [(x[i], y[i]) for i in range(128)]
    loader = grain.DataLoader(data_source=records,
                              sampler=grain.samplers.IndexSampler(128, shuffle=True, seed=0,
                                                                  num_epochs=1),
                              operations=[grain.transforms.Batch(32)], worker_count=0)
    net = small_mlp()
    params = net.init(key, x[:1])
    state, history = train.fit(net, params, optax.adam(1e-2), loader, epochs=3, eval_data=(x, y),
                               progress=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert int(state.step) == 3 * 4


# --- augmentation --------------------------------------------------------------------------

def test_random_flip_mirrors_some_images_and_keeps_the_rest(key, rng):
    x = rng.normal(size=(64, 4, 5, 2)).astype(np.float32)
    out = np.asarray(jax.jit(augment.random_flip)(key, x))
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)]
    kept = [np.array_equal(o, i) for o, i in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_random_crop_is_a_zero_padded_shift_by_at_most_padding(key, rng):
    x = rng.normal(size=(16, 6, 7, 3)).astype(np.float32)
    out = np.asarray(jax.jit(augment.random_crop, static_argnums=2)(key, x, 2))
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    shifts = set()
    for o, p in zip(out, padded):
        matches = [(i, j) for i in range(5) for j in range(5)
                   if np.array_equal(o, p[i:i + 6, j:j + 7])]
        assert matches
        shifts.add(matches[0])
    assert len(shifts) > 3
    np.testing.assert_array_equal(augment.random_crop(key, x, 0), x)


def test_augmentations_reject_non_images_and_bad_padding(key):
    with pytest.raises(jn.ShapeError, match=r"random_flip: expected images .* got shape \(4, 3\)"):
        augment.random_flip(key, np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="random_crop: padding must be an int >= 0, got -1"):
        augment.random_crop(key, np.zeros((1, 2, 2, 1), np.float32), -1)


def test_fit_streaming_augments_on_the_device(key, rng):
    x = rng.normal(size=(64, 4, 4, 1)).astype(np.float32)
    y = (x[:, :, :2].sum(axis=(1, 2, 3)) > x[:, :, 2:].sum(axis=(1, 2, 3))).astype(np.int32)
    net = jn.serial(jn.Flatten(), jn.Dense(2))
    params = net.init(key, x[:1])
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    plain, _ = streaming.fit_streaming(net, params, optax.sgd(0.1), batches, epochs=1,
                                       progress=False)
    flipped, _ = streaming.fit_streaming(net, params, optax.sgd(0.1), batches, epochs=1,
                                         progress=False,
                                         augment=augment.compose(augment.random_flip,
                                                                 augment.random_flip))
    assert not np.allclose(plain.params["dense_1"]["w"], flipped.params["dense_1"]["w"])


# --- bounded memory ------------------------------------------------------------------------

PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys
    import jax, numpy as np, optax
    import jaxnet as jn
    from jaxnet import train
    x = np.load(sys.argv[1], mmap_mode="r")
    y = np.load(sys.argv[2], mmap_mode="r")
    net = jn.serial(jn.Dense(4), jn.relu, jn.Dense(2))
    params = net.init(jax.random.key(0), np.asarray(x[:1]))
    small = (np.asarray(x[:512]), np.asarray(y[:512]))  # warm up JAX and XLA (not the data)
    train.fit(net, params, optax.sgd(0.01), small, epochs=1, batch_size=256, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state, history = train.fit(net, params, optax.sgd(0.01), (x, y), epochs=1, batch_size=1024,
                               progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(before // 1024, after // 1024, int(state.step))
""")


@pytest.mark.slow
def test_training_on_a_memmap_larger_than_the_budget_keeps_the_peak_memory_bounded(tmp_path):
    """A 400 MB float32 file: the process's peak resident memory grows by far less while
    training on it (pages read are dropped; a few chunks of ~16 MiB are alive at once).
    Measured: +130 MiB with the default chunks; +546 MiB without dropping the pages."""
    rows, features = 100_000, 1_000
    x = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.float32, (rows, features))
    for start in range(0, rows, 10_000):  # written in blocks: this process stays small too
        x[start:start + 10_000] = np.random.default_rng(start).normal(size=(10_000, features))
    x.flush()
    del x
    np.save(tmp_path / "y.npy", np.arange(rows, dtype=np.int32) % 2)
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "x.npy"),
                             str(tmp_path / "y.npy")], env=CHILD_ENV | {"PYTHONPATH": os.getcwd()},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    before, after, steps = map(int, result.stdout.split())
    assert steps == 98
    assert after - before < 200, (before, after)  # MiB, against a 381 MiB file


def test_the_streaming_benchmark_runs_tiny(tmp_path):
    from benchmarks.streaming import compare
    results = compare(rows=256, epochs=1, batch_size=32, sizes=(8, 16, 16, 3), chunk_steps=3,
                      directory=str(tmp_path))
    assert set(results) == {"resident", "streaming", "ratio"}
    assert all(value > 0 for value in results.values())


def test_batchnorm_state_and_continuing_from_a_train_state_match_the_resident_fit(key, rng,
                                                                                  tmp_path):
    x, y = blobs(rng, n=100)
    data = memmapped(tmp_path, x, y)
    net = jn.serial(jn.Dense(16), jn.BatchNorm(), jn.relu, jn.Dense(3))
    params, model_state = net.init_with_state(key, x[:1])
    resident, _ = train.fit(net, params, optax.adam(1e-2), (x, y), epochs=2, batch_size=16,
                            model_state=model_state, progress=False)
    half, _ = streaming.fit_streaming(net, params, optax.adam(1e-2), data, epochs=1,
                                      batch_size=16, model_state=model_state, progress=False,
                                      shuffle="global", chunk_steps=4)
    whole, history = streaming.fit_streaming(net, half, optax.adam(1e-2), data, epochs=2,
                                             batch_size=16, progress=False, shuffle="global",
                                             chunk_steps=4)
    assert [r["epoch"] for r in history] == [2]
    assert_same_tree(whole[:4], resident[:4])
    with pytest.raises(ValueError, match=r"at step 7, inside epoch 2 \(4 steps per epoch\)"):
        streaming.fit_streaming(net, half, optax.adam(1e-2), data, epochs=2, batch_size=32,
                                progress=False)


def test_non_finite_batches_are_skipped_or_stop_training(key, rng):
    x, y = blobs(rng, n=64)
    bad = x[16:32].copy()
    bad[0, 0] = np.nan
    batches = [(x[:16], y[:16]), (bad, y[16:32]), (x[32:48], y[32:48])]
    net = small_mlp()
    params = net.init(key, x[:1])
    state, history = streaming.fit_streaming(net, params, optax.sgd(0.1), batches, epochs=2,
                                             on_nan="skip", chunk_steps=2, progress=False)
    assert [r["skipped_batches"] for r in history] == [1, 1]
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))
    assert int(state.step) == 6
    with pytest.raises(FloatingPointError, match="in epoch 1 .steps 1-3."):
        streaming.fit_streaming(net, params, optax.sgd(0.1), batches, epochs=2, chunk_steps=2,
                                progress=False)
    assert not stream_threads()
