"""SimpleRNN, LSTM and GRU cells run by Recurrent, and Bidirectional.

Each cell is checked against a NumPy float64 reference and against torch.nn.RNN / LSTM / GRU
with the same weights (including bidirectional and packed, i.e. padded, sequences); masks,
initial states, return_state, example independence, jit, vmap, gradients and error messages.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnet as jn
from contract import assert_contract, f64

RTOL, ATOL = 1e-5, 1e-5  # float32 layer vs float64 reference
BATCH, TIME, FEATURES, HIDDEN = 6, 7, 3, 5
CELLS = {
    "lstm": lambda h: jn.LSTMCell(h),
    "gru": lambda h: jn.GRUCell(h),
    "rnn_tanh": lambda h: jn.SimpleRNNCell(h),
    "rnn_relu": lambda h: jn.SimpleRNNCell(h, jn.relu),
}


# ---- references ------------------------------------------------------------------------

def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def reference_step(cell, p, state, x_t):
    """One step of ``cell`` in float64, written from PyTorch's documented equations."""
    xi = x_t @ p["input"]["w"] + p["input"]["b"]
    h = state[0] if isinstance(cell, jn.LSTMCell) else state
    hh = h @ p["hidden"]["w"] + p["hidden"]["b"]
    if isinstance(cell, jn.LSTMCell):
        i, f, g, o = np.split(xi + hh, 4, axis=-1)
        c = sigmoid(f) * state[1] + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        return (h, c), h
    if isinstance(cell, jn.GRUCell):
        (xr, xz, xn), (hr, hz, hn) = np.split(xi, 3, axis=-1), np.split(hh, 3, axis=-1)
        r, z = sigmoid(xr + hr), sigmoid(xz + hz)
        n = np.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        return h, h
    h = np.tanh(xi + hh) if cell.activation is jn.tanh else np.maximum(xi + hh, 0)
    return h, h


def reference(cell, p, x, mask=None, reverse=False, state=None):
    """``(ys, final_state)``: the cell over each sequence of ``x``, in float64; padded steps keep
    the state and output zeros."""
    x, p = np.asarray(x, np.float64), f64(p)
    batch, time, _ = x.shape
    zeros = np.zeros((batch, cell.hidden))
    if state is None:
        state = (zeros, zeros) if isinstance(cell, jn.LSTMCell) else zeros
    state = jax.tree.map(lambda s: np.asarray(s, np.float64), state)
    ys = np.zeros((batch, time, cell.hidden))
    for t in (reversed(range(time)) if reverse else range(time)):
        new, h = reference_step(cell, p, state, x[:, t])
        real = np.ones((batch, 1), bool) if mask is None else np.asarray(mask)[:, t, None]
        state = jax.tree.map(lambda a, b: np.where(real, a, b), new, state)
        ys[:, t] = np.where(real, h, 0)
    return ys, state


# ---- helpers ---------------------------------------------------------------------------

def normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


def params_for(net, x, rng, scale=0.5):
    """Random params of the shapes ``net.init`` makes (scaled so that gates do not saturate)."""
    shapes = jax.eval_shape(lambda k: net.init_params(k, x)[0], jax.random.key(0))
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


def run(net, params, x):
    """``net.forward`` on a batch (any input form), as the library calls it."""
    return net.forward(params, {}, x, train=False, key=None)[0]


def lengths_mask(lengths, time=TIME):
    return jnp.arange(time)[None, :] < jnp.asarray(lengths)[:, None]


LENGTHS = [7, 3, 1, 5, 0, 6]  # right-padded; one sequence without any real step


def state_of(cell, h, c=None):
    return (h, c) if isinstance(cell, jn.LSTMCell) else h


# ---- cells against references ----------------------------------------------------------

