"""Training: ``TrainState``, the jitted train step, the device-side epoch driver, ``fit``."""

from jaxnet.train.fit import *  # noqa: F401,F403  (temporary during the restructure)
from jaxnet.train.fit import (ON_NAN, LossFn, Sums, StepMetrics, TrainState, TrainStep, _sort_key_val,
                              _sort_packed, evaluate, fit, init_train_state, make_epoch,
                              make_evaluate, make_train_step, shuffled_order, train_batch)
