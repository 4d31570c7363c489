"""What a refinement saves for a site: pooled batch-norm statistics, deltas against the base."""

import numpy as np
import pytest
import torch

from worker.batchnorm import is_running_statistic
from worker.nets import NetConfig, SegmentationNet
from worker.site_update import choose_version, pooled_state, site_delta, version_statistics
from worker.weights import mutable_state


def _state(offset: float) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = mutable_state(SegmentationNet(NetConfig(num_outputs=1, base_channels=4)))
    return {k: v + offset if v.is_floating_point() else v for k, v in state.items()}


def test_running_statistics_are_the_batch_norm_means_and_variances() -> None:
    keys = {k for k in _state(0.0) if is_running_statistic(k)}
    assert keys and all(k.endswith(("running_mean", "running_var")) for k in keys)
    assert not is_running_statistic("init_path.0.bn1.num_batches_tracked")
    assert not is_running_statistic("init_path.0.bn1.weight")


@pytest.mark.parametrize("site_scans", [0, 1, 3])
def test_pooling_weighs_every_scan_the_same(site_scans: int) -> None:
    site, scan = _state(1.0), _state(5.0)
    pooled = pooled_state(site, scan, site_scans)
    assert pooled.keys() == scan.keys()
    for key, value in pooled.items():
        if is_running_statistic(key):
            expected = (site_scans * site[key] + scan[key]) / (site_scans + 1)
            torch.testing.assert_close(value, expected)
        else:  # weights (the init path's, refined or not) and step counts: this scan's
            assert value is scan[key]


def test_pooling_refuses_a_negative_count() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        pooled_state(_state(0.0), _state(1.0), -1)


@pytest.mark.parametrize("prior", [0.0, 1 / 3, 2.0])
@pytest.mark.parametrize("policy", ["pooled", "latest"])
def test_a_version_pools_the_base_statistics_as_prior_scans(prior: float, policy: str) -> None:
    base, start, scan = _state(0.0), _state(1.0), _state(5.0)
    for start_scans in (0, 2):
        state = version_statistics(base, start, scan, start_scans, prior, policy)  # type: ignore[arg-type]
        for key, value in state.items():
            if not is_running_statistic(key):
                assert value is scan[key]
            elif policy == "pooled" and start_scans:
                # start held (prior * base + its 2 scans) / (prior + 2): one more scan joins
                expected = ((prior + start_scans) * start[key] + scan[key]) / (prior + 3)
                torch.testing.assert_close(value, expected)
            else:
                torch.testing.assert_close(value, (prior * base[key] + scan[key]) / (prior + 1))


def test_a_version_refuses_a_negative_prior() -> None:
    with pytest.raises(ValueError, match="prior_scans must be >= 0"):
        version_statistics(_state(0.0), _state(1.0), _state(2.0), 0, -0.5, "pooled")


def test_a_delta_holds_only_what_differs_from_the_base() -> None:
    state = _state(0.0)
    base = {k: v.numpy().copy() for k, v in state.items()}
    assert site_delta(state, base) == {}
    changed = next(k for k in state if is_running_statistic(k))
    state[changed] = state[changed] + 1
    delta = site_delta(state, base)
    assert list(delta) == [changed]
    np.testing.assert_array_equal(delta[changed], base[changed] + 1)


@pytest.mark.parametrize(
    ("scores", "first", "rule", "chosen", "why"),
    [
        ([("pool", 0.7), ("output", 0.9)], False, "beats_start", 1, "output beats the start"),
        ([("pool", 0.85), ("output", 0.9)], False, "guarded", 0, "pool beats the start"),
        ([("pool", 0.7), ("output", 0.75)], True, "beats_start", None, "not saved: none beats"),
        ([("pool", 0.7), ("output", 0.75)], False, "guarded", None, "not saved: none beats"),
        ([("pool", 0.7), ("output", 0.75)], True, "guarded", 0, "first version, kept by the"),
    ],
)
def test_the_next_version_beats_the_start_unless_it_is_a_guarded_first(
    scores: list[tuple[str, float]], first: bool, rule: str, chosen: int | None, why: str
) -> None:
    index, reason = choose_version(scores, 0.8, first, rule)  # type: ignore[arg-type]
    assert index == chosen and why in reason, reason
    assert "0.800" in reason
