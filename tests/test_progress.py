"""What ``fit``'s ``progress`` shows: a bar on a terminal, one line per epoch in a log."""

import io

from jaxnet import progress

RECORD = {"epoch": 3, "train_loss": 0.51234, "train_accuracy": 0.875, "test_loss": 0.6,
          "test_accuracy": 0.8125, "seconds": 1.234, "examples_per_second": 1000.0}


def test_an_epoch_is_one_whole_line():
    assert progress.format_epoch(RECORD, 10) == (
        "epoch 3/10  train loss 0.5123  train acc 0.8750  test loss 0.6000  test acc 0.8125  1.23 s")
    without_test = {k: v for k, v in RECORD.items() if not k.startswith("test")}
    assert progress.format_epoch(without_test | {"skipped_batches": 2}, 10) == (
        "epoch 3/10  train loss 0.5123  train acc 0.8750  skipped 2 batches  1.23 s")


def test_line_progress_writes_a_line_when_each_epoch_ends():
    out = io.StringIO()
    with progress.LineProgress(10, file=out) as reporter:
        reporter.start_epoch(3)
        reporter.update(5, None)  # steps within the epoch: nothing
        assert out.getvalue() == ""
        reporter.end_epoch(RECORD)
    assert out.getvalue() == progress.format_epoch(RECORD, 10) + "\n"


def test_what_progress_asks_for_where_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_INTERACTIVE", raising=False)
    assert type(progress.make_progress(None, 2, 5)) is progress.NoProgress  # the library default
    assert type(progress.make_progress(False, 2, 5)) is progress.NoProgress
    assert type(progress.make_progress(True, 2, 5)) is progress.LineProgress
