"""``--sync-bn``: BatchNorm whose batch statistics are those of the global batch, not of each
rank's slice of it.

On CUDA this is PyTorch's own ``torch.nn.SyncBatchNorm``. PyTorch's refuses CPU tensors
(it needs the CUDA-only ``batch_norm_stats`` kernels), so a CPU (gloo) job uses
``CPUSyncBatchNorm`` below: the same mathematics in a few lines, the statistics summed over
ranks with the differentiable ``torch.distributed.nn.functional.all_reduce``:

    S = Σ_ranks Σ x,   Q = Σ_ranks Σ x²,   n = Σ_ranks count
    mean = S / n,   var = Q / n - mean²   (biased, for normalising)
    y = (x - mean) / sqrt(var + eps) * weight + bias

and the running statistics move towards (mean, var · n / (n - 1)), as in ``nn.BatchNorm2d``.
The backward pass of the all-reduce sums each rank's gradient of the statistics, so after
DDP averages the parameter gradients every rank holds the gradient of the global batch's loss.
"""

from __future__ import annotations

import torch
import torch.distributed as td
from torch import nn
from torch.distributed.nn.functional import all_reduce


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of a CPU data-parallel job. x: (N, C, ...) -> same."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        synced = self.training and td.is_available() and td.is_initialized() and td.get_world_size() > 1
        if not synced:
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_tensor([x.numel() / c])])
        total = all_reduce(local)  # Σ over ranks, differentiable
        n = total[-1]
        mean = total[:c] / n
        var = total[c : 2 * c] / n - mean * mean
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1), m)
        return y.to(x.dtype)


def convert(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm of ``module`` made synchronised (its parameters and buffers kept)."""
    if device_type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        new = CPUSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert(child, device_type))
    return module
