"""Plots are drawn without pyplot or a backend switch, and written all or nothing."""

import matplotlib
import pytest
from matplotlib.figure import Figure

from jaxnet.app import plots

HISTORY = [{"epoch": e, "train_loss": 1 / e, "train_accuracy": 0.5 + e / 10,
            "test_loss": 1.1 / e, "test_accuracy": 0.4 + e / 10} for e in (1, 2, 3)]
PNG = b"\x89PNG\r\n\x1a\n"


def test_curves_are_a_png(tmp_path):
    plots.plot_curves(HISTORY, tmp_path / "curves.png", "title")
    population = [{"epoch": r["epoch"], "train_loss": [r["train_loss"]] * 2,
                   "test_accuracy": [r["test_accuracy"]] * 2} for r in HISTORY]
    plots.plot_population(population, ["a", "b"], tmp_path / "population.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
    assert (tmp_path / "population.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "population.png"]


def test_a_failed_plot_leaves_no_file_and_an_old_one_untouched(tmp_path, monkeypatch):
    def broken(self, file, **kwargs):
        file.write(b"\x89PN")  # part of a PNG, then the failure
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="renderer failed"):
        plots.plot_curves(HISTORY, tmp_path / "curves.png")
    assert list(tmp_path.iterdir()) == []  # no 0-byte or partial curves.png, no temporary file
    (tmp_path / "curves.png").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        plots.plot_curves(HISTORY, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_plotting_keeps_matplotlibs_backend(tmp_path):
    raw = dict.__getitem__(matplotlib.rcParams, "backend")  # without resolving it
    plots.plot_curves(HISTORY, tmp_path / "curves.png")
    assert dict.__getitem__(matplotlib.rcParams, "backend") == raw
