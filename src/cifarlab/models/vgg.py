"""VGG13 and VGG13-BN (Simonyan & Zisserman, 2014), the network the seed fine-tuned from ImageNet.

Written here, not imported from torchvision: the module names are torchvision's, so that its
official ImageNet files load with ``strict=True``. The state-dict keys are ``features.N.*``
(convolutions, and BatchNorms for ``_bn``, counted with the ReLUs and max-pools between them),
then ``classifier.0/3/6.*`` (three Linear layers with ReLU and Dropout between them).

    features    5 stages of 3x3 convolutions, widths 64, 128, 256, 512, 512 (two each),
                each stage closed by a 2x2 max-pool: (N, 3, H, W) -> (N, 512, H/32, W/32)
    avgpool     adaptive average pool to 7x7 (a 32x32 image gives 1x1, copied 49 times,
                as in torchvision's model the seed used)
    classifier  25088 -> 4096 -> 4096 -> num_classes

The weights come from ``--weights PATH``, or are downloaded once from torchvision's URL into
``~/.cache/cifarlab/``. Their file name carries the first 8 hex digits of the file's sha256
(torchvision's convention), checked before the file is read, and then read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from cifarlab.errors import WeightsError
from cifarlab.registry import register_model

STAGES = [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]  # torchvision's "B"
URLS = {
    "vgg13": "https://download.pytorch.org/models/vgg13-19584684.pth",
    "vgg13_bn": "https://download.pytorch.org/models/vgg13_bn-abd245e5.pth",
}


def make_features(batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in STAGES:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(cin, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        cin = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG with torchvision's module names. x: (N, 3, H, W), H, W >= 32 -> logits (N, num_classes)."""

    def __init__(self, batch_norm: bool = False, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = make_features(batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- weights


def cache_dir() -> Path:
    return Path(os.environ.get("CIFARLAB_CACHE") or Path.home() / ".cache" / "cifarlab")


def hash_prefix(path: Path) -> str | None:
    """The sha256 prefix a torchvision-style file name carries (``vgg13-19584684.pth``)."""
    m = re.search(r"-([a-f0-9]{8,64})\.[a-z]+$", path.name)
    return m[1] if m else None


def check_hash(path: Path) -> None:
    """Refuse a file whose sha256 does not start with the prefix in its name."""
    import hashlib

    prefix = hash_prefix(path)
    if prefix is None:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    if not h.hexdigest().startswith(prefix):
        raise WeightsError(
            f"{path}: sha256 {h.hexdigest()[:16]}... does not start with {prefix} (from its name): the file is "
            "corrupted or not the official one; delete it and download it again"
        )


def fetch(name: str, progress: bool = True) -> Path:
    """The official ImageNet file of ``name``, downloaded once into the cache (hash checked)."""
    from cifarlab.data.downloads import DownloadFailed, stream

    url = URLS[name]
    dest = cache_dir() / url.rsplit("/", 1)[1]
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        digest = stream(url, part, "sha256", progress, desc=f"downloading {dest.name}")
    except DownloadFailed as e:
        raise WeightsError(
            f"could not download the ImageNet weights of {name} from {url} ({e}); without network, fetch that "
            f"file by hand and put it at {dest}, or pass --weights PATH"
        ) from None
    if not digest.startswith(hash_prefix(dest) or ""):
        part.unlink(missing_ok=True)
        raise WeightsError(
            f"{url}: sha256 {digest[:16]}... does not match the name's prefix; download refused"
        )
    part.replace(dest)
    return dest


def load_imagenet(model: VGG, path: Path) -> None:
    """Load an ImageNet state dict (1000 classes) strictly into ``model``."""
    if not path.is_file():
        raise WeightsError(f"--weights {path}: no such file")
    check_hash(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:  # unpickling refused, truncated or empty file, wrong shapes: one line
        why = " ".join(str(e).split())[:300] or type(e).__name__
        raise WeightsError(f"{path}: not torchvision's VGG13 ImageNet weights ({why})") from None


def _vgg13(
    name: str, batch_norm: bool, pretrained: bool, num_classes: int, weights: str | None, dropout: float
) -> VGG:
    model = VGG(batch_norm, 1000 if pretrained else num_classes, dropout)
    if pretrained:
        load_imagenet(model, Path(weights) if weights else fetch(name))
        if num_classes != 1000:  # the seed's change: a new last layer for CIFAR-10's classes
            model.classifier[6] = nn.Linear(4096, num_classes)
    return model


@register_model("vgg13", has_pretrained=True)
def vgg13(
    pretrained: bool = False, num_classes: int = 10, weights: str | None = None, dropout: float = 0.5
) -> VGG:
    """VGG13; ``pretrained``: torchvision's ImageNet weights (``weights``: a local copy), with a
    new last layer of ``num_classes`` outputs."""
    return _vgg13("vgg13", False, pretrained, num_classes, weights, dropout)


@register_model("vgg13_bn", has_pretrained=True)
def vgg13_bn(
    pretrained: bool = False, num_classes: int = 10, weights: str | None = None, dropout: float = 0.5
) -> VGG:
    """VGG13 with BatchNorm after every convolution (torchvision's ``vgg13_bn``)."""
    return _vgg13("vgg13_bn", True, pretrained, num_classes, weights, dropout)
