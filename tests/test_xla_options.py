"""jaxnet's programs on CPU: convolutions off YNNPACK, everything else as XLA's defaults."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet._xla import conv_ops as _conv_ops, options as xla_options
from jaxnet.inference import _compiled_forward


@pytest.fixture
def fresh_options(monkeypatch):
    """``compiler_options`` re-evaluated inside the test and again after it."""
    xla_options.compiler_options.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    xla_options.compiler_options.cache_clear()


def _program(x, w, d):
    y = jax.nn.relu(_conv_ops._lax_conv(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1))) @ d
    return jnp.max(y, axis=(1, 2)).sum(), jnp.tanh(y)


def _ynn_kinds(jitted) -> set[str]:
    """The HLO ops inside the compiled program's YNNPACK fusions."""
    f32 = functools.partial(jnp.ones, dtype=jnp.float32)
    x, w, d = f32((8, 14, 14, 16)), f32((3, 3, 16, 32)), f32((32, 32))
    text = jitted.lower(x, w, d).compile().as_text()
    kinds = set()
    for computation in re.findall(r"= \S+ fusion\(.*kind=kCustom, calls=%([\w.]+).*__ynn_fusion", text):
        body = text[text.index(f"%{computation} "):]
        kinds |= set(re.findall(r" (convolution|dot|reduce)\(", body[:body.index("\n}")]))
    return kinds


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU option")
def test_cpu_programs_keep_dots_and_reductions_on_ynnpack_but_not_convolutions(fresh_options):
    default = _ynn_kinds(jax.jit(_program))
    assert xla_options.compiler_options(False) == {xla_options.YNN_OPTION: xla_options.YNN_FUSION_TYPES}
    # If this fails, the installed jax hands other kinds to YNNPACK by default: revisit the list.
    assert default == {"convolution", "dot", "reduce"}
    assert _ynn_kinds(xla_options.jit(_program)) == default - {"convolution"}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU option")
def test_large_forward_programs_leave_dots_to_eigen_too(fresh_options):
    assert _ynn_kinds(xla_options.jit(_program, forward_rows=xla_options.LARGE_FORWARD_ROWS)) == {
        "reduce"}
    assert _ynn_kinds(xla_options.jit(_program, forward_rows=32)) == {"dot", "reduce"}


def test_the_environment_can_restore_xlas_defaults(fresh_options):
    fresh_options.setenv(xla_options.ENV_VAR, "default")
    assert xla_options.compiler_options(False) == xla_options.compiler_options(True) == {}
    assert _ynn_kinds(xla_options.jit(_program)) == _ynn_kinds(jax.jit(_program))


def test_an_xla_without_the_option_gets_none(fresh_options):
    fresh_options.setattr(xla_options, "YNN_FUSION_TYPES", "LIBRARY_FUSION_TYPE_NO_SUCH_KIND")
    fresh_options.setattr(xla_options, "EIGEN_DOT_FUSION_TYPES", "NOT_A_VALUE")
    assert xla_options.compiler_options(False) == xla_options.compiler_options(True) == {}
    assert float(xla_options.jit(jnp.negative)(jnp.float32(2))) == -2.0


def test_train_step_and_predict_compile_with_the_options(key, rng, fresh_options):
    # before jax.jit is watched: they compile a probe
    expected = xla_options.compiler_options(False) or None
    forward = xla_options.compiler_options(True) or None
    captured = []
    real_jit = jax.jit

    def watched_jit(f, **kw):
        if f.__name__ != "initialise":
            captured.append(kw)
        return real_jit(f, **kw)

    fresh_options.setattr(xla_options.jax, "jit", watched_jit)
    _compiled_forward.cache_clear()
    try:
        net = jn.serial(jn.Conv2D(4, 3), jn.relu, jn.MaxPool((2, 2)), jn.Flatten(), jn.Dense(3))
        x = jnp.asarray(rng.normal(size=(4, 6, 6, 1)), jnp.float32)
        params = net.init(key, x[:1])
        optimizer = optax.adam(1e-3)
        state, _ = jn.make_train_step(net, optimizer)(jn.init_train_state(net, optimizer, params),
                                                      x, jnp.arange(4) % 3)
        np.testing.assert_array_equal(jn.predict(net, state.params, x).shape, (4, 3))
        big = jnp.tile(x, (128, 1, 1, 1))  # 512 rows: one large chunk
        np.testing.assert_array_equal(jn.predict(net, state.params, big, batch_size=512).shape,
                                      (512, 3))
    finally:
        _compiled_forward.cache_clear()
    # the train step, predict in small chunks, predict in one large chunk (init compiles no
    # heavy program and may run inside another jit, so it takes jax.jit's defaults)
    assert [kw["compiler_options"] for kw in captured] == [expected, expected, forward]


