"""worker.weights: the import check that keeps a model no job could use from becoming latest."""

from __future__ import annotations

import numpy as np
import pytest

from model_store.base_models import BaseModelRegistry
from sitefit.exceptions import InvalidInputError
from sitefit.settings import Settings
from worker.weights import check_fits


def test_check_fits_refuses_wrong_shapes_and_non_finite_weights(
    settings: Settings, brain_model: str
) -> None:
    registry = BaseModelRegistry(settings.models_dir)
    spec = registry.spec(brain_model)
    tensors = registry.tensors(spec)
    check_fits(spec, tensors)  # the trained model fits its own spec
    key = next(k for k, v in tensors.items() if v.dtype == np.float32 and v.ndim > 1)
    with pytest.raises(InvalidInputError, match="has shape"):
        check_fits(spec, {**tensors, key: tensors[key].ravel()})
    broken = tensors[key].copy()
    broken.flat[0] = np.nan
    with pytest.raises(InvalidInputError, match=rf"tensor '{key}' holds NaN or Inf"):
        check_fits(spec, {**tensors, key: broken})
