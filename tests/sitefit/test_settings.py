"""Settings refuse combinations that cannot do what they say."""

import pytest
from pydantic import ValidationError

from sitefit.settings import Settings


def test_statistics_only_refinement_needs_train_mode_batchnorm() -> None:
    assert Settings(refine_lr=0.0, refine_batchnorm="train").refine_lr == 0.0
    with pytest.raises(ValidationError, match="would change nothing"):
        Settings(refine_lr=0.0, refine_batchnorm="frozen")


def test_statistics_average_is_one_of_two_named_averages() -> None:
    assert Settings().refine_statistics_average == "cumulative"
    assert Settings(refine_statistics_average="momentum").refine_statistics_average == "momentum"
    with pytest.raises(ValidationError):
        Settings(refine_statistics_average="ema")  # type: ignore[arg-type]


def test_auto_margin_is_a_fraction_or_off() -> None:
    assert Settings(auto_margin=None).auto_margin is None
    with pytest.raises(ValidationError):
        Settings(auto_margin=-0.1)
