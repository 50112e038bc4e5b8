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
and bfloat16/float16 under torch's rule for norm layers (statistics in float32, γ and β may be
float32, the output in the input's dtype; autocast does not reach inside),
and match ``torch.nn.LayerNorm`` (checked to 1e-10 in float64 by ``tests/test_layernorm.py``).
Neither the Function nor the modules call PyTorch's layer-norm kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from cifarlab.ops import kernels

__all__ = [
    "BACKENDS",
    "LayerNormAutograd",
    "LayerNormFunction",
    "LayerNormManual",
    "active_backend",
    "set_backend",
    "use_backend",
]

# -- backends of LayerNormFunction ------------------------------------------------------------
# "eager": the formulas as a few PyTorch tensor ops (below, in LayerNormFunction).
# "kernel": the same formulas fused per row in C (src/cifarlab/ops/kernels/layernorm.c), compiled on
#   first use; each row is then read from memory ~2 times per pass instead of ~8 (forward) and
#   ~14 (backward) for the eager ops. CPU float32/float64 tensors only; anything else (another
#   device, float16, bfloat16, an empty input) runs eager. Every tensor is checked before its
#   pointer reaches C, and held until C returns: see _call_kernel.
# "auto" (default): the kernel when it can be built, else eager.
BACKENDS = ("auto", "kernel", "eager")
_backend = os.environ.get("CIFARLAB_LAYERNORM", "auto")
_NO_KERNEL = "the LayerNorm C kernel could not be built (is a C compiler installed?)"


def set_backend(name: str) -> None:
    """Choose how :class:`LayerNormFunction` computes: ``'auto'``, ``'kernel'`` or ``'eager'``.

    ``'kernel'`` raises ``RuntimeError`` if the C kernel cannot be built. The environment
    variable ``CIFARLAB_LAYERNORM`` sets the initial choice.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown LayerNorm backend {name!r}; expected one of {BACKENDS}")
    if name == "kernel" and _load_kernel() is None:
        raise RuntimeError(_NO_KERNEL)
    _backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend('eager'): ...`` — :func:`set_backend` for the block, then restored."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def active_backend() -> str:
    """``'kernel'`` or ``'eager'``: what CPU float tensors go through now."""
    return "kernel" if _backend != "eager" and _load_kernel() is not None else "eager"


def _load_kernel() -> ctypes.CDLL | None:
    lib = kernels.load("layernorm")
    if lib is not None and not hasattr(lib, "_cifarlab_typed"):
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        for suffix in ("f32", "f64"):
            fwd = getattr(lib, f"cl_layernorm_forward_{suffix}")
            fwd.argtypes, fwd.restype = [ptr] * 6 + [i64, i64, ctypes.c_double], ctypes.c_int
            bwd = getattr(lib, f"cl_layernorm_backward_{suffix}")
            bwd.argtypes, bwd.restype = [ptr] * 7 + [i64, i64], ctypes.c_int
        lib._cifarlab_typed = True
    return lib


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
# torch's rule for norm layers in mixed precision, which all three implementations follow: a
# bfloat16/float16 input is normalised with float32 statistics (its mean and variance would lose
# digits in 8 or 11 bits of mantissa), γ and β may stay float32 (the master weights), and the
# output comes back in the input's dtype. Autocast is switched off inside, so no product of
# the backward pass is silently lowered to bf16 either.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for ``device``'s type (what ``torch.amp.custom_fwd(cast_inputs=...)`` does
    for one device type; these layers serve every device)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return _NO_CONTEXT  # autocast is off already (the usual case, and always in backward): no cost


_NO_CONTEXT = contextlib.nullcontext()


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (itself when it already is: no dispatcher call on the fp32 path)."""
    return t if t.dtype == dtype else t.to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer norm of ``x`` computes in: float32 for bf16/fp16, else x's own."""
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


_KERNEL_STATUS = {1: "could not allocate its scratch memory", 2: "rejected its arguments"}


class _DtypeMismatchError(ValueError, TypeError):
    """γ or β of another dtype than x: a ValueError like every other argument check, and a
    TypeError as it always was (so ``except TypeError`` keeps working)."""


