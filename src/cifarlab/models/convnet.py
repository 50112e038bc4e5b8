"""Pre-activation residual ConvNet for 32x32 CIFAR-10 images.

Layer table (every module name below is an attribute of :class:`ConvNet`)::

    name                  kernel stride pad  channels   spatial out
    conv0                 3x3    1      1    3/64       32
    preact1               3x3    1      1    64/64      32
    conv1                 1x1    1      0    64/128     32
    maxpool1              3x3    2      1    128/128    16
    preact2_a, preact2_b  3x3    1      1    128/128    16
    conv2                 1x1    1      0    128/256    16
    maxpool2              3x3    2      1    256/256    8
    preact3_a, preact3_b  3x3    1      1    256/256    8
    conv3                 1x1    1      0    256/512    8
    maxpool3              3x3    2      1    512/512    4
    preact4_a, preact4_b  3x3    1      1    512/512    4
    maxpool4              3x3    2      1    512/512    2
    preact5_a, preact5_b  3x3    1      1    512/512    2
    maxpool5              3x3    2      1    512/512    1
    bn, relu, flatten, linear                512/10

A pre-activation block computes ``x + Conv3x3(ReLU(BN(x)))`` with its own identity skip.
All layers use PyTorch's default initialisation (convolutions keep their bias).

For speed on CPU, convert both model and inputs to ``torch.channels_last``::

    model = model.to(memory_format=torch.channels_last)
    logits = model(x.contiguous(memory_format=torch.channels_last))
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from cifarlab.registry import register_model

__all__ = ["ConvNet", "PreActBlock", "convnet"]


class PreActBlock(nn.Module):
    """``x + conv(relu(bn(x)))``: a 3x3, stride 1, padding 1 conv keeping ``channels``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        # In place on the BN output (a fresh tensor), never on the block input x.
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.relu(self.bn(x)))


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


class ConvNet(nn.Sequential):
    """The pre-activation ConvNet of the module docstring; returns logits ``(N, num_classes)``.

    It is an ``nn.Sequential`` whose children are named after the layer table, so
    ``model.conv0``, ``model.preact2_b``, ``model.maxpool5``, ``model.bn``, ``model.linear``
    etc. are the table's rows, in order.
    """

    def __init__(self, n_channels: int = 3, num_classes: int = 10) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(n_channels, 64, kernel_size=3, stride=1, padding=1),
            preact1=PreActBlock(64),
            conv1=nn.Conv2d(64, 128, kernel_size=1, stride=1, padding=0),
            maxpool1=_pool(),
            preact2_a=PreActBlock(128),
            preact2_b=PreActBlock(128),
            conv2=nn.Conv2d(128, 256, kernel_size=1, stride=1, padding=0),
            maxpool2=_pool(),
            preact3_a=PreActBlock(256),
            preact3_b=PreActBlock(256),
            conv3=nn.Conv2d(256, 512, kernel_size=1, stride=1, padding=0),
            maxpool3=_pool(),
            preact4_a=PreActBlock(512),
            preact4_b=PreActBlock(512),
            maxpool4=_pool(),
            preact5_a=PreActBlock(512),
            preact5_b=PreActBlock(512),
            maxpool5=_pool(),
            bn=nn.BatchNorm2d(512),
            relu=nn.ReLU(inplace=True),
            flatten=nn.Flatten(1),
            linear=nn.Linear(512, num_classes),
        )
        super().__init__(layers)
        self.n_channels = n_channels
        self.num_classes = num_classes


@register_model("convnet")
def convnet(num_classes: int = 10, n_channels: int = 3) -> ConvNet:
    """Pre-activation residual ConvNet for 32x32 images (13 convs, 5 max-pools)."""
    return ConvNet(n_channels=n_channels, num_classes=num_classes)