COLUMNS = xla_options.LARGE_DOT_COLUMNS


def _dot(rows, dtype=jnp.float32, columns=COLUMNS):
    return lambda a, b: a @ b, (jnp.ones((rows, COLUMNS), dtype), jnp.ones((COLUMNS, columns), dtype))


@pytest.mark.parametrize("rows, columns, dtype, large", [
    (xla_options.LARGE_DOT_ROWS, COLUMNS, jnp.float32, True),
    (xla_options.LARGE_DOT_ROWS - 1, COLUMNS, jnp.float32, False),
    (xla_options.LARGE_DOT_ROWS, COLUMNS - 1, jnp.float32, False),
    (xla_options.LARGE_DOT_ROWS, COLUMNS, jnp.bfloat16, False)])
def test_large_dots_are_float32_products_of_many_rows_and_columns(rows, columns, dtype, large):
    fn, args = _dot(rows, dtype, columns)
    assert xla_options.has_large_dots(jax.make_jaxpr(fn)(*args)) == large
    # its gradient too: the input's gradient has as many rows and columns, the weight's fewer rows
    grad = jax.grad(lambda a, b: fn(a, b).astype(jnp.float32).sum(), argnums=(0, 1))
    assert xla_options.has_large_dots(jax.make_jaxpr(grad)(*args)) == large


def test_large_dots_weigh_loop_bodies_by_their_length_and_leave_out_batched_products():
    big = jnp.ones((2048, 8))  # 2 * 2048 * 8 * 256 FLOPs
    small = jnp.ones((16, 256))  # 2 * 16 * 256 * 256 FLOPs per step

    def program(length):
        def fn(w, v):
            body = lambda carry, _: (carry @ v, None)  # noqa: E731
            return big @ w, jax.lax.scan(body, small, None, length=length)[0]
        return jax.make_jaxpr(fn)(jnp.ones((8, 256)), jnp.ones((256, 256)))

    assert xla_options.has_large_dots(program(1))
    assert not xla_options.has_large_dots(program(100))
    batched = jax.make_jaxpr(jnp.matmul)(jnp.ones((4, 4096, 16)), jnp.ones((4, 16, 16)))
    assert not xla_options.has_large_dots(batched)
    assert not xla_options.has_large_dots(jax.make_jaxpr(jnp.sin)(1.0))  # no dots at all


def _ynn_dots(text: str) -> bool:
    return any(" dot(" in text[text.index(f"%{c} "):][:text[text.index(f"%{c} "):].index("\n}")]
               for c in re.findall(r"kind=kCustom, calls=%([\w.]+).*__ynn_fusion", text))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU option")
def test_programs_with_large_dots_leave_them_to_eigen(fresh_options, key):
    small, large = _dot(32), _dot(xla_options.LARGE_DOT_ROWS)
    assert _ynn_dots(xla_options.compile(xla_options.jit(small[0]), *small[1]).as_text())
    assert not _ynn_dots(xla_options.compile(xla_options.jit(large[0]), *large[1]).as_text())
    # the train step decides at its first call
    net = jn.serial(jn.Dense(COLUMNS), jn.relu, jn.Dense(COLUMNS), jn.relu, jn.Dense(4))
    optimizer = optax.sgd(0.1)
    for rows, ynn in ((32, True), (xla_options.LARGE_DOT_ROWS, False)):
        x, y = jnp.ones((rows, COLUMNS)), jnp.zeros((rows,), jnp.int32)
        state = jn.init_train_state(net, optimizer, net.init(key, x[:1]))
        step = jn.make_train_step(net, optimizer)
        assert _ynn_dots(step.lower(state, x, y).compile().as_text()) == ynn
        expected = optax.softmax_cross_entropy_with_integer_labels(
            net.apply(state.params, x), y).mean()  # the step's metrics are before its update
        np.testing.assert_allclose(step(state, x, y)[1]["loss"], expected, rtol=1e-5)
