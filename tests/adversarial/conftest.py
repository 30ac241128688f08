"""Run directories shared by the adversarial tests (trained once per session)."""

import pytest

from adv_helpers import FAST
from jaxnet.app.cli import main


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adv_runs") / "run"
    assert main(["train", *FAST, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("adv_sweeps") / "sweep"
    assert main(["sweep", "--hidden", "8", "--epochs", "1", "--seeds", "1", "--shared-order",
                 "--no-progress", "--out", str(out)]) == 0
    return out
