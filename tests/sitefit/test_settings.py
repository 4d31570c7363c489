"""Settings refuse combinations that cannot do what they say."""

import os
import subprocess
import sys

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


def _from_environment(**env: str) -> str:
    """Settings() as a process with ``env`` sees it (the environment is not patched here)."""
    code = (
        "from sitefit.settings import Settings\n"
        "try:\n    s = Settings()\n    print(s.auto_margin, s.redis_url)\n"
        "except ValueError as e:\n    print('refused', e.errors()[0]['loc'])\n"
    )
    variables = {k: v for k, v in os.environ.items() if not k.startswith("SITEFIT_")}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**variables, **env}, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return done.stdout.strip()


def test_null_unsets_an_optional_setting_from_the_environment() -> None:
    assert _from_environment(SITEFIT_AUTO_MARGIN="null") == "None None"
    assert _from_environment(SITEFIT_AUTO_MARGIN="0.05") == "0.05 None"


def test_the_redis_url_is_a_redis_url_or_unset() -> None:
    assert _from_environment(SITEFIT_REDIS_URL="") == "0.02 None"
    assert _from_environment(SITEFIT_REDIS_URL="redis://h:6379/0") == "0.02 redis://h:6379/0"
    assert _from_environment(SITEFIT_REDIS_URL="notaurl") == "refused ('redis_url',)"


def test_a_refinement_batch_holds_at_least_two_slices() -> None:
    # batch norm in train mode has no statistics of one slice: the refinement would skip
    # every step and change nothing while its report said it ran
    assert Settings(refine_batch_size=2).refine_batch_size == 2
    with pytest.raises(ValidationError, match="refine_batch_size"):
        Settings(refine_batch_size=1)