@pytest.mark.parametrize("name", CELLS)
def test_each_cell_matches_a_float64_numpy_reference_and_the_layer_contract(rng, name):
    cell = CELLS[name](HIDDEN)
    net = jn.Recurrent(cell)
    x = normal(rng, (BATCH, TIME, FEATURES))
    params = params_for(net, x, rng)
    y = assert_contract(net, params, x)
    np.testing.assert_allclose(y, reference(cell, params, x)[0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_reverse_and_last_output_match_the_reference(rng, name):
    cell = CELLS[name](HIDDEN)
    x = normal(rng, (BATCH, TIME, FEATURES))
    params = params_for(jn.Recurrent(cell), x, rng)
    ys, _ = reference(cell, params, x, reverse=True)
    np.testing.assert_allclose(run(jn.Recurrent(cell, reverse=True), params, x), ys, rtol=RTOL, atol=ATOL)
    last = assert_contract(jn.Recurrent(cell, return_sequences=False, reverse=True), params, x)
    np.testing.assert_allclose(last, ys[:, 0], rtol=RTOL, atol=ATOL)  # the last step processed
    last = run(jn.Recurrent(cell, return_sequences=False), params, x)
    np.testing.assert_allclose(last, reference(cell, params, x)[0][:, -1], rtol=RTOL, atol=ATOL)


def test_params_are_named_readably_and_initialised_as_pytorch(key):
    x = jax.ShapeDtypeStruct((2, TIME, FEATURES), jnp.float32)
    for cell, gates in ((jn.LSTMCell(64), 4), (jn.GRUCell(64), 3), (jn.SimpleRNNCell(64), 1)):
        params, state = jax.jit(lambda k: jn.Recurrent(cell).init_params(k, x))(key)
        assert state == {}
        assert jax.tree.map(jnp.shape, params) == {
            "input": {"w": (FEATURES, gates * 64), "b": (gates * 64,)},
            "hidden": {"w": (64, gates * 64), "b": (gates * 64,)}}
        for leaf in jax.tree.leaves(params):
            assert leaf.dtype == jnp.float32
            assert float(jnp.max(jnp.abs(leaf))) <= 1 / 8 and float(jnp.std(leaf)) > 0.05
    net = jn.serial(jn.LSTM(hidden=4), jn.GRU(4), jn.SimpleRNN(4), jn.Dense(2))
    assert set(jax.eval_shape(net.init, key, x)) == {"lstm_1", "gru_1", "simple_rnn_1", "dense_1"}
    assert repr(jn.LSTM(8, reverse=True)) == "Recurrent(LSTMCell(hidden=8), reverse=True)"


def test_float64_inputs_give_float64_params_and_outputs(key, rng):
    with jax.enable_x64(True):
        net = jn.GRU(3)
        x = normal(rng, (2, 4, 2), jnp.float64)
        params = net.init(key, x)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(params))
        assert net.apply(params, x).dtype == jnp.float64


def test_a_recurrent_network_runs_in_serial_with_a_summary(rng):
    net = jn.serial(jn.Dense(4), jn.LSTM(5, return_sequences=False), jn.Dense(2))
    x = normal(rng, (BATCH, TIME, FEATURES))
    params = jax.tree.map(lambda p: 0.5 * p, net.init(jax.random.key(1), x[:1]))
    assert assert_contract(net, params, x).shape == (BATCH, 2)
    row = [r for r in jn.summarize(net, x).rows if r.path == "lstm_1"][0]
    assert row.output_shape == (BATCH, 5)


# ---- PyTorch -----------------------------------------------------------------------------

def load_torch(module, net, params, x):
    """Loads our params into a torch RNN module through jaxnet.to_torch's weights (weights
    transposed, both biases as they are, a Bidirectional's backward ones as ``*_reverse``)."""
    module.load_state_dict(jn.to_torch(net, params, example=x[:1]).state_dict())


def torch_module(name, bidirectional=False):
    torch = pytest.importorskip("torch")
    kwargs = dict(batch_first=True, bidirectional=bidirectional, dtype=torch.float64)
    if name == "lstm":
        return torch.nn.LSTM(FEATURES, HIDDEN, **kwargs)
    if name == "gru":
        return torch.nn.GRU(FEATURES, HIDDEN, **kwargs)
    return torch.nn.RNN(FEATURES, HIDDEN, nonlinearity=name.split("_")[1], **kwargs)


def torch_final(name, h_n, direction=0):
    """Our state layout from torch's ``h_n`` / ``(h_n, c_n)``."""
    if name == "lstm":
        return (h_n[0][direction].detach().numpy(), h_n[1][direction].detach().numpy())
    return h_n[direction].detach().numpy()


@pytest.mark.parametrize("name", CELLS)
def test_each_cell_matches_torch_with_the_same_weights_and_initial_state(rng, name):
    torch = pytest.importorskip("torch")
    module, cell = torch_module(name), CELLS[name](HIDDEN)
    x = normal(rng, (BATCH, TIME, FEATURES))
    params = params_for(jn.Recurrent(cell), x, rng)
    load_torch(module, jn.Recurrent(cell), params, x)
    h0, c0 = normal(rng, (BATCH, HIDDEN)), normal(rng, (BATCH, HIDDEN))
    initial = state_of(cell, h0, c0)
    torch_initial = jax.tree.map(lambda s: torch.tensor(np.asarray(s, np.float64)[None]), initial)
    expected, h_n = module(torch.tensor(np.asarray(x, np.float64)), torch_initial)
    y, final = run(jn.Recurrent(cell, return_state=True), params, {"x": x, "initial_state": initial})
    np.testing.assert_allclose(y, expected.detach().numpy(), rtol=RTOL, atol=ATOL)
    for ours, theirs in zip(jax.tree.leaves(final), jax.tree.leaves(torch_final(name, h_n))):
        np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh"])
def test_bidirectional_matches_torch_bidirectional_on_padded_packed_sequences(rng, name):
    torch = pytest.importorskip("torch")
    module = torch_module(name, bidirectional=True)
    net = jn.Bidirectional(jn.Recurrent(CELLS[name](HIDDEN), return_state=True))
    x = normal(rng, (BATCH, TIME, FEATURES))
    params = params_for(net, x, rng)
    load_torch(module, net, params, x)
    lengths = [7, 3, 1, 5, 2, 6]  # torch cannot pack empty sequences
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        torch.tensor(np.asarray(x, np.float64)), torch.tensor(lengths), batch_first=True,
        enforce_sorted=False)
    out, h_n = module(packed)
    expected, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=TIME)
    y, final = jax.jit(lambda p, x, m: run(net, p, (x, m)))(params, x, lengths_mask(lengths))
    np.testing.assert_allclose(y, expected.detach().numpy(), rtol=RTOL, atol=ATOL)
    for i, direction in enumerate(("forward", "backward")):
        for ours, theirs in zip(jax.tree.leaves(final[direction]),
                                jax.tree.leaves(torch_final(name, h_n, i))):
            np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)
    # without padding, through the public apply (contract: jit, vmap, one example)
    plain = jn.Bidirectional(jn.Recurrent(CELLS[name](HIDDEN)))
    expected, _ = module(torch.tensor(np.asarray(x, np.float64)))
    np.testing.assert_allclose(assert_contract(plain, params, x), expected.detach().numpy(),
                               rtol=RTOL, atol=ATOL)


