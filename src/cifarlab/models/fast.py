"""The ``fast`` network: a small VGG-like net for reaching 94 % on CIFAR-10 in as little arithmetic
as possible (the recipe family of D. Page's ResNet-9, tysam-code's hlb-CIFAR10 and K. Jordan's
airbench; paper: "94% on CIFAR-10 in 3.29 Seconds on a Single GPU", 2024). Written here for
cifarlab's trainer; the recipe's hyperparameters are ``cifarlab.training.recipes.FAST``.

    input (N, 3, 32, 32), normalised per channel
    whiten    conv 2×2, 3 -> 2·12, frozen: the 12 eigenvectors of the 2×2×3 patch covariance,
              each scaled by 1/sqrt(eigenvalue + ε), and their negatives; then GELU    -> 31×31
    block 1   conv3×3 -> maxpool 2 -> BN -> GELU -> conv3×3 -> BN -> GELU    (64)  -> 15×15
    block 2   the same                                                      (256) -> 7×7
    block 3   the same                                                      (256) -> 3×3
    head      global max pool -> linear (256 -> classes, no bias) -> × 1/9

Whitening (decorrelating the inputs' 2×2 patches) makes the first layer's job done before
training starts; a patch x gives features W x with Cov(W x) = I. The convolutions start as
partial identities (the first ``cin`` output channels are Dirac kernels), the BatchNorm scales are
frozen at 1 and only their biases learn (at a 64× learning rate, ``lr_scales``), and evaluation
averages the logits of several views of each image (test-time augmentation, ``tta``): the
image and its mirror, and with ``tta=2`` also both shifted by one pixel up-left and down-right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.registry import register_model

__all__ = ["FastNet"]

WHITEN_PATCH = 2
WHITEN_EPS = 5e-4
BIAS_LR_SCALE = 64.0  # BatchNorm biases learn this much faster than the weights


def batchnorm(channels: int, momentum: float) -> nn.BatchNorm2d:
    """BatchNorm whose scale is frozen at 1 (only the bias learns)."""
    bn = nn.BatchNorm2d(channels, momentum=momentum, eps=1e-12)
    bn.weight.requires_grad_(False)
    return bn


class ConvGroup(nn.Module):
    """conv3×3 -> maxpool 2 -> BN -> GELU -> conv3×3 -> BN -> GELU; (N, cin, H, W) -> (N, cout, H/2, W/2)."""

    def __init__(self, cin: int, cout: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding="same", bias=False)
        self.norm1 = batchnorm(cout, bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding="same", bias=False)
        self.norm2 = batchnorm(cout, bn_momentum)
        for conv in (self.conv1, self.conv2):  # a partial identity: the first cin outputs pass the input on
            nn.init.dirac_(conv.weight.data[: conv.in_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class FastNet(nn.Module):
    """Input (N, 3, 32, 32) normalised per channel -> logits (N, classes); in eval mode the logits
    are averaged over ``tta`` levels of views (0: the image, 1: + its mirror, 2: + both shifted).

    Args:
        num_classes: outputs.
        widths: channels of the three conv groups.
        tta: test-time augmentation level (0, 1 or 2).
        bn_momentum: torch's BatchNorm momentum (weight of the newest batch in the running stats).
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int] | list[int] = (64, 256, 256),
        tta: int = 2,
        bn_momentum: float = 0.4,
    ) -> None:
        super().__init__()
        if tta not in (0, 1, 2):
            raise ValueError(f"tta must be 0, 1 or 2, got {tta}")
        self.tta = tta
        n_whiten = 2 * 3 * WHITEN_PATCH**2
        self.whiten = nn.Conv2d(3, n_whiten, WHITEN_PATCH, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data by init_from_data
        chans = [n_whiten, *widths]
        self.groups = nn.Sequential(*(ConvGroup(a, b, bn_momentum) for a, b in zip(chans, chans[1:])))
        self.head = nn.Linear(chans[-1], num_classes, bias=False)
        self.scale = 1 / 9

    @property
    def lr_scales(self) -> dict[str, float]:
        """Per-parameter learning-rate multipliers, read by the trainer's optimizer."""
        return {
            name: BIAS_LR_SCALE
            for name, _ in self.named_parameters()
            if ".norm" in name and name.endswith("bias")
        }

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Set the frozen whitening filters from training images ``x`` (N, 3, 32, 32), preprocessed:
        the covariance of their 2×2 patches is Σ = V diag(λ) Vᵀ, and the filters are the rows of
        diag(1/sqrt(λ + ε)) Vᵀ and their negatives (so GELU keeps both signs)."""
        k = WHITEN_PATCH
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1)  # (N, 3, 31, 31, k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k).double()
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        filters = (eigvecs.T / torch.sqrt(eigvals + WHITEN_EPS)[:, None]).flip(0)  # largest first
        filters = filters.reshape(-1, 3, k, k).to(self.whiten.weight)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self.groups(F.gelu(self.whiten(x)))
        return self.head(F.adaptive_max_pool2d(h, 1).flatten(1)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.tta == 0:
            return self.logits(x)
        mirrored = (self.logits(x) + self.logits(x.flip(-1))) / 2
        if self.tta == 1:
            return mirrored
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :-2, :-2], padded[..., 2:, 2:]]  # the 32x32 window moved up-left / down-right
        shifted_logits = sum(self.logits(s) + self.logits(s.flip(-1)) for s in shifted) / 4
        return (mirrored + shifted_logits) / 2


@register_model("fast")
def fast(
    num_classes: int = 10, widths: tuple[int, int, int] | list[int] = (64, 256, 256), tta: int = 2
) -> FastNet:
    """Small VGG-like net with frozen patch whitening and test-time augmentation (cifarlab train fast)."""
    return FastNet(num_classes, tuple(widths), tta)
