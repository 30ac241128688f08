"""The benchmarks on tiny networks: every entry's fields, the compile entry, peer variants
(each skipped when its package is missing), the notes for skipped peers, and the layout of
``benchmarks/`` (no import cycle; nothing in ``jaxnet/`` imports it). No timings are asserted."""

import ast
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet.losses

from benchmarks import harness, peers, population, run, sequences, workloads

ROOT = pathlib.Path(__file__).resolve().parent.parent

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
    variants = workloads.train_variants(SIZES, 4, 2)
    names = [v.name for v in variants]
    assert names == ["raw-jax step (donated)", "raw-jax step (no donation)",
                     "raw-jax lax.scan over 2 steps", "raw-jax lax.scan over 2 steps of a shuffled epoch",
                     "jaxnet train step", "jaxnet fit (device loop)"]
    rates = harness.measure(variants, 2, rounds=2)
    peak = 1e9
    entries = harness.summarise("tiny", variants, rates, "steps/s", 100.0, peak)
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


def test_shuffled_epoch_reference_trains_on_the_permuted_batches_in_order():
    optimizer, length, batch = optax.adam(1e-3), 3, 4
    key = jax.random.key(5)
    xs = jax.random.normal(jax.random.key(1), (length * batch, SIZES[0]))
    ys = jax.random.randint(jax.random.key(2), (length * batch,), 0, SIZES[-1])
    params = workloads.raw_init(jax.random.key(0), SIZES)
    got = jax.jit(workloads.raw_shuffled_epoch(optimizer, workloads.raw_apply, length, batch))(
        params, optimizer.init(params), key, xs, ys)
    order = np.asarray(jax.random.permutation(key, length * batch)).reshape(length, batch)
    assert sorted(order.ravel()) == list(range(length * batch))
    expected = (params, optimizer.init(params))
    for rows in order:
        expected = workloads.raw_update(optimizer, workloads.raw_apply, *expected, xs[rows],
                                        ys[rows])[:2]
    np.testing.assert_allclose(np.concatenate([np.ravel(a) for a in jax.tree.leaves(got)]),
                               np.concatenate([np.ravel(a) for a in jax.tree.leaves(expected)]),
                               rtol=1e-5, atol=1e-6)


def test_compile_entry_takes_the_median_of_fresh_compilations():
    def variants(*seconds):
        return [harness.Variant(name, lambda k: None, t) for name, t in zip(("raw", "other"), seconds)]

    first, again = variants(0.5, 2.0), iter([variants(0.25, 4.0), variants(1.0, 3.0)])
    entries = harness.compile_entries("tiny", first, lambda: next(again), repeats=3)
    assert next(again, None) is None  # rebuilt twice
    for entry in entries:
        assert set(entry) == FIELDS
        assert entry["workload"] == "Compile tiny" and entry["lower_is_better"]
        assert entry["gflops"] is None and entry["fraction_of_matmul"] is None
        assert entry["compile_seconds"] == entry["median"]
    assert [(e["variant"], e["min"], e["median"], e["max"], e["ratio"]) for e in entries] == [
        ("raw", 0.25, 0.5, 1.0, 1.0), ("other", 2.0, 3.0, 4.0, 6.0)]


@pytest.mark.parametrize("peer", peers.PEERS, ids=[p[0] for p in peers.PEERS])
def test_peer_variants_run_when_installed(peer, key):
    name, module, train, forward = peer
    pytest.importorskip(module)
    x = jax.random.normal(key, (4, SIZES[0]))
    y = jax.random.randint(key, (4,), 0, SIZES[-1])
    for variant in (train(SIZES, x, y), forward(SIZES, x)):
        assert variant.compile_seconds > 0
        variant.run(2)


def test_torch_cnn_variant_runs_when_pytorch_is_installed():
    pytest.importorskip("torch")
    (variant,) = peers.torch_cnn_variants(2)
    assert variant.name.startswith("pytorch") and variant.compile_seconds > 0
    variant.run(1)


def test_bf16_variants_train_in_bf16_next_to_the_float32_ones():
    variants = workloads.mlp_bf16_variants(SIZES, 4, 2)
    assert [v.name for v in variants] == ["raw-jax step (donated) bf16", "jaxnet train step bf16",
                                          "jaxnet fit (device loop) bf16"]
    cnn = workloads.cnn_variants(2, 1, bf16=True)
    assert [v.name for v in cnn[-3:]] == [v.name for v in variants]
    for variant in variants + cnn:
        variant.run(2)
    products = workloads.matmul_variants(8, 4, 2)
    assert [v.name for v in products] == ["jnp.dot float32", "jnp.dot bf16 -> float32"]
    rates = harness.measure(products, 2, rounds=1)
    assert all(r[0] > 0 for r in rates.values())