def test_bidirectional_sum_and_custom_backward_layer_match_the_reference(rng):
    forward, backward = jn.LSTM(HIDDEN, return_sequences=False), jn.GRU(HIDDEN, return_sequences=False, reverse=True)
    net = jn.Bidirectional(forward, backward, merge="sum")
    x = normal(rng, (BATCH, TIME, FEATURES))
    params = params_for(net, x, rng)
    assert set(params) == {"forward", "backward"} and params["backward"]["input"]["w"].shape[1] == 3 * HIDDEN
    y = assert_contract(net, params, x)
    expected = (reference(forward.cell, params["forward"], x)[0][:, -1]
                + reference(backward.cell, params["backward"], x, reverse=True)[0][:, 0])
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


# ---- masks, initial states, return_state ----------------------------------------------

@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("reverse", [False, True])
def test_padded_steps_change_nothing_at_real_steps_and_output_zeros(rng, name, reverse):
    cell = CELLS[name](HIDDEN)
    net = jn.Recurrent(cell, reverse=reverse, return_state=True)
    x = normal(rng, (BATCH, TIME, FEATURES))
    mask = lengths_mask(LENGTHS)
    params = params_for(net, x, rng)
    f = jax.jit(lambda x: run(net, params, (x, mask)))
    (y, final), (y2, final2) = f(x), f(jnp.where(mask[..., None], x, 100.0))
    np.testing.assert_array_equal(y, y2)
    jax.tree.map(np.testing.assert_array_equal, final, final2)
    assert not np.any(np.asarray(y)[~np.asarray(mask)])
    ys, state = reference(cell, params, x, mask, reverse)
    np.testing.assert_allclose(y, ys, rtol=RTOL, atol=ATOL)
    for i, length in enumerate(LENGTHS):  # each equals its real part run alone
        alone, alone_final = run(net, params, x[i:i + 1, :length])
        np.testing.assert_allclose(y[i, :length], alone[0], rtol=RTOL, atol=ATOL)
        for ours, theirs in zip(jax.tree.leaves(final), jax.tree.leaves(alone_final)):
            np.testing.assert_allclose(ours[i], theirs[0], rtol=RTOL, atol=ATOL)
        if length == 0:  # no real step: the initial (zero) state
            assert not any(np.any(np.asarray(s)[i]) for s in jax.tree.leaves(final))


