"""Mixed precision (jaxnet.precision): float32 params, bfloat16 products, float32 logits and loss.

References are NumPy float64 computations on the float32 params; bfloat16 has 8 significant
bits, so a bfloat16 forward pass is compared with a tolerance of a few percent of the output's
scale, and the float32 policy must give exactly the program without a policy. "bf16" rounds
only the products' operands (tests/test_mixed_matmul.py checks its products layer by layer);
"bf16-full" runs the whole forward pass in bfloat16.
"""

import json
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet import train
from jaxnet.app.cli import main
from jaxnet.losses import softmax_cross_entropy
from jaxnet.precision import POLICIES, Policy, apply_with_policy, get_policy
from jaxnet.app.run import RunConfig, chosen_record

BF16 = jnp.dtype(jnp.bfloat16)
F32 = jnp.dtype(jnp.float32)


def random_params(net, x, rng):
    shapes = jax.eval_shape(net.init, jax.random.key(0), x)
    return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[0]),
                                                 leaf.dtype), shapes)


def mlp_reference(params, x):
    """float64 NumPy forward of ``serial(Dense, relu, Dense, relu, Dense)``."""
    h = np.asarray(x, np.float64)
    for i in (1, 2, 3):
        p = params[f"dense_{i}"]
        h = h @ np.asarray(p["w"], np.float64) + np.asarray(p["b"], np.float64)
        h = np.maximum(h, 0) if i < 3 else h
    return h


def mlp():
    return jn.serial(jn.Dense(64), jn.relu, jn.Dense(32), jn.relu, jn.Dense(5))


def ops_with_types(text: str, op: str) -> list[str]:
    """The type signatures of every ``op`` in a StableHLO module's text."""
    return [line.split(" : ", 1)[-1] for line in text.splitlines() if f"stablehlo.{op} " in line]


# ---- the policies ------------------------------------------------------------------------

def test_named_policies():
    assert get_policy("f32") == Policy(F32, F32, F32)
    assert get_policy("bf16") == Policy(F32, F32, F32, matmul_dtype=jnp.bfloat16)
    assert get_policy("bf16").matmul_dtype == BF16 and get_policy("bf16").trainable
    assert get_policy("bf16-full") == Policy(jnp.float32, jnp.bfloat16, jnp.float32)
    assert get_policy("f16").compute_dtype == jnp.float16 and not get_policy("f16").trainable
    assert get_policy(None) is None
    custom = Policy(compute_dtype=jnp.bfloat16, output_dtype=jnp.bfloat16)
    assert get_policy(custom) is custom
    assert [get_policy(name).name for name in POLICIES] == list(POLICIES)
    assert custom.name == "Policy(param=float32, compute=bfloat16, output=bfloat16)"
    assert Policy(matmul_dtype=jnp.float16).name == (
        "Policy(param=float32, compute=float32, output=float32, matmul=float16)")
    assert not Policy(matmul_dtype=jnp.float16).trainable
    assert hash(get_policy("bf16-full")) == hash(Policy(jnp.float32, jnp.bfloat16, jnp.float32))


def test_unknown_policies_are_refused_with_the_known_names():
    with pytest.raises(ValueError, match=r"unknown precision 'bfloat16'; choose one of f32, bf16, "
                                         r"bf16-full, f16"):
        get_policy("bfloat16")
    with pytest.raises(TypeError, match=r"precision must be a policy name \(f32, bf16, bf16-full, "
                                        r"f16\).*got float"):
        get_policy(16.0)
    with pytest.raises(TypeError, match="Policy: compute_dtype must be a floating dtype, got int32"):
        Policy(compute_dtype=jnp.int32)
    with pytest.raises(TypeError, match="Policy: matmul_dtype must be a floating dtype, got int8"):
        Policy(matmul_dtype=jnp.int8)


def test_training_refuses_float16_and_unknown_names_before_any_work(key, rng):
    x, y = rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 5, 8).astype(np.int32)
    net = mlp()
    params = net.init(key, x[:1])
    with pytest.raises(ValueError, match=r"fit: precision f16 \(float16\) is for evaluation "
                                         r"and prediction only.*train with precision 'bf16'"):
        train.fit(net, params, optax.sgd(0.1), (x, y), epochs=1, precision="f16", progress=False)
    with pytest.raises(ValueError, match="make_train_step: precision f16"):
        train.make_train_step(net, optax.sgd(0.1), precision="f16")
    with pytest.raises(ValueError, match=r"make_train_step: precision Policy\(.*matmul=float16\) "
                                         r"\(float16\) is for evaluation"):
        train.make_train_step(net, optax.sgd(0.1), precision=Policy(matmul_dtype=jnp.float16))
    with pytest.raises(ValueError, match="unknown precision 'b16'"):
        train.fit(net, params, optax.sgd(0.1), (x, y), epochs=1, precision="b16", progress=False)
    with pytest.raises(ValueError, match="precision must be one of f32, bf16, bf16-full; got 'f16'"):
        RunConfig(precision="f16")


