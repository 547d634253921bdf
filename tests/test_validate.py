"""The one vocabulary of setting checks (lightning_imex/validate.py): each bad value is one
line naming the setting, what it allows and what it got; bools are not numbers."""

import math

import numpy as np
import pytest

from lightning_imex.validate import allowed_keywords, boolean, choice, fraction, integer, real


@pytest.mark.parametrize("check,message", [
    (lambda: integer("dataset.batch_size", 0, 1), "dataset.batch_size must be an integer >= 1, got 0"),
    (lambda: integer("start_step", True, 0), "start_step must be an integer >= 0, got True"),
    (lambda: integer("trainer.min_steps", 1.0, 0, optional=True), "trainer.min_steps must be an integer >= 0 or "
                                                                   "null, got 1.0"),
    (lambda: integer("trainer.log_every_n_steps", -1, 0, note=" (0: never)"),
     r"trainer.log_every_n_steps must be an integer >= 0 \(0: never\), got -1"),
    (lambda: real("optimizer.lr", math.nan, 0), "optimizer.lr must be a finite number >= 0, got nan"),
    (lambda: real("scheduler.gamma", 0, 0, above=True), "scheduler.gamma must be a finite number > 0, got 0"),
    (lambda: real("clipping.norm_type", False, 0, above=True, finite=False),
     r"clipping.norm_type must be a number > 0 \(or inf\), got False"),
    (lambda: fraction("model.dropout", 1), r"model.dropout must be a number in \[0, 1\), got 1"),
    (lambda: choice("scheduler.interval", "batch", ("step", "epoch")),
     "scheduler.interval must be one of 'step', 'epoch', got 'batch'"),
    (lambda: choice("seeds", True, (1, 2)), "seeds must be one of 1, 2, got True"),
    (lambda: boolean("model.batch_norm", 1), r"model.batch_norm must be a bool \(true or false\), got 1"),
    (lambda: allowed_keywords("dataset", {"foo": 1}, ["batch_size"], "dataset 'digits'"),
     "dataset.foo: not a field of dataset 'digits'; allowed: batch_size"),
    (lambda: allowed_keywords("model", ["width"], [], "model 'logreg'"),
     "model.width: not a field of model 'logreg'; model 'logreg' takes none"),
])
def test_a_bad_value_is_one_line_naming_the_setting(check, message):
    with pytest.raises((ValueError, TypeError), match=f"^{message}$"):
        check()


def test_good_values_pass_through():
    assert integer("n", np.int64(3), 1) == 3 and integer("n", None, 1, optional=True) is None
    assert real("x", 0.5, 0, above=True) == 0.5 and real("x", math.inf, 0, finite=False) == math.inf
    assert fraction("p", 1.0, closed=True) == 1.0 and choice("c", "a", "ab") == "a" and boolean("b", False) is False
    allowed_keywords("dataset", ["batch_size"], ["batch_size", "seed"], "dataset 'digits'")