def test_reverse_on_right_padding_equals_the_reversed_real_part_run_forward(rng):
    cell = jn.GRUCell(HIDDEN)
    x = normal(rng, (BATCH, TIME, FEATURES))
    params = params_for(jn.Recurrent(cell), x, rng)
    backward = run(jn.Recurrent(cell, reverse=True), params, (x, lengths_mask(LENGTHS)))
    for i, length in enumerate(LENGTHS):
        forward = run(jn.Recurrent(cell), params, x[i:i + 1, :length][:, ::-1])
        np.testing.assert_allclose(backward[i, :length], forward[0, ::-1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("reverse", [False, True])
def test_last_output_with_padding_is_the_last_real_steps(rng, reverse):
    cell = jn.LSTMCell(HIDDEN)
    x, mask = normal(rng, (BATCH, TIME, FEATURES)), lengths_mask(LENGTHS)
    params = params_for(jn.Recurrent(cell), x, rng)
    ys = run(jn.Recurrent(cell, reverse=reverse), params, (x, mask))
    last, (h, _) = run(jn.Recurrent(cell, return_sequences=False, reverse=reverse, return_state=True),
                       params, (x, mask))
    np.testing.assert_array_equal(last, h)
    for i, length in enumerate(LENGTHS):
        if length:
            np.testing.assert_allclose(last[i], ys[i, 0 if reverse else length - 1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_initial_state_zeros_equal_the_default_and_others_match_the_reference(rng, name):
    cell = CELLS[name](HIDDEN)
    net = jn.Recurrent(cell, return_state=True)
    x, mask = normal(rng, (BATCH, TIME, FEATURES)), lengths_mask(LENGTHS)
    params = params_for(net, x, rng)
    zeros = jnp.zeros((BATCH, HIDDEN))
    default = run(net, params, (x, mask))
    given = run(net, params, {"x": x, "mask": mask, "initial_state": state_of(cell, zeros, zeros)})
    jax.tree.map(np.testing.assert_array_equal, default, given)
    initial = state_of(cell, normal(rng, (BATCH, HIDDEN)), normal(rng, (BATCH, HIDDEN)))
    y, final = run(net, params, {"x": x, "mask": mask, "initial_state": initial})
    ys, state = reference(cell, params, x, mask, state=initial)
    np.testing.assert_allclose(y, ys, rtol=RTOL, atol=ATOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), final, state)
    # an empty sequence (length 0) keeps the given state
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[4], b[4]), final, initial)


def test_bidirectional_takes_an_initial_state_per_direction(rng):
    cell = jn.LSTMCell(HIDDEN)
    net = jn.Bidirectional(jn.Recurrent(cell))
    x = normal(rng, (BATCH, TIME, FEATURES))
    params = params_for(net, x, rng)
    initial = {d: (normal(rng, (BATCH, HIDDEN)), normal(rng, (BATCH, HIDDEN))) for d in ("forward", "backward")}
    y = run(net, params, {"x": x, "initial_state": initial})
    expected = np.concatenate([
        reference(cell, params["forward"], x, state=initial["forward"])[0],
        reference(cell, params["backward"], x, reverse=True, state=initial["backward"])[0]], -1)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


def test_masked_inputs_run_through_the_public_apply_with_any_batch_axes(rng):
    net = jn.LSTM(HIDDEN)
    x, mask = normal(rng, (BATCH, TIME, FEATURES)), lengths_mask(LENGTHS)
    params = params_for(net, x, rng)
    y = net.apply(params, (x, mask))
    np.testing.assert_array_equal(y, run(net, params, (x, mask)))
    np.testing.assert_allclose(net.apply(params, (x[1], mask[1])), y[1], rtol=1e-6, atol=1e-6)
    mapped = jax.jit(jax.vmap(net.apply, (None, 0)))(params, (x, mask))
    np.testing.assert_allclose(mapped, y, rtol=1e-6, atol=1e-6)
    two_axes = net.apply(params, (x.reshape(2, 3, TIME, FEATURES), mask.reshape(2, 3, TIME)))
    np.testing.assert_allclose(two_axes.reshape(y.shape), y, rtol=1e-6, atol=1e-6)


def test_changing_one_example_leaves_the_others_unchanged(rng):
    net = jn.Bidirectional(jn.GRU(HIDDEN))
    x = normal(rng, (BATCH, TIME, FEATURES))
    params = params_for(net, x, rng)
    f = jax.jit(lambda x: run(net, params, x))
    y, y2 = f(x), f(x.at[0].set(5.0))
    np.testing.assert_array_equal(y[1:], y2[1:])
    assert np.any(np.asarray(y[0]) != np.asarray(y2[0]))


def test_changing_future_steps_leaves_past_outputs_of_a_forward_layer_unchanged(rng):
    net = jn.LSTM(HIDDEN)
    x = normal(rng, (BATCH, TIME, FEATURES))
    params = params_for(net, x, rng)
    y, y2 = run(net, params, x), run(net, params, x.at[:, 4:].set(3.0))
    np.testing.assert_array_equal(y[:, :4], y2[:, :4])


# ---- gradients -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh"])
def test_gradients_match_finite_differences_in_float64(rng, name):
    with jax.enable_x64(True):
        net = jn.Bidirectional(jn.Recurrent(CELLS[name](3), return_state=True))
        x, mask = normal(rng, (2, 4, 2), jnp.float64), lengths_mask([4, 2], 4)
        params = params_for(net, x, rng)
        initial = {d: state_of(net.forward_layer.cell, normal(rng, (2, 3), jnp.float64),
                               normal(rng, (2, 3), jnp.float64)) for d in ("forward", "backward")}
        f = jax.jit(lambda p, x, s: run(net, p, {"x": x, "mask": mask, "initial_state": s}))
        check_grads(f, (params, x, initial), order=1, modes=("rev",))


def test_gradients_in_float32_through_apply_with_reverse_only_kernels(rng):
    net = jn.serial(jn.LSTM(4, return_sequences=False), jn.Dense(2))
    x = normal(rng, (3, 5, 2))
    params = net.init(jax.random.key(0), x[:1])
    loss = lambda p, fast: jnp.sum(net.apply_with_state(p, {}, x, reverse_only=fast)[0] ** 2)
    slow, fast = jax.grad(loss)(params, False), jax.grad(loss)(params, True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), slow, fast)
    check_grads(lambda p: loss(p, False), (params,), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", sorted(CELLS))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("keep_ys", [False, True])
def test_reverse_only_gradients_equal_autodiff_with_masks_and_initial_states(rng, name, reverse,
                                                                           keep_ys):
    # the reverse-only scan (batched weight gradient, the cells' own combine_bwd) against
    # autodiff of the plain scan, through every input: params, x, the initial state, the final
    # state and the outputs both carrying gradient, padded and empty sequences
    layer = jn.Recurrent(CELLS[name](HIDDEN), return_sequences=keep_ys, reverse=reverse,
                         return_state=True)
    x, mask = normal(rng, (BATCH, TIME, FEATURES)), lengths_mask(LENGTHS)
    params = params_for(layer, x, rng)
    initial = state_of(layer.cell, normal(rng, (BATCH, HIDDEN)), normal(rng, (BATCH, HIDDEN)))
    weights = jax.tree.map(lambda a: normal(rng, a.shape), jax.eval_shape(
        lambda: run(layer, params, {"x": x, "mask": mask, "initial_state": initial})))

    def loss(p, v, s, fast):
        out = layer.apply_with_state(p, {}, {"x": v, "mask": mask, "initial_state": s},
                                     reverse_only=fast)[0]
        return sum(jnp.sum(jnp.tanh(o) * w) for o, w in zip(jax.tree.leaves(out),
                                                            jax.tree.leaves(weights)))

    outputs = [layer.apply_with_state(params, {}, {"x": x, "mask": mask, "initial_state": initial},
                                      reverse_only=fast)[0] for fast in (False, True)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), *outputs)
    grads = {fast: jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(params, x, initial, fast)
             for fast in (False, True)}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 grads[False], grads[True])
    assert float(jnp.abs(grads[True][2] if name != "lstm" else grads[True][2][1]).max()) > 0


