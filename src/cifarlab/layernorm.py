"""Layer normalisation three ways: autograd, a hand-written ``autograd.Function``, and a module.

For an input ``X`` of shape ``(..., M)`` every row (the last dimension) is normalised on its own:

    μ   = mean(X, -1)                      shape (..., 1)
    σ²  = mean((X − μ)², -1)               biased variance, shape (..., 1)
    σ̂   = sqrt(σ² + ε)                     ε = 1e-5 by default
    X̂   = (X − μ) / σ̂                      shape (..., M)
    Y   = γ ∘ X̂ + β                        γ, β of shape (M,), broadcast over the leading dims

* :class:`LayerNormAutograd` writes the forward pass with differentiable tensor ops and lets
  autograd derive the backward pass.
* :class:`LayerNormFunction` is a ``torch.autograd.Function`` whose backward pass is written by
  hand, including the closed form of dL/dX (derived in ``docs/derivations.md``, section
  "LayerNorm"):

      dX̂ = dY ∘ γ
      dX  = (1/σ̂) · (dX̂ − mean(dX̂, -1) − X̂ · mean(dX̂ ∘ X̂, -1))
      dγ  = Σ_batch dY ∘ X̂          dβ = Σ_batch dY        (sums over all leading dims)

* :class:`LayerNormManual` is the module (parameters ``weight`` = γ and ``bias`` = β) that calls
  :class:`LayerNormFunction`.

All three accept any number of leading dimensions (a 1-D input is one row), float32 and float64,
and match ``torch.nn.LayerNorm`` (checked to 1e-10 in float64 by ``tests/test_layernorm.py``).
Neither the Function nor the modules call PyTorch's layer-norm kernels.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["LayerNormAutograd", "LayerNormFunction", "LayerNormManual"]


def _check_last_dim(x: torch.Tensor, n_neurons: int) -> None:
    """Raise ``ValueError`` unless ``x`` is at least 1-D with last dimension ``n_neurons``."""
    if x.dim() == 0:
        raise ValueError(f"LayerNorm expected an input of shape (..., {n_neurons}) but got a 0-d tensor")
    if x.shape[-1] != n_neurons:
        raise ValueError(
            f"LayerNorm expected the input's last dimension to be n_neurons={n_neurons} "
            f"but got {x.shape[-1]} (input shape {tuple(x.shape)})"
        )


class LayerNormFunction(torch.autograd.Function):
    """Layer norm over the last dimension with a hand-written backward pass.

    Call as ``LayerNormFunction.apply(x, gamma, beta, eps=1e-5)`` with ``x`` of shape
    ``(..., M)`` and ``gamma``, ``beta`` of shape ``(M,)`` (same dtype and device as ``x``).
    Returns ``Y = gamma ∘ X̂ + beta`` of the shape of ``x``.

    Forward (a few eager ops, no layer-norm kernel):
        μ = mean(x, -1); X̂ ← x − μ (one fresh tensor); σ̂² = ‖X̂‖²/M + ε per row (a vector
        norm, which is vectorised, unlike ``torch.var_mean`` on CPU); X̂ ← X̂ · rstd in place;
        Y = addcmul(β, X̂, γ).

    Saved for backward (``ctx.save_for_backward``), and only these:
        * ``xhat``  — X̂, shape ``(..., M)``: appears in dγ = Σ dY∘X̂ and in the X̂-term of dX.
        * ``rstd``  — 1/σ̂, shape ``(..., 1)``: the overall factor of dX.
        * ``gamma`` — γ, shape ``(M,)``: dX̂ = dY ∘ γ.
        ``x``, μ and σ² are *not* saved: dX, dγ and dβ depend on the input only through X̂ and
        1/σ̂, so keeping ``x`` (another ``(..., M)`` tensor) or μ would be wasted memory. β is
        not needed at all (dY/dβ is the identity). The saved memory is one ``(..., M)`` tensor
        plus ``(...,)`` + ``M`` numbers.

    Backward, with N = number of rows and the rows flattened to an ``(N, M)`` matrix:
        * dβ = 1ᵀ dY and dγ = 1ᵀ (dY ∘ X̂) — column sums written as matrix products;
        * dX = rstd · (dX̂ − mean(dX̂) − X̂ · mean(dX̂ ∘ X̂)) with the two row means obtained
          without forming dX̂: Σ_j dX̂ = dY γ and Σ_j dX̂∘X̂ = (dY∘X̂) γ (matrix–vector
          products); dX is then written over the dY∘X̂ buffer in three passes
          (``addcmul(−mean(dX̂), dY, γ, out=buf)``, ``buf.addcmul_(X̂, −mean(dX̂∘X̂))``,
          ``buf.mul_(rstd)``), so the backward pass allocates one ``(N, M)`` tensor.
        Work is skipped for every input whose ``ctx.needs_input_grad`` entry is False: no row
        statistics unless dX is needed, no column sums unless dγ/dβ are needed, and its
        gradient is returned as ``None``. ``eps`` never gets a gradient.

    The backward pass is itself written with no-grad tensor ops, so this Function is
    **once-differentiable**: ``backward`` is decorated with
    ``torch.autograd.function.once_differentiable``, and asking for a second derivative
    (e.g. ``torch.autograd.grad(..., create_graph=True)`` then differentiating again) raises a
    ``RuntimeError``. Double backward is not implemented.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        eps: float = 1e-5,
    ) -> torch.Tensor:
        if x.dim() == 0:
            raise ValueError("LayerNormFunction expected an input of shape (..., M), got 0-d")
        m = x.shape[-1]
        for name, p in (("gamma", gamma), ("beta", beta)):
            if p.shape != (m,):
                raise ValueError(
                    f"LayerNormFunction expected {name} of shape ({m},) to match the input's "
                    f"last dimension but got {tuple(p.shape)}"
                )
            if p.dtype != x.dtype:
                raise TypeError(
                    f"LayerNormFunction expected {name} of dtype {x.dtype} (the input's) but got {p.dtype}"
                )
        mean = x.mean(-1, keepdim=True)
        xhat = torch.sub(x, mean)  # x − μ, the one fresh (..., M) buffer kept for backward
        # σ² + ε = ‖x − μ‖² / M + ε (two-pass, so no cancellation for rows with a large mean)
        rstd = torch.linalg.vector_norm(xhat, dim=-1, keepdim=True)
        rstd = rstd.square_().mul_(1.0 / m).add_(eps).rsqrt_()
        xhat.mul_(rstd)
        y = torch.addcmul(beta, xhat, gamma)
        ctx.save_for_backward(xhat, rstd, gamma)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        xhat, rstd, gamma = ctx.saved_tensors
        need_x, need_gamma, need_beta = ctx.needs_input_grad[:3]
        grad_x = grad_gamma = grad_beta = None
        if not (need_x or need_gamma or need_beta):
            return None, None, None, None

        m = xhat.shape[-1]
        dy = grad_y.reshape(-1, m)  # (N, M): all leading dims are "batch"
        xh = xhat.reshape(-1, m)
        n = dy.shape[0]

        if need_beta or need_gamma:
            ones = torch.ones(1, n, dtype=dy.dtype, device=dy.device)
        if need_beta:  # dβ = Σ_batch dY  (column sums as a (1, N) @ (N, M) product)
            grad_beta = torch.mm(ones, dy).view(m)
        if not (need_x or need_gamma):
            return None, None, grad_beta, None

        buf = torch.mul(dy, xh)  # dY ∘ X̂, the only fresh (N, M) tensor of the backward pass
        if need_gamma:  # dγ = Σ_batch dY ∘ X̂
            grad_gamma = torch.mm(ones, buf).view(m)
        if need_x:
            # Minus the row means of dX̂ = dY∘γ and of dX̂∘X̂ = (dY∘X̂)∘γ, as (N, M) @ (M, 1)
            # products with −γ/M (so dX̂ itself is never materialised on its own).
            neg_gamma_m = torch.mul(gamma.view(m, 1), -1.0 / m)  # (M, 1)
            neg_mean_dxhat = torch.mm(dy, neg_gamma_m)  # (N, 1)
            neg_mean_dxhat_xhat = torch.mm(buf, neg_gamma_m)  # (N, 1)
            # dX = rstd · (dX̂ − mean(dX̂) − X̂ · mean(dX̂∘X̂)), three passes over buf:
            torch.addcmul(neg_mean_dxhat, dy, gamma, out=buf)  # dX̂ − mean(dX̂)
            buf.addcmul_(xh, neg_mean_dxhat_xhat)  #   − X̂ · mean(dX̂∘X̂)
            buf.mul_(rstd.reshape(-1, 1))  # · 1/σ̂
            grad_x = buf.view(xhat.shape)
        return grad_x, grad_gamma, grad_beta, None


class _LayerNormModule(nn.Module):
    """Parameters ``weight`` (γ, initialised to ones) and ``bias`` (β, zeros), both of shape
    ``(n_neurons,)``, shared by the two modules below; input ``(..., n_neurons)``, output of the
    same shape; ``ValueError`` when the input's last dimension is not ``n_neurons``."""

    def __init__(self, n_neurons: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.n_neurons = int(n_neurons)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(self.n_neurons))
        self.bias = nn.Parameter(torch.zeros(self.n_neurons))

    def extra_repr(self) -> str:
        return f"n_neurons={self.n_neurons}, eps={self.eps}"


class LayerNormAutograd(_LayerNormModule):
    """Layer norm over the last dimension, written with differentiable ops (autograd backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim(x, self.n_neurons)
        mean = x.mean(dim=-1, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=-1, keepdim=True)  # biased variance
        xhat = centred / torch.sqrt(var + self.eps)
        return self.weight * xhat + self.bias


class LayerNormManual(_LayerNormModule):
    """Layer norm over the last dimension via :class:`LayerNormFunction` (hand-written backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim(x, self.n_neurons)
        return LayerNormFunction.apply(x, self.weight, self.bias, self.eps)