def test_the_raw_bf16_product_rounds_operands_and_gradients(key):
    """Forward and backward on bfloat16-rounded values, accumulated and returned in float32."""
    a, b, g = (jax.random.normal(k, shape) for k, shape in
               zip(jax.random.split(key, 3), ((5, 7), (7, 3), (5, 3))))
    r = lambda v: np.asarray(v.astype(jax.numpy.bfloat16), np.float64)
    y, pullback = jax.vjp(lambda a, b: workloads.bf16_product(jax.numpy.matmul, a, b), a, b)
    da, db = pullback(g)
    assert y.dtype == da.dtype == db.dtype == np.float32
    np.testing.assert_allclose(y, r(a) @ r(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(da, r(g) @ r(b).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, r(a).T @ r(g), rtol=1e-5, atol=1e-5)


def test_pytorch_autocast_variants_run_when_pytorch_is_installed(key):
    pytest.importorskip("torch")
    x = jax.random.normal(key, (4, SIZES[0]))
    y = jax.random.randint(key, (4,), 0, SIZES[-1])
    skipped = []
    mlp = peers.torch_mlp_variants("tiny", SIZES, x, y, skipped)
    cnn = peers.torch_cnn_variants(2, bf16=True)
    assert [v.name.split(" ", 2)[2] for v in mlp + cnn] == [
        "eager, fused adam", "autocast bf16, fused adam"] * 2 and not skipped
    for variant in mlp + cnn:
        variant.run(1)
    assert len(peers.torch_mlp_variants("tiny", SIZES, x, y, skipped, eager=False)) == 1


def test_without_pytorch_the_autocast_variants_leave_a_note(monkeypatch, key):
    monkeypatch.setitem(sys.modules, "torch", None)
    skipped = []
    x = jax.random.normal(key, (4, SIZES[0]))
    assert peers.torch_mlp_variants("tiny", SIZES, x, None, skipped) == []
    assert [(s["workload"], s["variant"]) for s in skipped] == [("tiny", "pytorch autocast")]
    assert "torch not installed" in skipped[0]["reason"]
    assert peers.torch_cnn_variants(2, bf16=True) == []


def test_a_missing_peer_is_skipped_with_a_note(monkeypatch, key):
    monkeypatch.setitem(sys.modules, "haiku", None)  # makes `import haiku` fail
    skipped = []
    x = jax.random.normal(key, (4, SIZES[0]))
    variants = peers.peer_inference_variants("tiny", SIZES, x, skipped)
    assert not any(v.name.startswith("haiku") for v in variants)
    assert [(s["workload"], s["variant"]) for s in skipped if s["variant"] == "haiku"] == [
        ("tiny", "haiku")]
    note = next(s for s in skipped if s["variant"] == "haiku")
    assert "haiku not installed" in note["reason"] and "[peers]" in note["reason"]
    table = harness.format_table({"matmul_gflops": 1.0, "entries": [], "skipped": skipped})
    assert "- skipped haiku on tiny: haiku not installed" in table


def test_format_table_leaves_flops_blank_for_compile_entries():
    entry = {"workload": "Compile tiny", "variant": "raw", "unit": "s to first step",
             "median": 0.5, "min": 0.25, "max": 0.75, "ratio": 1.0, "gflops": None,
             "fraction_of_matmul": None, "compile_seconds": 0.5, "lower_is_better": True}
    table = harness.format_table({"matmul_gflops": 1.0, "entries": [entry]})
    assert "| Compile tiny | raw | 0.50 | 0.25 | 0.75 | s to first step | 1.00 |  |  | 0.50 |" in table


def test_equinox_peer_needs_one_hidden_width():
    pytest.importorskip("equinox")
    with pytest.raises(ValueError, match=r"one hidden width h; got \(8, 4, 5, 3\)"):
        peers.equinox_train((8, 4, 5, 3), None, None)


def test_w4_variants_train_every_member_and_measure():
    variants = population.population_variants(members=2, steps=4)
    assert [v.name for v in variants] == [
        "raw-jax step loop, 2 one after another", "raw-jax vmap of the step, step loop",
        "raw-jax vmap of the step in one lax.scan over 4 steps",
        "raw-jax vmap of the step in one lax.scan over 4 steps, per-member learning rates",
        "jaxnet train step loop, 2 one after another",
        "jaxnet fit (device loop), 2 one after another",
        "jaxnet population, shared data order", "jaxnet population, own data order"]
    rates = harness.measure(variants, 4, 1)
    assert all(len(r) == 1 and r[0] > 0 for r in rates.values())
    assert population.flops_per_unit(2) == 6 * 32 * 2 * (64 * 32 + 32 * 10)


def test_the_like_for_like_w4_reference_gives_each_member_its_learning_rate():
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=1.0)
    params = [{"w": jnp.ones((2, 3))}, {"w": jnp.zeros((2, 3))}]
    stacked, opt_state = population._with_learning_rates(optimizer, params, [0.1, 0.01])
    np.testing.assert_allclose(opt_state.hyperparams["learning_rate"], [0.1, 0.01])
    np.testing.assert_array_equal(stacked["w"], np.stack([np.ones((2, 3)), np.zeros((2, 3))]))


def test_run_prints_skip_notes_verbatim_and_writes_json_and_markdown(monkeypatch, tmp_path,
                                                                      capsys):
    entry = {"workload": "W2 tiny", "variant": "raw", "unit": "steps/s", "median": 2.0, "min": 1.0,
             "max": 3.0, "ratio": 1.0, "gflops": 0.5, "fraction_of_matmul": 0.25,
             "compile_seconds": 0.1, "lower_is_better": False}
    note = {"workload": "W2 tiny", "variant": "haiku",  # longer than 80 columns: never wrapped
            "reason": f"haiku not installed or not importable (No module named 'haiku'); "
                      f"{peers.INSTALL_HINT}"}
    results = {"matmul_gflops": 2.0, "entries": [entry], "skipped": [note],
               "settings": {"jax": jax.__version__}}
    applied = []
    monkeypatch.setattr(run.jaxnet, "keep_freed_host_memory", lambda: applied.append(True))
    monkeypatch.setattr(run, "run_benchmarks", lambda quick: results if quick else None)
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    run.main(["--quick", "--name", "b"])
    assert applied == [True]  # the benchmarks opt in to the host allocator setting
    out = capsys.readouterr().out
    assert ("- skipped haiku on W2 tiny: haiku not installed or not importable (No module named "
            "'haiku'); pip install -e '.[peers]'\n") in out
    row = "| W2 tiny | raw | 2 | 1 | 3 | steps/s | 1.00 | 0.5 | 25% | 0.10 |"
    assert row in out
    written = json.loads((tmp_path / "b.json").read_text())
    assert written == results and set(written["machine"]) == {"platform", "cpus", "date"}
    markdown = (tmp_path / "b.md").read_text()
    assert markdown.startswith("`python benchmarks/run.py --quick` on ") and row in markdown


def _benchmark_imports(path: pathlib.Path) -> set[str]:
    """The ``benchmarks`` modules that ``path`` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name.split(".")[1] for name in names
                  if name.startswith("benchmarks.") and name.count(".") == 1}
    return found


BENCHMARK_MODULES = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")
                           if p.stem != "__init__")


def test_benchmark_modules_import_each_other_without_a_cycle():
    graph = {name: _benchmark_imports(ROOT / "benchmarks" / f"{name}.py") & set(BENCHMARK_MODULES)
             for name in BENCHMARK_MODULES}
    assert graph["harness"] == set()
    assert graph["workloads"] == {"harness"}
    assert graph["peers"] == {"harness"}  # sequences reuses its PyTorch train step
    assert graph["population"] == {"harness", "workloads"}
    assert graph["run"] == {"harness", "workloads", "peers", "population", "sequences"}
    assert graph["sequences"] == {"harness", "workloads", "peers"}
    assert graph["accelerator"] == {"harness"}
    assert graph["xla_cpu"] == {"harness", "workloads"}
    done, visiting = set(), []

    def visit(name):  # depth first; a module met again on the current path closes a cycle
        assert name not in visiting, f"import cycle: {' -> '.join(visiting + [name])}"
        if name not in done:
            visiting.append(name)
            for other in sorted(graph[name]):
                visit(other)
            visiting.pop()
            done.add(name)

    for name in BENCHMARK_MODULES:
        visit(name)


@pytest.mark.parametrize("module", BENCHMARK_MODULES)
def test_each_benchmark_module_imports_alone_in_a_fresh_process(module):
    result = subprocess.run([sys.executable, "-c", f"import benchmarks.{module}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_the_package_never_imports_the_benchmarks():
    offenders = [f"{path.relative_to(ROOT)}: {name}"
                 for path in sorted((ROOT / "jaxnet").rglob("*.py"))
                 for node in ast.walk(ast.parse(path.read_text(), str(path)))
                 for name in ([a.name for a in node.names] if isinstance(node, ast.Import)
                              else [node.module or ""] if isinstance(node, ast.ImportFrom)
                              and node.level == 0 else [])
                 if name == "benchmarks" or name.startswith("benchmarks.")]
    assert offenders == []


# ---- W6 and W7: the sequence models, at tiny sizes ---------------------------------------------

TINY_LM = sequences.TransformerSizes(num_blocks=2, features=32, num_heads=4, length=16, batch=4,
                                     vocab=64)
TINY_LSTM = sequences.LSTMSizes(hidden=8, steps=5, features=3, batch=4, classes=10)


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def test_w6_and_w7_entries_have_every_field_and_name_every_variant(monkeypatch):
    monkeypatch.setattr(sequences, "W6", TINY_LM)
    monkeypatch.setattr(sequences, "W7", TINY_LSTM)
    skipped, logged = [], []
    entries = run._sequence_entries(True, 1, 1e9, skipped, False, logged.append)
    torch_names = [n for n in ("pytorch eager, fused adam", "pytorch autocast bf16, fused adam")
                   if _has_torch()]
    jax_names = ["raw-jax step (donated)", "jaxnet train step", "jaxnet fit (device loop)",
                 "jaxnet train step bf16", "jaxnet fit (device loop) bf16"]
    lm, lstm = "W6 transformer LM 2x32 h4 t16 b4", "W7 LSTM 8 t5x3 b4"
    got = [(e["workload"], e["variant"].replace(f" {_torch_version()} ", " ")) for e in entries]
    assert got == [(lm, n) for n in jax_names + torch_names] + [
        (lstm, n) for n in jax_names + torch_names]
    for entry in entries:
        assert set(entry) == FIELDS
        assert entry["unit"] == ("tokens/s" if entry["workload"] == lm else "steps/s")
        assert 0 < entry["min"] <= entry["median"] <= entry["max"]
        assert entry["compile_seconds"] > 0 and not entry["lower_is_better"]
    tokens = TINY_LM.batch * TINY_LM.length  # per step
    assert entries[0]["gflops"] == pytest.approx(
        entries[0]["median"] / tokens * TINY_LM.flops_per_step() / 1e9)
    assert entries[-1]["gflops"] == pytest.approx(
        entries[-1]["median"] * TINY_LSTM.flops_per_step() / 1e9)
    rounds = [line for line in logged if "rounds of" in line]  # skip notes come when torch is absent
    assert rounds == [f"{lm}: 1 rounds of 2 steps", f"{lstm}: 1 rounds of 5 steps"]
    if _has_torch():  # the compiled variant was turned off, with a note
        assert [(s["workload"], s["variant"], s["reason"]) for s in skipped] == [
            (lm, "pytorch torch.compile", "turned off (--no-torch-compile)")]


def _torch_version() -> str:
    return __import__("torch").__version__ if _has_torch() else "(no torch)"


def test_the_default_sizes_are_the_issues_and_count_their_flops():
    assert (sequences.W6.num_blocks, sequences.W6.features, sequences.W6.num_heads,
            sequences.W6.length, sequences.W6.batch) == (4, 256, 4, 128, 32)
    assert (sequences.W7.hidden, sequences.W7.steps, sequences.W7.features,
            sequences.W7.batch) == (256, 28, 28, 128)
    tokens = 32 * 128
    per_token = 4 * (24 * 256 ** 2 + 4 * 128 * 256) + 2 * 256 * 256
    assert sequences.W6.flops_per_step() == 3 * tokens * per_token
    assert sequences.W7.flops_per_step() == 3 * 128 * (2 * 28 * 284 * 1024 + 2 * 256 * 10)
    assert sequences.workload_name(sequences.W6) == "W6 transformer LM 4x256 h4 t128 b32"
    assert sequences.workload_name(sequences.W7) == "W7 LSTM 256 t28x28 b128"


def test_the_raw_w6_reference_computes_jaxnets_logits_and_loss_from_the_same_weights(key):
    net = sequences.jaxnet_transformer(TINY_LM)
    x, y = sequences.token_batch(TINY_LM)
    params = net.init(key, x[:1])
    raw_params = sequences.raw_transformer_init(key, TINY_LM)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(raw_params) == shapes(params)  # the weights map one to one, by name
    raw_logits = sequences.raw_transformer_apply(TINY_LM.num_heads, params, x)
    logits = net.apply(params, x)
    assert logits.shape == (TINY_LM.batch, TINY_LM.length, TINY_LM.vocab)
    assert jax.numpy.allclose(raw_logits, logits, atol=1e-4, rtol=1e-4)
    raw_loss = optax.softmax_cross_entropy_with_integer_labels(raw_logits, y).mean()
    loss = jaxnet.losses.token_cross_entropy(logits, y).mean()
    assert raw_loss == pytest.approx(float(loss), rel=1e-5)
    # at initialisation both are near the uniform guess, ln(vocab) (logits of unit variance)
    assert abs(float(loss) - math.log(TINY_LM.vocab)) < 1.5


def test_the_raw_w7_reference_is_pytorchs_lstm_with_the_same_weights():
    torch = pytest.importorskip("torch")
    model = sequences.torch_lstm_model(TINY_LSTM)
    x, _ = sequences.sequence_batch(TINY_LSTM)
    lstm, head = model.lstm, model.head
    t = lambda a: jax.numpy.asarray(a.detach().numpy())
    params = {"wx": t(lstm.weight_ih_l0).T, "wh": t(lstm.weight_hh_l0).T,
              "b": t(lstm.bias_ih_l0 + lstm.bias_hh_l0), "head": (t(head.weight).T, t(head.bias))}
    with torch.no_grad():
        expected = model(torch.from_numpy(np.array(x))).numpy()
    np.testing.assert_allclose(sequences.raw_lstm_apply(params, x), expected, atol=1e-5)


def test_the_pytorch_w6_model_is_causal_and_starts_near_the_uniform_loss():
    torch = pytest.importorskip("torch")
    model = sequences.torch_transformer(TINY_LM)
    x, y = (torch.from_numpy(np.array(a, np.int64)) for a in sequences.token_batch(TINY_LM))
    with torch.no_grad():
        logits = model(x).reshape(TINY_LM.batch, TINY_LM.length, TINY_LM.vocab)
        changed = x.clone()
        changed[:, 10:] = (changed[:, 10:] + 1) % TINY_LM.vocab  # change the future only
        again = model(changed).reshape(logits.shape)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, TINY_LM.vocab), y.reshape(-1))
    torch.testing.assert_close(again[:, :10], logits[:, :10])
    assert not torch.allclose(again[:, 10:], logits[:, 10:])
    assert abs(float(loss) - math.log(TINY_LM.vocab)) < 1.5


def test_a_failing_torch_compile_leaves_pytorch_eager_with_a_note(monkeypatch):
    torch = pytest.importorskip("torch")

    def fail(model):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", fail)
    skipped = []
    variants = sequences.torch_transformer_variants(TINY_LM, True, skipped)
    assert [v.name for v in variants] == [f"pytorch {torch.__version__} eager, fused adam",
                                          f"pytorch {torch.__version__} autocast bf16, fused adam"]
    assert skipped == [{"workload": "transformer LM 2x32 h4 t16 b4",
                        "variant": "pytorch torch.compile",
                        "reason": "compilation failed: RuntimeError: no C++ compiler"}]
    variants[0].run(1)


def test_without_pytorch_the_sequence_workloads_skip_it_with_notes(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    skipped = []
    assert sequences.torch_transformer_variants(TINY_LM, True, skipped) == []
    assert sequences.torch_lstm_variants(TINY_LSTM, skipped) == []
    assert [(s["workload"], s["variant"]) for s in skipped] == [
        ("transformer LM 2x32 h4 t16 b4", "pytorch"), ("LSTM 8 t5x3 b4", "pytorch")]
    assert all("torch not installed" in s["reason"] for s in skipped)


def test_run_passes_no_torch_compile_on_and_names_it_in_the_markdown(monkeypatch, tmp_path):
    calls = []
    results = {"matmul_gflops": 1.0, "entries": [], "skipped": [],
               "settings": {"jax": jax.__version__}}

    def fake(quick, torch_compile=True):
        calls.append((quick, torch_compile))
        return results

    monkeypatch.setattr(run.jaxnet, "keep_freed_host_memory", lambda: None)
    monkeypatch.setattr(run, "run_benchmarks", fake)
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    run.main(["--no-torch-compile", "--name", "b"])
    assert calls == [(False, False)]
    assert (tmp_path / "b.md").read_text().startswith(
        "`python benchmarks/run.py --no-torch-compile` on ")