@pytest.mark.parametrize("name", sorted(CELLS))
def test_reverse_only_gradients_match_finite_differences_in_float64_and_vmap(rng, name):
    with jax.enable_x64(True):
        net = jn.Bidirectional(jn.Recurrent(CELLS[name](3), return_state=True))
        x, mask = normal(rng, (2, 4, 2), jnp.float64), lengths_mask([4, 2], 4)
        params = params_for(net, x, rng)
        apply = lambda p, v: net.apply_with_state(p, {}, {"x": v, "mask": mask},
                                                  reverse_only=True)[0]
        loss = lambda p, v: sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(apply(p, v)))
        check_grads(loss, (params, x), order=1, modes=("rev",))
        # per-example gradients (vmap of grad over examples) equal the gradients one at a time
        one = lambda p, v, m: sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(net.apply_with_state(
            p, {}, {"x": v[None], "mask": m[None]}, reverse_only=True)[0]))
        batched = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, mask)
        for k in range(2):
            single = jax.grad(one)(params, x[k], mask[k])
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a[k], b, rtol=1e-10, atol=1e-12),
                         batched, single)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_reverse_only_bf16_policy_gradients_equal_the_straight_through_ones(rng, name):
    # under "bf16" every product rounds its operands; the reverse-only scan's batched weight
    # gradient sums the same rounded products in another order (float32 accumulation)
    net = jn.serial(jn.Recurrent(CELLS[name](16), return_sequences=False), jn.Dense(3))
    x = normal(rng, (8, 6, 4))
    params = net.init(jax.random.key(0), x[:1])
    policy = jn.precision.get_policy("bf16")

    def loss(p, fast):
        y = jn.precision.apply_with_policy(net, policy, p, {}, x, reverse_only=fast)[0]
        return jnp.sum(y ** 2)

    slow, fast = (jax.grad(loss)(params, f) for f in (False, True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3), slow, fast)
    plain = jax.grad(lambda p: jnp.sum(net.apply(p, x) ** 2))(params)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(fast),
                                                           jax.tree.leaves(plain)))
    assert diff > 0  # the policy really rounded