def test_params_must_be_in_the_policys_param_dtype(key, rng):
    x, y = rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 5, 8).astype(np.int32)
    net = mlp()
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), net.init(key, x[:1]))
    with pytest.raises(TypeError, match=r"fit: precision bf16 keeps parameters in float32, but "
                                        r"dense_1\.b is bfloat16; initialise the network on float32"):
        train.fit(net, params, optax.sgd(0.1), (x, y), epochs=1, precision="bf16", progress=False)
    with pytest.raises(TypeError, match="predict: precision bf16 keeps parameters in float32"):
        jn.predict(net, params, x, precision="bf16")


def test_integer_inputs_need_float32_compute(key):
    net = jn.serial(jn.Embedding(10, 4), jn.Flatten(), jn.Dense(3))
    ids = jnp.asarray([[1, 2], [3, 9]], jnp.int32)
    params = net.init(key, ids[:1])
    y, _ = apply_with_policy(net, get_policy("f32"), params, {}, ids)
    np.testing.assert_array_equal(y, net.apply(params, ids))
    y16, _ = apply_with_policy(net, get_policy("bf16"), params, {}, ids)  # float32 compute
    assert y16.dtype == F32 and np.abs(y16 - y).max() < 3e-2 * np.abs(y).max()
    with pytest.raises(TypeError, match=r"precision bf16-full: the input is int32 of shape "
                                        r"\(2, 2\); a bfloat16 forward pass needs floating inputs"):
        apply_with_policy(net, get_policy("bf16-full"), params, {}, ids)


# ---- forward pass: values and dtypes ------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "bf16-full"])
def test_bf16_forward_is_within_bf16_tolerance_of_a_float64_reference(rng, precision):
    net = mlp()
    x = jnp.asarray(rng.normal(size=(256, 20)), jnp.float32)
    params = random_params(net, x[:1], rng)
    reference = mlp_reference(params, x)
    scale = np.abs(reference).max()
    y16, _ = jax.jit(lambda p, v: apply_with_policy(net, get_policy(precision), p, {}, v))(params, x)
    y32, _ = jax.jit(lambda p, v: apply_with_policy(net, get_policy("f32"), p, {}, v))(params, x)
    assert y16.dtype == F32 and y32.dtype == F32
    error16 = np.abs(np.asarray(y16, np.float64) - reference).max() / scale
    error32 = np.abs(np.asarray(y32, np.float64) - reference).max() / scale
    assert error16 < 3e-2  # bfloat16: 2^-8 relative per rounding, a few roundings deep
    assert error32 < 1e-5
    assert error16 > 30 * error32  # it really ran in bfloat16


