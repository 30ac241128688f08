"""The benchmark harness on tiny networks: every entry's fields, the compile entry, peer variants
(each skipped when its package is missing), and the notes for skipped peers. No timings are
asserted."""

import json
import math
import sys

import jax
import pytest

from benchmarks import harness as bench, peers as bench_peers

SIZES = (8, 4, 4, 3)  # one hidden width, as Equinox's MLP needs
FIELDS = {"workload", "variant", "unit", "median", "min", "max", "ratio", "gflops",
          "fraction_of_matmul", "compile_seconds", "lower_is_better"}


@pytest.fixture(autouse=True)
def jax_defaults():
    """The reference and the peers are user code written for JAX's default promotion rules
    (``x @ w + b`` broadcasts the bias; optax mixes Python floats and int32 counts)."""
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        yield


def test_train_entries_have_every_field_and_ratios_to_the_donated_reference():
    variants = bench.train_variants(SIZES, 4, 2)
    names = [v.name for v in variants]
    assert names == ["raw-jax step (donated)", "raw-jax step (no donation)",
                     "raw-jax lax.scan over 2 steps", "jaxnet train step", "jaxnet fit (device loop)"]
    rates = bench.measure(variants, 2, rounds=2)
    peak = 1e9
    entries = bench.summarise("tiny", variants, rates, "steps/s", 100.0, peak)
    assert [e["variant"] for e in entries] == names
    for entry in entries:
        assert set(entry) == FIELDS
        assert entry["min"] <= entry["median"] <= entry["max"]
        assert entry["gflops"] == pytest.approx(entry["median"] * 100.0 / 1e9)
        assert entry["fraction_of_matmul"] == pytest.approx(entry["median"] * 100.0 / peak)
        assert entry["compile_seconds"] > 0 and not entry["lower_is_better"]
    reference = entries[0]["median"]
    assert entries[0]["ratio"] == 1.0
    assert all(math.isclose(e["ratio"], e["median"] / reference) for e in entries)


def test_compile_entry_takes_the_median_of_fresh_compilations():
    def variants(*seconds):
        return [bench.Variant(name, lambda k: None, t) for name, t in zip(("raw", "other"), seconds)]

    first, again = variants(0.5, 2.0), iter([variants(0.25, 4.0), variants(1.0, 3.0)])
    entries = bench.compile_entries("tiny", first, lambda: next(again), repeats=3)
    assert next(again, None) is None  # rebuilt twice
    for entry in entries:
        assert set(entry) == FIELDS
        assert entry["workload"] == "Compile tiny" and entry["lower_is_better"]
        assert entry["gflops"] is None and entry["fraction_of_matmul"] is None
        assert entry["compile_seconds"] == entry["median"]
    assert [(e["variant"], e["min"], e["median"], e["max"], e["ratio"]) for e in entries] == [
        ("raw", 0.25, 0.5, 1.0, 1.0), ("other", 2.0, 3.0, 4.0, 6.0)]


@pytest.mark.parametrize("peer", bench_peers.PEERS, ids=[p[0] for p in bench_peers.PEERS])
def test_peer_variants_run_when_installed(peer, key):
    name, module, train, forward = peer
    pytest.importorskip(module)
    x = jax.random.normal(key, (4, SIZES[0]))
    y = jax.random.randint(key, (4,), 0, SIZES[-1])
    for variant in (train(SIZES, x, y), forward(SIZES, x)):
        assert variant.compile_seconds > 0
        variant.run(2)


def test_a_missing_peer_is_skipped_with_a_note(monkeypatch, key):
    monkeypatch.setitem(sys.modules, "haiku", None)  # makes `import haiku` fail
    skipped = []
    x = jax.random.normal(key, (4, SIZES[0]))
    variants = bench_peers.peer_inference_variants("tiny", SIZES, x, skipped)
    assert not any(v.name.startswith("haiku") for v in variants)
    assert [(s["workload"], s["variant"]) for s in skipped if s["variant"] == "haiku"] == [
        ("tiny", "haiku")]
    note = next(s for s in skipped if s["variant"] == "haiku")
    assert "haiku not installed" in note["reason"] and "[peers]" in note["reason"]
    table = bench.format_table({"matmul_gflops": 1.0, "entries": [], "skipped": skipped})
    assert "- skipped haiku on tiny: haiku not installed" in table


def test_format_table_leaves_flops_blank_for_compile_entries():
    entry = {"workload": "Compile tiny", "variant": "raw", "unit": "s to first step",
             "median": 0.5, "min": 0.25, "max": 0.75, "ratio": 1.0, "gflops": None,
             "fraction_of_matmul": None, "compile_seconds": 0.5, "lower_is_better": True}
    table = bench.format_table({"matmul_gflops": 1.0, "entries": [entry]})
    assert "| Compile tiny | raw | 0.50 | 0.25 | 0.75 | s to first step | 1.00 |  |  | 0.50 |" in table


def test_equinox_peer_needs_one_hidden_width():
    pytest.importorskip("equinox")
    with pytest.raises(ValueError, match=r"one hidden width h; got \(8, 4, 5, 3\)"):
        bench_peers.equinox_train((8, 4, 5, 3), None, None)


def test_w4_variants_train_every_member_and_measure():
    from benchmarks.harness import measure
    from benchmarks.population import flops_per_unit, population_variants

    variants = population_variants(members=2, steps=4)
    assert [v.name for v in variants] == [
        "raw-jax step loop, 2 one after another", "raw-jax vmap of the step, step loop",
        "jaxnet train step loop, 2 one after another",
        "jaxnet fit (device loop), 2 one after another",
        "jaxnet population, shared data order", "jaxnet population, own data order"]
    rates = measure(variants, 4, 1)
    assert all(len(r) == 1 and r[0] > 0 for r in rates.values())
    assert flops_per_unit(2) == 6 * 32 * 2 * (64 * 32 + 32 * 10)


def test_cli_bench_prints_skip_notes_verbatim_and_writes_json(monkeypatch, tmp_path, capsys):
    from jaxnet.app.cli import main

    entry = {"workload": "W2 tiny", "variant": "raw", "unit": "steps/s", "median": 2.0, "min": 1.0,
             "max": 3.0, "ratio": 1.0, "gflops": 0.5, "fraction_of_matmul": 0.25,
             "compile_seconds": 0.1, "lower_is_better": False}
    note = {"workload": "W2 tiny", "variant": "haiku",  # long enough to be wrapped at 80 columns
            "reason": f"haiku not installed or not importable (No module named 'haiku'); "
                      f"{bench_peers.INSTALL_HINT}"}
    results = {"matmul_gflops": 2.0, "entries": [entry], "skipped": [note], "settings": {}}
    monkeypatch.setattr(bench, "run_benchmarks", lambda quick, log: results)
    assert main(["bench", "--quick", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert ("- skipped haiku on W2 tiny: haiku not installed or not importable (No module named "
            "'haiku'); pip install -e '.[peers]'\n") in out
    assert "| W2 tiny | raw | 2 | 1 | 3 | steps/s | 1.00 | 0.5 | 25% | 0.10 |" in out
    assert json.loads((tmp_path / "b.json").read_text()) == results
