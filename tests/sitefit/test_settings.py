"""Settings refuse combinations that cannot do what they say."""

import pytest
from pydantic import ValidationError

from sitefit.settings import Settings


def test_statistics_only_refinement_needs_train_mode_batchnorm() -> None:
    assert Settings(refine_lr=0.0, refine_batchnorm="train").refine_lr == 0.0
    with pytest.raises(ValidationError, match="would change nothing"):
        Settings(refine_lr=0.0, refine_batchnorm="frozen")


def test_auto_margin_is_a_fraction_or_off() -> None:
    assert Settings(auto_margin=None).auto_margin is None
    with pytest.raises(ValidationError):
        Settings(auto_margin=-0.1)