def _check_arguments(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """Raise ``ValueError`` unless x is a dense tensor of shape (..., M) and γ, β are dense 1-D
    tensors of shape (M,) with x's dtype and device (checked on both backends)."""
    for name, t in (("x", x), ("gamma", gamma), ("beta", beta)):
        if t.layout != torch.strided:
            raise ValueError(f"LayerNormFunction expected a dense (strided) {name} but got layout {t.layout}")
    if x.dim() == 0:
        raise ValueError("LayerNormFunction expected an input of shape (..., M), got 0-d")
    m = x.shape[-1]
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p.shape != (m,):
            raise ValueError(
                f"LayerNormFunction expected {name} of shape ({m},) to match the input's "
                f"last dimension but got {tuple(p.shape)}"
            )
        if p.dtype != x.dtype and not (x.dtype in LOW_PRECISION and p.dtype == torch.float32):
            raise _DtypeMismatchError(
                f"LayerNormFunction expected {name} of dtype {x.dtype} (the input's"
                f"{', or float32' if x.dtype in LOW_PRECISION else ''}) but got {p.dtype}"
            )
        if p.device != x.device:
            raise ValueError(
                f"LayerNormFunction expected {name} on device {x.device} (the input's) but got {p.device}"
            )


def _kernel_for(x: torch.Tensor) -> ctypes.CDLL | None:
    """The loaded kernel if ``x`` should go through it, else None (eager): only a non-empty CPU
    float32/float64 input goes to C (its γ, β are then CPU tensors of its dtype, by
    :func:`_check_arguments`); every other device and dtype runs eager."""
    if (
        _backend == "eager"
        or x.device.type != "cpu"
        or x.layout != torch.strided
        or x.dtype not in _SUFFIX
        or x.numel() == 0
    ):
        return None
    lib = _load_kernel()
    if lib is None and _backend == "kernel":
        raise RuntimeError(_NO_KERNEL)
    return lib


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` as plain row-major memory: a copy if it is not contiguous (a transpose, a strided
    or an expanded view) or carries a lazy negation bit (the bit is not in the memory C reads)."""
    return t.resolve_neg().resolve_conj().contiguous()


def _unfit_for_c(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> str | None:
    """Why ``t`` cannot be handed to C as a row-major ``dtype`` array of ``shape``, or None."""
    if t.device.type != "cpu":
        return f"is on {t.device}, not the CPU"
    if t.layout != torch.strided:
        return f"is not dense (layout {t.layout})"
    if t.dtype != dtype:
        return f"has dtype {t.dtype}, not {dtype}"
    if tuple(t.shape) != shape:
        return f"has shape {tuple(t.shape)}, not {shape}"
    if not t.is_contiguous():
        return "is not contiguous"
    if t.is_neg() or t.is_conj():
        return "has a lazy negation or conjugation bit"
    return None


def _c_pointers(
    dtype: torch.dtype, arrays: dict[str, tuple[torch.Tensor | None, tuple[int, ...]]]
) -> list[int | None]:
    """Data pointers for C, in the order of ``arrays`` (name -> (tensor or None, shape)), after
    the last checks: each tensor must be a dense, contiguous CPU tensor of ``dtype`` and of
    exactly the given shape, with no lazy negation/conjugation bit; None passes as NULL.
    Otherwise ``ValueError``, and no pointer is handed out (the callers convert their arguments
    first, so this fires only on a bug of theirs). The caller must keep every tensor referenced
    until C returns: :func:`_call_kernel` does."""
    pointers = []
    for name, (t, shape) in arrays.items():
        problem = None if t is None else _unfit_for_c(t, dtype, shape)
        if problem is not None:
            raise ValueError(f"LayerNorm kernel: {name} {problem}; refusing to pass it to C")
        pointers.append(None if t is None else t.data_ptr())
    return pointers


def _call_kernel(fn, dtype: torch.dtype, arrays: dict, *sizes) -> None:
    """Check ``arrays`` (see :func:`_c_pointers`) and call ``fn(*pointers, *sizes)``. ``arrays``
    holds every tensor for the whole call, so no pointer can outlive its memory (a temporary
    such as ``t.contiguous()`` passed as a bare pointer would be freed before C reads it)."""
    status = fn(*_c_pointers(dtype, arrays), *sizes)
    if status == 1:
        raise MemoryError(f"LayerNorm kernel: {_KERNEL_STATUS[1]}")
    if status != 0:
        raise ValueError(f"LayerNorm kernel: {_KERNEL_STATUS.get(status, f'returned status {status}')}")


def _kernel_forward(lib, x, gamma, beta, eps):
    """(y, xhat, rstd) from the C kernel; shapes as the eager path's."""
    m = x.shape[-1]
    x2 = _dense(x).view(-1, m)
    n = x2.shape[0]
    y, xhat = torch.empty_like(x2), torch.empty_like(x2)
    rstd = torch.empty(n, 1, dtype=x.dtype)
    rows, row = (n, m), (m,)
    arrays = {
        "x": (x2, rows),
        "gamma": (_dense(gamma), row),
        "beta": (_dense(beta), row),
        "y": (y, rows),
        "xhat": (xhat, rows),
        "rstd": (rstd, (n, 1)),
    }
    _call_kernel(getattr(lib, f"cl_layernorm_forward_{_SUFFIX[x.dtype]}"), x.dtype, arrays, n, m, float(eps))
    return y.view(x.shape), xhat.view(x.shape), rstd.view(*x.shape[:-1], 1)


def _kernel_backward(lib, grad_y, xhat, rstd, gamma, need_x, need_gamma, need_beta):
    if grad_y.shape != xhat.shape:  # else view(-1, m) could give C more rows than X̂ has
        raise ValueError(
            f"LayerNormFunction.backward expected a gradient of shape {tuple(xhat.shape)} "
            f"but got {tuple(grad_y.shape)}"
        )
    m = xhat.shape[-1]
    dy = _dense(grad_y).view(-1, m)
    n = dy.shape[0]
    dx = torch.empty_like(xhat).view(n, m) if need_x else None
    dgamma = torch.empty(m, dtype=xhat.dtype) if need_gamma else None
    dbeta = torch.empty(m, dtype=xhat.dtype) if need_beta else None
    rows, row = (n, m), (m,)
    arrays = {
        "dy": (dy, rows),
        "xhat": (xhat.reshape(n, m), rows),
        "rstd": (rstd.reshape(n, 1), (n, 1)),
        "gamma": (_dense(gamma), row),
        "dx": (dx, rows),
        "dgamma": (dgamma, row),
        "dbeta": (dbeta, row),
    }
    _call_kernel(getattr(lib, f"cl_layernorm_backward_{_SUFFIX[xhat.dtype]}"), xhat.dtype, arrays, n, m)
    return (None if dx is None else dx.view(xhat.shape)), dgamma, dbeta


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
    ``(..., M)`` and ``gamma``, ``beta`` of shape ``(M,)`` (same dtype and device as ``x``;
    float32 is also accepted for a bfloat16/float16 ``x``, whose statistics are then computed in
    float32 and whose output is cast back to its dtype, as ``torch.nn.LayerNorm`` does).
    Returns ``Y = gamma ∘ X̂ + beta`` of the shape of ``x``.

    Arguments are checked on both backends: a 0-d ``x``, ``gamma``/``beta`` not of shape
    ``(M,)``, of another dtype than ``x`` (that error is also a ``TypeError``) or on another
    device, and sparse (non-strided) tensors raise ``ValueError``. The C kernel (backend
    ``'kernel'``/``'auto'``) takes only non-empty CPU float32/float64 inputs; any other device or
    dtype (float16, bfloat16, ...) runs the eager path, as does an empty input. Non-contiguous
    ``x``, ``gamma``, ``beta`` and upstream gradients (transposes, strided or expanded views)
    are copied to contiguous memory before their pointers reach C.

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

    @classmethod
    def apply(
        cls, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5
    ) -> torch.Tensor:
        # eps by keyword on every torch: Function.apply itself takes keywords only in recent
        # torch (2.13 does, 2.11 did not: pytorch/pytorch#16940), where it was a TypeError
        return super().apply(x, gamma, beta, eps)

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        eps: float = 1e-5,
    ) -> torch.Tensor:
        _check_arguments(x, gamma, beta)
        ctx.dtypes = (x.dtype, gamma.dtype, beta.dtype)  # what each gradient is returned in
        dt = compute_dtype(x)
        with _no_autocast(x.device):
            gamma = _as(gamma, dt)
            y, xhat, rstd = LayerNormFunction._forward(ctx, _as(x, dt), gamma, _as(beta, dt), eps)
        ctx.save_for_backward(xhat, rstd, gamma)
        return _as(y, x.dtype)

    @staticmethod
    def _forward(ctx, x, gamma, beta, eps):
        """(Y, X̂, 1/σ̂) of ``x`` in its own (float32 or float64) dtype, by kernel or eager ops."""
        m = x.shape[-1]
        lib = _kernel_for(x)
        ctx.kernel = lib
        if lib is not None:
            return _kernel_forward(lib, x, gamma, beta, eps)
        mean = x.mean(-1, keepdim=True)
        xhat = torch.sub(x, mean)  # x − μ, the one fresh (..., M) buffer kept for backward
        # σ² + ε = ‖x − μ‖² / M + ε (two-pass, so no cancellation for rows with a large mean)
        rstd = torch.linalg.vector_norm(xhat, dim=-1, keepdim=True)
        rstd = rstd.square_().mul_(1.0 / m).add_(eps).rsqrt_()
        xhat.mul_(rstd)
        return torch.addcmul(beta, xhat, gamma), xhat, rstd

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        xhat, rstd, gamma = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        if not any(need):
            return None, None, None, None
        # dY comes in Y's dtype (the input's): a bf16/fp16 one is computed with in float32; any
        # other dtype is left as it is, for the checks below to refuse
        dy = _as(grad_y, xhat.dtype) if grad_y.dtype == ctx.dtypes[0] else grad_y
        with _no_autocast(grad_y.device):
            grads = LayerNormFunction._backward(ctx, dy, xhat, rstd, gamma, *need)
        # each gradient in its input's dtype (bf16 x with float32 γ, β: dX bf16, dγ, dβ float32)
        return (*(None if g is None else _as(g, dt) for g, dt in zip(grads, ctx.dtypes)), None)

    @staticmethod
    def _backward(ctx, grad_y, xhat, rstd, gamma, need_x, need_gamma, need_beta):
        """(dX, dγ, dβ) in X̂'s dtype, None for what is not needed."""
        grad_x = grad_gamma = grad_beta = None
        lib = getattr(ctx, "kernel", None)
        if lib is not None:
            return _kernel_backward(lib, grad_y, xhat, rstd, gamma, need_x, need_gamma, need_beta)

        m = xhat.shape[-1]
        dy = grad_y.reshape(-1, m)  # (N, M): all leading dims are "batch"
        xh = xhat.reshape(-1, m)
        n = dy.shape[0]

        if need_beta or need_gamma:
            ones = torch.ones(1, n, dtype=dy.dtype, device=dy.device)
        if need_beta:  # dβ = Σ_batch dY  (column sums as a (1, N) @ (N, M) product)
            grad_beta = torch.mm(ones, dy).view(m)
        if not (need_x or need_gamma):
            return None, None, grad_beta

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
        return grad_x, grad_gamma, grad_beta


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
        dt = compute_dtype(x)  # float32 statistics for a bf16/fp16 input, as LayerNormFunction
        with _no_autocast(x.device):
            x32 = x.to(dt)
            mean = x32.mean(dim=-1, keepdim=True)
            centred = x32 - mean
            var = (centred * centred).mean(dim=-1, keepdim=True)  # biased variance
            xhat = centred / torch.sqrt(var + self.eps)
            return (self.weight.to(dt) * xhat + self.bias.to(dt)).to(x.dtype)


class LayerNormManual(_LayerNormModule):
    """Layer norm over the last dimension via :class:`LayerNormFunction` (hand-written backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim(x, self.n_neurons)
        return LayerNormFunction.apply(x, self.weight, self.bias, self.eps)
