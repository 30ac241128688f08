"""An update that makes the parameters non-finite while the loss before it was finite: skipped
inside the compiled step with ``on_nan="skip"``, never checkpointed nor saved with ``"stop"``,
and the "last good checkpoint" named in the error is good."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adv_helpers import one_line_error
from jaxnet import checkpoint, fit, init_train_state
from jaxnet.models import mlp
from jaxnet.app import run
from jaxnet.app.cli import main
from jaxnet.data import load_digits

STEPS_PER_EPOCH = 23  # 1438 digits in batches of 64 (fit without a validation split)


def inf_update_at(step: int) -> optax.GradientTransformation:
    """Passes updates through, except at optimizer step ``step`` (0-based), where every update
    is +inf: the loss of that batch, computed before the update, is finite."""
    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        updates = jax.tree.map(lambda u: jnp.where(state.count == step, jnp.inf, u), updates)
        return updates, optax.ScaleByScheduleState(count=state.count + 1)

    return optax.GradientTransformation(init, update)


def diverge_in_epoch_2(monkeypatch) -> dict:
    """Makes ``jaxnet.app.run``'s optimizer infinite at the last update of epoch 2 (so epoch
    2's loss is finite, its end state not); the dict gets the run's ``steps`` per epoch."""
    seen = {}

    def build(config, steps, **_):
        seen["steps"] = steps
        return optax.chain(optax.sgd(0.05), inf_update_at(2 * steps - 1))

    monkeypatch.setattr(run, "build_optimizer", build)
    return seen


def test_skip_leaves_out_an_update_that_makes_the_params_non_finite():
    digits = load_digits()
    net = mlp((16,), 10)
    # the epoch's last update is infinite (a skipped step keeps the optimizer's count, so a
    # later one would be too: one epoch shows it)
    optimizer = optax.chain(optax.sgd(0.05), inf_update_at(STEPS_PER_EPOCH - 1))
    state = init_train_state(net, optimizer, net.init(jax.random.key(0), digits.x_train[:1]))
    state, history = fit(net, state, optimizer, (digits.x_train, digits.y_train), epochs=1,
                         batch_size=64, on_nan="skip", progress=False)
    assert history[0]["skipped_batches"] == 1 and np.isfinite(history[0]["train_loss"])
    assert checkpoint.non_finite_leaves(state) == []
    assert int(state.step) == STEPS_PER_EPOCH


def test_stop_never_checkpoints_a_diverged_state_and_names_the_last_good_one(tmp_path, capsys,
                                                                            monkeypatch):
    out = tmp_path / "run"
    seen = diverge_in_epoch_2(monkeypatch)
    assert main(["train", "--epochs", "4", "--hidden", "16", "--batch-size", "64",
                 "--checkpoint-every", "1", "--no-progress", "--out", str(out)]) == 2
    good = out / "checkpoints" / f"ckpt-{seen['steps']:06d}"
    err = one_line_error(capsys.readouterr().err, "epoch 2", "not finite", "params.dense_1.w",
                         f"the last good checkpoint is {good}")
    assert "not checkpointed" in err
    assert checkpoint.list_checkpoints(out / "checkpoints") == [good]
    tensors, _ = checkpoint.read_checkpoint(good)
    assert all(np.isfinite(a).all() for a in tensors.values() if a.dtype.kind == "f")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # the bad epoch is not logged
    assert not (out / "params.safetensors").exists()


def test_stop_never_saves_diverged_final_params(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    diverge_in_epoch_2(monkeypatch)
    # without validation the run keeps its last state (with it, the best epoch's: finite)
    assert main(["train", "--epochs", "2", "--hidden", "16", "--batch-size", "64",
                 "--validation-split", "0", "--no-progress", "--out", str(out)]) == 2
    one_line_error(capsys.readouterr().err, "the end of the run: not saved", "not finite",
                   "no checkpoint was written")
    assert not (out / "params.safetensors").exists()


def test_save_checkpoint_refuses_a_nan_but_keeps_an_optimizers_deliberate_inf(tmp_path):
    params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    optimizer = optax.contrib.reduce_on_plateau()  # its best value starts at inf
    net = mlp((), 2)
    state = init_train_state(net, optimizer, net.init(jax.random.key(0), jnp.zeros((1, 3))))
    assert checkpoint.save_checkpoint(tmp_path, state).name == "ckpt-000000"
    broken = state._replace(params=jax.tree.map(lambda p: p.at[0].set(jnp.nan), state.params),
                            step=state.step + 1)
    with pytest.raises(FloatingPointError, match=r"ckpt-000001: not written: the training state "
                                                 r"is not finite \(params\.dense_1\.b \(NaN\), "
                                                 r"params\.dense_1\.w \(NaN\)\)"):
        checkpoint.save_checkpoint(tmp_path, broken)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000"]
    inf_params = {"w": params["w"].at[1].set(jnp.inf)}
    assert checkpoint.non_finite_leaves({"params": inf_params}) == ["params.w (inf)"]
    assert checkpoint.non_finite_leaves({"opt_state": inf_params}) == []
