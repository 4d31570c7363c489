"""Architecture: shapes, the init-path / body / early-head split, the losses."""

import pytest
import torch

from worker.nets import (
    NetConfig,
    SegmentationNet,
    labels_from_logits,
    probabilities,
    soft_cross_entropy,
    supervised_loss,
)


@pytest.mark.parametrize("num_outputs", [1, 4])
def test_both_heads_give_full_resolution_logits(num_outputs: int) -> None:
    net = SegmentationNet(NetConfig(num_outputs=num_outputs, base_channels=4))
    final, early = net(torch.randn(2, 1, 32, 40))
    assert final.shape == early.shape == (2, num_outputs, 32, 40)


def test_default_architecture_matches_the_paper() -> None:
    net = SegmentationNet(NetConfig(num_outputs=1))
    assert net.init_path.conv.out_channels == 16  # M = 16
    assert len(net.init_path.blocks) == 3
    assert len(net.body.down) == 3
    head = [m for m in net.early_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in head] == [
        (16, 12, (3, 3)),
        (12, 8, (3, 3)),
        (8, 1, (3, 3)),
    ]
    channels = [level.down.out_channels for level in net.body.down]
    assert channels == [32, 64, 128]  # strided convs double the channels


def test_soft_cross_entropy_is_eq2_for_softmax() -> None:
    logits = torch.randn(2, 3, 4, 4)
    teacher = torch.softmax(torch.randn(2, 3, 4, 4), dim=1)
    expected = -(teacher * torch.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(soft_cross_entropy(logits, teacher), expected)


def test_soft_cross_entropy_is_eq2_for_one_logit() -> None:
    logits = torch.randn(2, 1, 4, 4)
    p = torch.sigmoid(torch.randn(2, 1, 4, 4))
    q = torch.sigmoid(logits)
    expected = -(p * torch.log(q) + (1 - p) * torch.log(1 - q)).mean()
    assert torch.allclose(soft_cross_entropy(logits, p), expected, atol=1e-6)


def test_labels_and_probabilities() -> None:
    binary = torch.tensor([[[[-1.0, 2.0]]]])
    assert labels_from_logits(binary).tolist() == [[[0, 1]]]
    assert torch.allclose(probabilities(binary), torch.sigmoid(binary))
    multi = torch.tensor([[[[0.0]], [[3.0]], [[1.0]]]])
    assert labels_from_logits(multi).tolist() == [[[1]]]
    assert supervised_loss(multi, torch.tensor([[[1]]])) < supervised_loss(
        multi, torch.tensor([[[0]]])
    )
