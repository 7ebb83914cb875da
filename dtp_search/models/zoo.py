"""The built-in networks. Input channels, image size and class count come from the dataset.

* ``mlp`` — fully connected, configurable ``hidden`` sizes (``lenet300`` = [300, 100]).
* ``lenet5`` — LeCun et al. 1998 as commonly used on MNIST: conv 6@5×5 (padding 2),
  pool, conv 16@5×5, pool, fc 120 → 84.
* ``simple_cnn`` — the classic small CIFAR net: conv 6@5×5, pool, conv 16@5×5, pool,
  fc 120 → 84 (no padding).
* ``vgg`` — a small VGG-style net with batch norm: ``widths`` with ``"M"`` for max pooling,
  then global average pooling and one linear classifier.
* ``resnet20`` — He et al. 2016's CIFAR ResNet (3 stages × 3 basic blocks, 16/32/64
  channels, option-A identity shortcuts with zero-padded channels).

:func:`~dtp_search.models.build.build_model` picks one by ``model.arch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dtp_search.pruning.layers import ChannelPadShortcut

MODELS = ("mlp", "lenet5", "simple_cnn", "vgg", "resnet20")  # the built-in networks


class MLP(nn.Module):
    def __init__(
        self, in_features: int, num_classes: int, hidden: Sequence[int] = (300, 100)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, int(h)), nn.ReLU(inplace=True)]
            prev = int(h)
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _flat_size(features: nn.Module, in_shape: tuple[int, int, int], model: str) -> int:
    with torch.no_grad():
        try:
            out = features(torch.zeros(1, *in_shape))
        except RuntimeError as exc:
            raise ValueError(
                f"model={model} cannot take {in_shape[1]}×{in_shape[2]} inputs "
                f"({exc}); raise model.padding or pick model=mlp/resnet20/vgg"
            ) from exc
    return out.numel()


class LeNetStyle(nn.Module):
    """conv(c1, k) → ReLU → maxpool 2 → conv(c2, k) → ReLU → maxpool 2 → fc → fc → classifier."""

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        *,
        conv: Sequence[int] = (6, 16),
        fc: Sequence[int] = (120, 84),
        kernel_size: int = 5,
        padding: Sequence[int] = (0, 0),
        name: str = "simple_cnn",
    ) -> None:
        super().__init__()
        c1, c2 = (int(c) for c in conv)
        p1, p2 = (int(p) for p in padding)
        self.features = nn.Sequential(
            nn.Conv2d(in_shape[0], c1, kernel_size, padding=p1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size, padding=p2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        prev = _flat_size(self.features, in_shape, name)
        layers: list[nn.Module] = []
        for h in fc:
            layers += [nn.Linear(prev, int(h)), nn.ReLU(inplace=True)]
            prev = int(h)
        layers.append(nn.Linear(prev, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class VGG(nn.Module):
    """Conv3×3-BN-ReLU blocks (``"M"`` = 2×2 max pool), global average pool, linear classifier."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int | str] = (32, 32, "M", 64, 64, "M", 128, 128, "M"),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(prev, int(w), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(w)),
                    nn.ReLU(inplace=True),
                ]
                prev = int(w)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity shortcut (option A: stride-2 subsample + zero
    channels, :class:`ChannelPadShortcut`)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        pad = planes - in_planes
        self.shortcut: nn.Module = (
            nn.Identity()
            if stride == 1 and pad == 0
            else ChannelPadShortcut(stride, pad // 2, pad - pad // 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for CIFAR (He et al. 2016, §4.2); n=3 gives ResNet-20 (0.27 M parameters)."""

    def __init__(
        self, in_channels: int, num_classes: int, n: int = 3, widths: Sequence[int] = (16, 32, 64)
    ) -> None:
        super().__init__()
        w0 = int(widths[0])
        self.conv1 = nn.Conv2d(in_channels, w0, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        stages, prev = [], w0
        for i, w in enumerate(widths):
            blocks = [BasicBlock(prev, int(w), stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(int(w), int(w)) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = int(w)
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