# ---- errors ----------------------------------------------------------------------------

def test_bad_constructor_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="LSTMCell: hidden must be a positive integer, got 0"):
        jn.LSTM(0)
    with pytest.raises(ValueError, match="GRUCell: hidden must be a positive integer, got 2.5"):
        jn.GRU(2.5)
    with pytest.raises(ValueError, match="SimpleRNNCell: hidden must be a positive integer, got -1"):
        jn.SimpleRNNCell(-1)
    with pytest.raises(TypeError, match="SimpleRNNCell: activation must be a function or one of"):
        jn.SimpleRNN(3, activation="swish_typo")
    assert jn.SimpleRNN(3, activation="relu").cell.activation is jn.relu
    with pytest.raises(TypeError, match="Recurrent: cell must be a SimpleRNNCell, LSTMCell or GRUCell"):
        jn.Recurrent(jn.Dense(3))
    with pytest.raises(TypeError, match="Recurrent: reverse must be True or False, got 1"):
        jn.LSTM(3, reverse=1)
    with pytest.raises(ValueError, match="Bidirectional: merge must be 'concat' or 'sum', got 'mean'"):
        jn.Bidirectional(jn.LSTM(3), merge="mean")
    with pytest.raises(TypeError, match="Bidirectional: forward_layer must be a Recurrent layer with reverse=False"):
        jn.Bidirectional(jn.LSTM(3, reverse=True))
    with pytest.raises(TypeError, match="Bidirectional: backward_layer must be a Recurrent layer with reverse=True"):
        jn.Bidirectional(jn.LSTM(3), jn.LSTM(3))
    with pytest.raises(ValueError, match="must agree on return_sequences and return_state"):
        jn.Bidirectional(jn.LSTM(3), jn.LSTM(3, reverse=True, return_sequences=False))
    with pytest.raises(ValueError, match="merge='sum' needs equal hidden sizes, got 3 and 4"):
        jn.Bidirectional(jn.LSTM(3), jn.LSTM(4, reverse=True), merge="sum")


