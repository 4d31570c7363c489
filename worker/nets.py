"""The 2D U-Net of Shirokikh et al. (2020) with the early-features segmentor of Sheikh & Schultz.

Layout (paper §2.1, Fig. 1)::

    x ─ init path (conv3x3 1→M, ReLU, 3 pre-activation residual blocks at M) ─┬─ early head ─ p~
                                                                              └─ body ─ p
    body: 3 levels down (BN, strided 2x2 conv doubling channels, ReLU, 3 residual blocks),
          a symmetric up path with transposed convs, and skips that are 1x1 convs added (summed)
          to the up path; a final 1x1 conv gives 1 logit (binary) or C logits (softmax).

The split into ``init_path`` / ``body`` / ``early_head`` is the contract of refinement: only
``init_path`` parameters are ever optimised on a target scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sitefit import defaults


@dataclass(frozen=True)
class NetConfig:
    """Hyper-parameters that fix the architecture (stored in every model's spec)."""

    num_outputs: int  # 1 for a binary task (sigmoid), C >= 2 for softmax over C classes
    base_channels: int = defaults.BASE_CHANNELS
    levels: int = defaults.LEVELS
    res_blocks: int = defaults.INIT_RES_BLOCKS
    in_channels: int = 1

    def __post_init__(self) -> None:
        if self.num_outputs < 1:
            raise ValueError("num_outputs must be >= 1")
        if self.base_channels < 1 or self.levels < 1 or self.res_blocks < 1:
            raise ValueError("base_channels, levels and res_blocks must be positive")


class PreActResBlock(nn.Module):
    """BN-ReLU-conv3x3, twice, plus the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        return x + y


def _res_stack(channels: int, count: int) -> nn.Sequential:
    return nn.Sequential(*(PreActResBlock(channels) for _ in range(count)))


class InitPath(nn.Module):
    """Full-resolution feature extractor: the layers that refinement adapts."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        m = config.base_channels
        self.conv = nn.Conv2d(config.in_channels, m, 3, padding=1)
        self.blocks = _res_stack(m, config.res_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(F.relu(self.conv(x)))


class DownLevel(nn.Module):
    """BN, strided 2x2 conv doubling the channels, ReLU, residual blocks."""

    def __init__(self, channels: int, res_blocks: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.down = nn.Conv2d(channels, 2 * channels, 2, stride=2)
        self.blocks = _res_stack(2 * channels, res_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(F.relu(self.down(self.bn(x))))


class UpLevel(nn.Module):
    """Residual blocks, BN, transposed 2x2 conv halving the channels, ReLU; skip summed after."""

    def __init__(self, channels: int, res_blocks: int) -> None:
        super().__init__()
        self.blocks = _res_stack(2 * channels, res_blocks)
        self.bn = nn.BatchNorm2d(2 * channels)
        self.up = nn.ConvTranspose2d(2 * channels, channels, 2, stride=2)
        self.skip = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return F.relu(self.up(self.bn(self.blocks(x)))) + self.skip(skip)


class Body(nn.Module):
    """Everything of the U-Net after the init path; input: init-path features."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        channels = [config.base_channels * 2**i for i in range(config.levels)]
        self.down = nn.ModuleList(DownLevel(c, config.res_blocks) for c in channels)
        self.up = nn.ModuleList(UpLevel(c, config.res_blocks) for c in reversed(channels))
        self.out_bn = nn.BatchNorm2d(config.base_channels)
        self.out_blocks = _res_stack(config.base_channels, 1)
        self.out_conv = nn.Conv2d(config.base_channels, config.num_outputs, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        skips = []
        x = features
        for level in self.down:
            skips.append(x)
            x = level(x)
        for level, skip in zip(self.up, reversed(skips), strict=True):
            x = level(x, skip)
        return self.out_conv(F.relu(self.out_bn(self.out_blocks(x))))


class EarlyHead(nn.Module):
    """Early-features segmentor: 3x3 convs M → 12 → 8 → C with ReLU between (paper §2.2)."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        hidden1, hidden2 = defaults.EARLY_HEAD_CHANNELS
        self.layers = nn.Sequential(
            nn.Conv2d(config.base_channels, hidden1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden1, hidden2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden2, config.num_outputs, 3, padding=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class SegmentationNet(nn.Module):
    """U-Net (``init_path`` + ``body``) with the ``early_head`` attached to the init path."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        self.init_path = InitPath(config)
        self.body = Body(config)
        self.early_head = EarlyHead(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(final_logits, early_logits)`` for a batch of slices ``(N, 1, H, W)``."""
        features = self.init_path(x)
        return self.body(features), self.early_head(features)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid of a single logit channel, softmax over several."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def labels_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Hard labels ``(N, H, W)`` (uint8): logit > 0 for binary, argmax otherwise."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).to(torch.uint8)
    return logits.argmax(dim=1).to(torch.uint8)


def soft_cross_entropy(student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``-mean_n sum_c p_c log p~_c`` with soft teacher probabilities ``p``.

    For one logit channel the two classes are (p, 1-p); ``teacher`` has the student's shape.
    """
    if student_logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(student_logits, teacher)
    return -(teacher * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 1: cross-entropy against integer labels ``(N, H, W)``."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], labels.to(logits.dtype))
    return F.cross_entropy(logits, labels.long())