def test_bf16_full_train_step_runs_its_dots_in_bf16_and_its_loss_in_f32(key, rng):
    net = jn.serial(jn.Flatten(), jn.Dense(32), jn.relu, jn.Dropout(0.1), jn.Dense(5))
    x = jnp.asarray(rng.normal(size=(16, 4, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, 16), jnp.int32)
    params = net.init(key, x[:1])
    state = train.init_train_state(net, optax.adam(1e-3), params)
    text = train.make_train_step(net, optax.adam(1e-3), precision="bf16-full").lower(
        state, x, y).as_text()
    dots = ops_with_types(text, "dot_general")
    assert len(dots) == 5  # 2 forward, 2 weight gradients, 1 input gradient (of dense_2)
    for signature in dots:  # (tensor<16x20xbf16>, tensor<20x32xbf16>) -> tensor<16x32xbf16>
        assert re.findall(r"tensor<(?:\d+x)*(\w+)>", signature) == ["bf16"] * 3, signature
    exps = ops_with_types(text, "exponential")  # the softmax inside the loss
    assert exps and all(s.endswith("f32>") for s in exps), exps

    step = train.make_train_step(net, optax.adam(1e-3), precision="bf16-full")
    new, metrics = step(state, x, y)
    assert {leaf.dtype for leaf in jax.tree.leaves(new.params)} == {F32}
    float_opt = {leaf.dtype for leaf in jax.tree.leaves(new.opt_state)
                 if jnp.issubdtype(leaf.dtype, jnp.floating)}
    assert float_opt == {F32}
    assert metrics["loss"].dtype == F32 and np.isfinite(float(metrics["loss"]))


def equations(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs (jit, custom_jvp) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from equations(sub)


@pytest.mark.parametrize("precision, activations", [("bf16-full", BF16), ("bf16", F32)])
def test_intermediate_activations_and_logits(rng, precision, activations):
    """"bf16-full": bfloat16 activations; "bf16": float32 ones (only the products' operands
    are rounded); float32 logits either way."""
    net = mlp()
    x = jnp.asarray(rng.normal(size=(4, 20)), jnp.float32)
    params = random_params(net, x[:1], rng)
    closed = jax.make_jaxpr(lambda p, v: apply_with_policy(net, get_policy(precision), p, {},
                                                           v)[0])(params, x)
    out_dtypes = lambda name: [v.aval.dtype for e in equations(closed.jaxpr)
                               if e.primitive.name == name for v in e.outvars]
    in_dtypes = lambda name: [v.aval.dtype for e in equations(closed.jaxpr)
                              if e.primitive.name == name for v in e.invars]
    assert out_dtypes("dot_general") == [activations] * 3  # the three Dense layers
    assert in_dtypes("dot_general") == [BF16] * 6
    assert out_dtypes("max") == [activations] * 2  # the two ReLUs
    assert closed.out_avals[0].dtype == F32  # the logits


def test_f32_policy_compiles_to_exactly_the_program_without_a_policy(key, rng):
    net = jn.serial(jn.Flatten(), jn.Dense(16), jn.relu, jn.LayerNorm(), jn.Dense(5))
    x = jnp.asarray(rng.normal(size=(8, 4, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, 8), jnp.int32)
    state = train.init_train_state(net, optax.adam(1e-3), net.init(key, x[:1]))

    def step_text(precision):
        return train.make_train_step(net, optax.adam(1e-3), precision=precision).lower(
            state, x, y).as_text()

    def epoch_text(precision):
        epoch, _ = train.make_epoch(net, optax.adam(1e-3), softmax_cross_entropy, 8, 4,
                                    precision=precision)
        return jax.jit(epoch).lower(state, x, y, jnp.int32(0)).as_text()

    assert step_text("f32") == step_text(None)
    assert epoch_text("f32") == epoch_text(None)
    assert step_text("bf16") != step_text(None) and step_text("bf16-full") != step_text(None)


# ---- gradients ------------------------------------------------------------------------------

def loss_fn(net, precision, x, y):
    def loss(params):
        logits, _ = apply_with_policy(net, get_policy(precision), params, {}, x)
        return softmax_cross_entropy(logits, y).mean()
    return loss


@pytest.mark.parametrize("precision", ["bf16", "bf16-full"])
def test_bf16_gradients_are_f32_and_close_to_the_f32_gradients(rng, precision):
    """The last layer's gradients differ by bfloat16 rounding (<1%); deeper ones by a few
    percent, mostly because ReLU masks flip where a pre-activation lies within bfloat16
    rounding of zero, which with random labels is a visible share of a small mean gradient."""
    net = mlp()
    x = jnp.asarray(rng.normal(size=(256, 20)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, 256), jnp.int32)
    params = random_params(net, x[:1], rng)
    g16 = jax.jit(jax.grad(loss_fn(net, precision, x, y)))(params)
    g32 = jax.jit(jax.grad(loss_fn(net, "f32", x, y)))(params)
    for name in ("dense_1", "dense_2", "dense_3"):
        for leaf in ("w", "b"):
            a, b = np.asarray(g16[name][leaf], np.float64), np.asarray(g32[name][leaf], np.float64)
            assert g16[name][leaf].dtype == F32
            bound = 1e-2 if name == "dense_3" else 1e-1
            assert np.linalg.norm(a - b) <= bound * np.linalg.norm(b), (name, leaf)


@pytest.mark.parametrize("precision", ["bf16", "bf16-full"])
def test_bf16_conv_gradients_are_close_to_f32(key, rng, precision):
    """Conv's canonical-gradient custom VJP and block max-pooling also run in bfloat16."""
    net = jn.serial(jn.Conv2D(4, 3), jn.relu, jn.MaxPool((2, 2)), jn.Flatten(), jn.Dense(3))
    x = jnp.asarray(rng.normal(size=(8, 6, 6, 2)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 8), jnp.int32)
    params = net.init(key, x[:1])

    def grads(precision):
        def loss(p):
            logits, _ = apply_with_policy(net, get_policy(precision), p, {}, x, train=True)
            return softmax_cross_entropy(logits, y).mean()
        return jax.jit(jax.grad(loss))(params)

    g16, g32 = grads(precision), grads("f32")
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        assert a.dtype == F32
        assert np.linalg.norm(np.asarray(a) - np.asarray(b)) <= 5e-2 * np.linalg.norm(b)


# ---- normalisation statistics in float32 ---------------------------------------------------

def test_layer_norm_of_bf16_inputs_computes_its_statistics_in_f32(key, rng):
    """Values near 64 with spread 1: a bfloat16 mean (spacing 0.5 there) would be off by up to
    a quarter of a standard deviation; float32 statistics leave only the output's rounding."""
    x = jnp.asarray(64 + rng.normal(size=(16, 32)), jnp.bfloat16)
    net = jn.LayerNorm()
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), net.init(key, x[:1].astype(jnp.float32)))
    y = jax.jit(net.apply)(params, x)
    assert y.dtype == BF16
    exact = np.asarray(x, np.float64)
    exact = (exact - exact.mean(-1, keepdims=True)) / np.sqrt(exact.var(-1, keepdims=True) + 1e-5)
    assert np.abs(np.asarray(y, np.float64) - exact).max() < 2e-2  # bf16 rounding of |y| < 4


def test_batch_norm_keeps_f32_statistics_under_bf16(key, rng):
    net = jn.serial(jn.Dense(8), jn.BatchNorm(momentum=0.5), jn.relu, jn.Dense(3))
    x = jnp.asarray(rng.normal(size=(32, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 32), jnp.int32)
    params, state = net.init_with_state(key, x[:1])
    assert jax.eval_shape(net.init_with_state, key, x[:1].astype(jnp.bfloat16))[1][
        "batch_norm_1"]["mean"].dtype == F32
    _, new = jax.jit(lambda p, s, v: apply_with_policy(net, get_policy("bf16"), p, s, v,
                                                       train=True))(params, state, x)
    assert {leaf.dtype for leaf in jax.tree.leaves(new)} == {F32}
    h = np.asarray(x, np.float64) @ np.asarray(params["dense_1"]["w"], np.float64)
    h += np.asarray(params["dense_1"]["b"], np.float64)
    np.testing.assert_allclose(new["batch_norm_1"]["mean"], 0.5 * h.mean(0), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(new["batch_norm_1"]["var"], 0.5 + 0.5 * h.var(0), rtol=2e-2, atol=2e-2)
    trained, history = train.fit(net, params, optax.adam(1e-2), (x, y), epochs=3, batch_size=8,
                                 model_state=state, precision="bf16", progress=False)
    assert {leaf.dtype for leaf in jax.tree.leaves(trained.model_state)} == {F32}
    assert np.isfinite(history[-1]["train_loss"])


# ---- training, evaluation, prediction ------------------------------------------------------

@pytest.fixture(scope="module")
def digits_runs():
    from jaxnet import data
    dataset = data.load_dataset("digits")
    x_train, x_test, _ = data.standardize(dataset.x_train, dataset.x_test)
    net = jn.serial(jn.Flatten(), jn.Dense(128), jn.relu, jn.Dense(10))
    params = net.init(jax.random.key(0), x_train[:1])
    runs = {}
    for precision in ("f32", "bf16"):
        state, history = train.fit(net, params, optax.adam(1e-3), (x_train, dataset.y_train),
                                   epochs=8, batch_size=32, eval_data=(x_test, dataset.y_test),
                                   precision=precision, progress=False)
        runs[precision] = state, history
    return net, (x_test, dataset.y_test), runs


def test_bf16_training_on_digits_reaches_the_f32_accuracy(digits_runs):
    _, _, runs = digits_runs
    f32, bf16 = (runs[p][1][-1]["test_accuracy"] for p in ("f32", "bf16"))
    assert f32 > 0.95
    assert bf16 > f32 - 0.02
    assert {leaf.dtype for leaf in jax.tree.leaves(runs["bf16"][0].params)} == {F32}


def test_evaluate_and_predict_use_the_policy(digits_runs):
    net, (x, y), runs = digits_runs
    params = runs["bf16"][0].params
    metrics = train.evaluate(net, params, (x, y), precision="bf16")
    assert metrics["accuracy"] == pytest.approx(runs["bf16"][1][-1]["test_accuracy"])
    logits = jn.predict(net, params, x, precision="bf16", batch_size=100)
    assert logits.dtype == np.float32
    assert np.mean(np.argmax(logits, -1) == y) == pytest.approx(metrics["accuracy"])
    loss = float(softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(y)).mean())
    assert loss == pytest.approx(metrics["loss"], rel=1e-4)
    # float16 is fine for a forward pass: close to the float32 logits
    logits16 = jn.predict(net, params, x, precision="f16")
    logits32 = jn.predict(net, params, x, precision="f32")
    assert np.abs(logits16 - logits32).max() < 2e-2 * np.abs(logits32).max()


def test_cli_trains_and_evaluates_a_bf16_run(tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["train", "--epochs", "2", "--hidden", "32", "--no-progress", "--precision", "bf16",
                 "--out", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["precision"] == "bf16"
    chosen = chosen_record([json.loads(line) for line in
                            (out / "metrics.jsonl").read_text().splitlines()])
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert f"accuracy {chosen['test_accuracy']:.2%}" in capsys.readouterr().out
    assert main(["train", "--precision", "f16", "--out", str(tmp_path / "f16")]) == 2
    assert "invalid choice: 'f16' (choose from 'f32', 'bf16', 'bf16-full')" in capsys.readouterr().err