def test_bad_inputs_raise_clear_errors(key, rng):
    net, x = jn.LSTM(3), normal(rng, (2, 4, 3))
    with pytest.raises(jn.ShapeError, match=r"^lstm: expected examples of shape \(time, features\) "
                                            r"\(rank 2\); got examples of shape \(3,\) \(rank 1\)"):
        net.init(key, (2, 3))
    with pytest.raises(jn.ShapeError, match=r"^lstm_1: expected examples of shape \(time, features\)"):
        jn.serial(jn.LSTM(3)).init(key, (2, 4, 4, 3))
    with pytest.raises(TypeError, match="expected a floating-point input, got int32"):
        net.init(key, jnp.zeros((2, 4, 3), jnp.int32))
    params, _ = net.init_params(key, x)
    with pytest.raises(jn.ShapeError, match=r"mask must have shape \(batch, time\) = \(2, 4\) like x "
                                            r"\(2, 4, 3\); got \(2, 5\)"):
        run(net, params, (x, jnp.ones((2, 5), bool)))
    with pytest.raises(TypeError, match="mask must be bool .*got float32; use mask.astype"):
        run(net, params, (x, jnp.ones((2, 4))))
    with pytest.raises(jn.ShapeError, match=r"initial_state must be a pair \(h, c\), each of shape "
                                            r"\(batch, hidden\) = \(2, 3\); got \(2, 3\)"):
        run(net, params, {"x": x, "initial_state": jnp.zeros((2, 3))})
    with pytest.raises(jn.ShapeError, match=r"initial_state must be an array of shape"):
        run(jn.GRU(3), jn.GRU(3).init_params(key, x)[0], {"x": x, "initial_state": jnp.zeros((1, 3))})
    with pytest.raises(ValueError, match=r"a dict input needs the key 'x' .*got keys \['h0', 'x'\]"):
        run(net, params, {"x": x, "h0": x})
    with pytest.raises(ValueError, match="a tuple input must be \\(x, mask\\); got 3 entries"):
        run(net, params, (x, x, x))
    bi = jn.Bidirectional(net)
    with pytest.raises(ValueError, match="Bidirectional: initial_state must be a dict"):
        run(bi, bi.init_params(key, x)[0], {"x": x, "initial_state": (x, x)})


# ---- training --------------------------------------------------------------------------

def test_an_lstm_learns_to_classify_whether_a_bit_sequence_sums_above_half():
    optax = pytest.importorskip("optax")
    bits = np.array([[(i >> t) & 1 for t in range(5)] for i in range(32)], np.float32)
    x, labels = jnp.asarray(bits[..., None]), jnp.asarray((bits.sum(1) >= 3).astype(np.int32))
    net = jn.serial(jn.LSTM(8, return_sequences=False), jn.Dense(2))
    params = net.init(jax.random.key(0), x[:1])
    optimizer = optax.adam(3e-2)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, x), labels).mean()

    @jax.jit
    def train(params):
        def step(carry, _):
            p, opt = carry
            value, grads = jax.value_and_grad(loss)(p)
            updates, opt = optimizer.update(grads, opt, p)
            return (optax.apply_updates(p, updates), opt), value
        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), None, length=100)
        return params, losses

    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
        params, losses = train(params)
    assert float(losses[0]) > 0.5 and float(loss(params)) < 0.1 * float(losses[0])
    assert float(jnp.mean(jnp.argmax(net.apply(params, x), -1) == labels)) == 1.0
