"""Training: the train step (:mod:`~jaxnet.train.state`), the epoch driver shared by ``fit`` and
populations (:mod:`~jaxnet.train.engine`), and ``fit``/``evaluate`` (:mod:`~jaxnet.train.fit`)."""

from jaxnet.train.engine import EpochPlan, Sums, batch_sums, run_epochs
from jaxnet.train.shuffle import shuffled_order
from jaxnet.train.fit import evaluate, fit, make_epoch, make_evaluate
from jaxnet.train.state import (ON_NAN, LossFn, StepMetrics, TrainState, TrainStep,
                                init_sharded, init_train_state, make_train_step, train_batch)

__all__ = ["EpochPlan", "LossFn", "ON_NAN", "StepMetrics", "Sums", "TrainState", "TrainStep",
           "batch_sums", "evaluate", "fit", "init_sharded", "init_train_state", "make_epoch", "make_evaluate",
           "make_train_step", "run_epochs", "shuffled_order", "train_batch"]
