import pytest

from medseg import config as c
from medseg.errors import ConfigError


@pytest.mark.parametrize("check, good, bad, message", [
    (c.integer(minimum=1), 8, "eight", r"x must be an integer >= 1, got 'eight' \(str\)"),
    (c.integer(minimum=1), 1, 0, r"x must be an integer >= 1, got 0 \(int\)"),
    (c.integer(minimum=1), 2, True, r"got True \(bool\)"),
    (c.number(above=0), 1e-3, -1e-3, r"x must be a number > 0, got -0.001"),
    (c.number(minimum=0), 0.0, float("nan"), r"got nan"),
    (c.choice("adam", "sgd"), "sgd", "rmsprop", r"one of 'adam', 'sgd', got 'rmsprop'"),
    (c.boolean(), False, "yes", r"true or false, got 'yes'"),
    (c.optional(c.text()), None, 3, r"null or a string, got 3"),
    (c.sequence(c.integer(minimum=16), length=3), [64, 64, 32], [64, 64], r"a list of 3 values"),
    (c.number_range(minimum=0), [0.9, 1.1], [1.1, 0.9], r"low <= high, got \[1.1, 0.9\]"),
])
def test_checks_accept_good_values_and_name_bad_ones(check, good, bad, message):
    check("x", good)
    with pytest.raises(ConfigError, match=message):
        check("x", bad)


def test_validate_names_the_full_key_and_missing_entries():
    checks = {"batch_size": c.integer(minimum=1)}
    with pytest.raises(ConfigError, match="training.batch_size must be"):
        c.validate({"batch_size": 0}, checks, prefix="training.")
    with pytest.raises(ConfigError, match="training.batch_size is missing"):
        c.validate({}, checks, prefix="training.")
