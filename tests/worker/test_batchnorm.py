import pytest
import torch

from worker.batchnorm import (
    cumulative_average,
    interpolate_statistics,
    is_running_statistic,
    set_buffers,
)
from worker.nets import NetConfig, SegmentationNet
from worker.weights import mutable_state


def _net() -> SegmentationNet:
    torch.manual_seed(0)
    return SegmentationNet(NetConfig(num_outputs=1, base_channels=4, levels=2, res_blocks=1))


def test_running_statistics_are_the_means_and_variances_only() -> None:
    assert is_running_statistic("body.down.0.bn.running_mean")
    assert is_running_statistic("init_path.blocks.0.bn1.running_var")
    assert not is_running_statistic("init_path.blocks.0.bn1.num_batches_tracked")
    assert not is_running_statistic("init_path.blocks.0.bn1.weight")
    assert not is_running_statistic("running_mean.weight")


@pytest.mark.parametrize("weight", [0.0, 0.25, 1.0])
def test_interpolation_moves_the_statistics_and_keeps_the_rest_of_the_end(weight: float) -> None:
    start = {"a.running_mean": torch.zeros(3), "a.weight": torch.zeros(3)}
    end = {"a.running_mean": torch.full((3,), 4.0), "a.weight": torch.ones(3)}
    mixed = interpolate_statistics(start, end, weight)
    assert torch.equal(mixed["a.running_mean"], torch.full((3,), 4.0 * weight))
    assert mixed["a.weight"] is end["a.weight"]
    assert mixed["a.running_mean"].dtype == end["a.running_mean"].dtype


def test_set_buffers_copies_only_the_buffers_it_is_given() -> None:
    net = _net()
    before = mutable_state(net)
    key = next(k for k in before if is_running_statistic(k))
    other = next(k for k in before if is_running_statistic(k) and k != key)
    set_buffers(net, {key: before[key] + 1.5, "init_path.conv.weight": before[key]})
    after = mutable_state(net)
    assert torch.equal(after[key], before[key] + 1.5)
    assert torch.equal(after[other], before[other])
    assert torch.equal(after["init_path.conv.weight"], before["init_path.conv.weight"])


def test_the_cumulative_average_is_the_plain_mean_and_restores_momentum_and_counts() -> None:
    net = _net().train()
    layers = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    counts = [int(layer.num_batches_tracked) for layer in layers]  # type: ignore[arg-type]
    first = torch.randn(4, 1, 16, 16)
    second = 3 * torch.randn(4, 1, 16, 16) + 2
    with torch.no_grad(), cumulative_average(net):
        net.body(net.init_path(first))
        after_first = layers[0].running_mean.clone()  # type: ignore[union-attr]
        net.body(net.init_path(second))
        after_second = layers[0].running_mean.clone()  # type: ignore[union-attr]
    # the mean of the two batches' statistics: the second step moved half the way
    probe = _net().train()
    with torch.no_grad(), cumulative_average(probe):
        probe.body(probe.init_path(second))
    only_second = next(m for m in probe.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.allclose(after_second, (after_first + only_second.running_mean) / 2, atol=1e-6)
    assert all(layer.momentum == 0.1 for layer in layers)
    assert [int(layer.num_batches_tracked) for layer in layers] == [c + 2 for c in counts]  # type: ignore[arg-type]
