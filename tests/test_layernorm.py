"""Tests for cifarlab.ops.layernorm: LayerNormAutograd, LayerNormFunction, LayerNormManual."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode

from cifarlab.ops import kernels, layernorm
from cifarlab.ops.layernorm import LayerNormAutograd, LayerNormFunction, LayerNormManual

F64 = torch.float64
IMPLS = ["autograd", "function", "manual"]
SHAPES = [(6,), (4, 6), (2, 3, 5), (2, 1, 3, 4)]


@pytest.fixture(autouse=True, params=["eager", "kernel"])
def backend(request):
    """Every test runs on both backends of LayerNormFunction (the C kernel where it builds)."""
    if request.param == "kernel" and kernels.load("layernorm") is None:
        pytest.skip("the LayerNorm C kernel cannot be built here (no C compiler)")
    with layernorm.use_backend(request.param):
        yield request.param


def gammas(m: int) -> dict[str, torch.Tensor]:
    return {
        "ones": torch.ones(m, dtype=F64),
        "sqrt10k": torch.sqrt(10.0 * torch.arange(m, dtype=F64)),
    }


def make(impl: str, m: int, gamma: torch.Tensor, beta: torch.Tensor):
    """Return (callable x -> y, gamma leaf, beta leaf) for one implementation."""
    if impl == "function":
        g = gamma.clone().requires_grad_(True)
        b = beta.clone().requires_grad_(True)
        return (lambda x: LayerNormFunction.apply(x, g, b, 1e-5)), g, b
    mod = (LayerNormAutograd if impl == "autograd" else LayerNormManual)(m).to(gamma.dtype)
    with torch.no_grad():
        mod.weight.copy_(gamma)
        mod.bias.copy_(beta)
    return mod, mod.weight, mod.bias


def reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> nn.LayerNorm:
    ref = nn.LayerNorm(x.shape[-1], eps=1e-5).to(x.dtype)
    with torch.no_grad():
        ref.weight.copy_(gamma)
        ref.bias.copy_(beta)
    return ref


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 5)])
@pytest.mark.parametrize("gamma_kind", ["ones", "sqrt10k"])
def test_gradcheck_function(shape, gamma_kind):
    """Hand-written backward of LayerNormFunction vs finite differences, for x, γ and β."""
    torch.manual_seed(0)
    m = shape[-1]
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    g = gammas(m)[gamma_kind].clone().requires_grad_(True)
    b = (100.0 * torch.arange(m, dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, g, b: LayerNormFunction.apply(x, g, b, 1e-5), (x, g, b), eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 5)])
@pytest.mark.parametrize("impl", ["autograd", "manual"])
def test_gradcheck_modules(shape, impl):
    torch.manual_seed(1)
    m = shape[-1]
    mod, g, b = make(impl, m, gammas(m)["sqrt10k"], 100.0 * torch.arange(m, dtype=F64))
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(mod, (x,), eps=1e-6, atol=1e-5)
    # the parameters too: treat them as inputs of a functional wrapper
    assert torch.autograd.gradcheck(
        lambda gg, bb: torch.func.functional_call(mod, {"weight": gg, "bias": bb}, (x,)),
        (g.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)),
        eps=1e-6,
        atol=1e-5,
    )


# --------------------------------------------------------------- equality with nn.LayerNorm


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma_kind", ["ones", "sqrt10k"])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_torch_layernorm_float64(impl, gamma_kind, shape):
    """Values and dL/dX, dL/dγ, dL/dβ equal nn.LayerNorm's to 1e-10 (float64)."""
    torch.manual_seed(2)
    m = shape[-1]
    gamma = gammas(m)[gamma_kind]
    beta = 100.0 * torch.arange(m, dtype=F64)
    fn, g, b = make(impl, m, gamma, beta)
    ref = reference(torch.empty(1, m, dtype=F64), gamma, beta)
    x = (3.0 * torch.randn(shape, dtype=F64) + 7.0).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    dy = torch.randn(shape, dtype=F64)

    y, y_ref = fn(x), ref(x_ref)
    assert y.shape == x.shape and y.dtype == F64
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    grads = torch.autograd.grad(y, (x, g, b), dy)
    grads_ref = torch.autograd.grad(y_ref, (x_ref, ref.weight, ref.bias), dy)
    for got, want, name in zip(grads, grads_ref, ["x", "gamma", "beta"]):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=f"dL/d{name}")


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    m=st.integers(1, 9),
    scale=st.floats(1e-2, 1e3),
    shift=st.floats(-1e3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_function_matches_torch_random_shapes(lead, m, scale, shift, seed):
    """Property: any (..., M), any row scale/offset, matches F.layer_norm (float64)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, m)
    x = (scale * torch.randn(shape, generator=gen, dtype=F64) + shift).requires_grad_(True)
    g = torch.randn(m, generator=gen, dtype=F64).requires_grad_(True)
    b = torch.randn(m, generator=gen, dtype=F64).requires_grad_(True)
    dy = torch.randn(shape, generator=gen, dtype=F64)
    y = LayerNormFunction.apply(x, g, b, 1e-5)
    y_ref = torch.nn.functional.layer_norm(x, (m,), g, b, 1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    for got, want in zip(torch.autograd.grad(y, (x, g, b), dy), torch.autograd.grad(y_ref, (x, g, b), dy)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("impl", IMPLS)
def test_float32(impl):
    torch.manual_seed(3)
    m = 16
    gamma = torch.rand(m) + 0.5
    beta = torch.randn(m)
    fn, g, b = make(impl, m, gamma, beta)
    ref = reference(torch.empty(1, m), gamma, beta)
    x = torch.randn(3, 5, m, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    dy = torch.randn(3, 5, m)
    y, y_ref = fn(x), ref(x_ref)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(y, (x, g, b), dy)
    grads_ref = torch.autograd.grad(y_ref, (x_ref, ref.weight, ref.bias), dy)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_input_and_expanded_upstream_grad(impl):
    """A transposed input and the stride-0 gradient of y.sum() are handled like nn.LayerNorm."""
    torch.manual_seed(4)
    m = 5
    gamma, beta = torch.rand(m, dtype=F64) + 0.5, torch.randn(m, dtype=F64)
    fn, g, b = make(impl, m, gamma, beta)
    ref = reference(torch.empty(1, m, dtype=F64), gamma, beta)
    base = torch.randn(3, m, 4, dtype=F64)
    x = base.transpose(1, 2).requires_grad_(True)  # (3, 4, m), not contiguous
    assert not x.is_contiguous()
    w = torch.randn(3, 4, m, dtype=F64)
    loss, loss_ref = (fn(x) * w).sum() + fn(x).sum(), (ref(x) * w).sum() + ref(x).sum()
    grads = torch.autograd.grad(loss, (x, g, b))
    grads_ref = torch.autograd.grad(loss_ref, (x, ref.weight, ref.bias))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_eps_is_used():
    """A constant row has σ² = 0, so X̂ = 0 and dX = γ/sqrt(ε)-scaled; eps changes the scale."""
    m = 4
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64, requires_grad=True)
    g, b = torch.ones(m, dtype=F64), torch.zeros(m, dtype=F64)
    for eps in (1e-5, 0.5):
        y = LayerNormFunction.apply(x, g, b, eps=eps)  # keyword eps, as documented
        want = (x - 2.5) / torch.sqrt(torch.tensor(1.25 + eps, dtype=F64))
        torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    const = torch.full((2, m), 3.0, dtype=F64)
    torch.testing.assert_close(LayerNormFunction.apply(const, g, b + 7.0), torch.full((2, m), 7.0, dtype=F64))


def test_dx_rows_sum_to_zero_and_are_nearly_orthogonal_to_xhat():
    """Closed form: Σ_j dX_j = 0 exactly and Σ_j dX_j X̂_j = (1/σ̂)·ε/(σ²+ε)·Σ_j dX̂_j X̂_j."""
    torch.manual_seed(8)
    m = 6
    x = (torch.randn(4, 3, m, dtype=F64) * torch.rand(4, 3, 1, dtype=F64)).requires_grad_(True)
    g = torch.rand(m, dtype=F64) + 0.5
    b = torch.randn(m, dtype=F64)
    dy = torch.randn(4, 3, m, dtype=F64)
    y = LayerNormFunction.apply(x, g, b, 1e-5)
    xhat, rstd, _ = y.grad_fn.saved_tensors
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx.sum(-1), torch.zeros(4, 3, dtype=F64), rtol=0, atol=1e-12)
    var = x.detach().var(-1, unbiased=False, keepdim=True)
    s = (dy * g * xhat).sum(-1, keepdim=True)
    want = rstd * 1e-5 / (var + 1e-5) * s
    torch.testing.assert_close((dx * xhat).sum(-1, keepdim=True), want, rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------ shape checking


@pytest.mark.parametrize("cls", [LayerNormAutograd, LayerNormManual])
@pytest.mark.parametrize("shape", [(4, 5), (7,), (2, 3, 8)])
def test_wrong_last_dim_raises(cls, shape):
    mod = cls(6)
    with pytest.raises(ValueError, match=r"expected .*6.* got 5|expected .*6.* got \d+") as info:
        mod(torch.randn(shape))
    msg = str(info.value)
    assert "6" in msg and str(shape[-1]) in msg


@pytest.mark.parametrize("cls", [LayerNormAutograd, LayerNormManual])
def test_zero_dim_input_raises(cls):
    with pytest.raises(ValueError, match="expected"):
        cls(1)(torch.tensor(1.0))


def test_function_rejects_mismatched_parameters():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="gamma"):
        LayerNormFunction.apply(x, torch.ones(3), torch.zeros(4))
    with pytest.raises(ValueError, match="beta"):
        LayerNormFunction.apply(x, torch.ones(4), torch.zeros(5))
    with pytest.raises(TypeError, match="dtype"):
        LayerNormFunction.apply(x, torch.ones(4, dtype=F64), torch.zeros(4))
    with pytest.raises(ValueError, match="dtype"):  # the same error, also a ValueError
        LayerNormFunction.apply(x, torch.ones(4), torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="device"):
        LayerNormFunction.apply(x, torch.ones(4, device="meta"), torch.zeros(4))


@pytest.mark.parametrize("cls", [LayerNormAutograd, LayerNormManual])
def test_module_parameters(cls):
    mod = cls(7, eps=1e-3)
    assert dict(mod.named_parameters()).keys() == {"weight", "bias"}
    torch.testing.assert_close(mod.weight.detach(), torch.ones(7))
    torch.testing.assert_close(mod.bias.detach(), torch.zeros(7))
    assert mod.n_neurons == 7 and mod.eps == 1e-3
    assert "n_neurons=7" in repr(mod)


# ------------------------------------------------------------- saved tensors / skipped work


def test_saves_only_xhat_rstd_gamma():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    g = torch.rand(5, dtype=F64).requires_grad_(True)
    b = torch.randn(5, dtype=F64).requires_grad_(True)
    y = LayerNormFunction.apply(x, g, b, 1e-5)
    xhat, rstd, gamma = y.grad_fn.saved_tensors
    assert len(y.grad_fn.saved_tensors) == 3
    assert xhat.shape == (2, 3, 5) and rstd.shape == (2, 3, 1) and gamma.shape == (5,)
    mean = x.detach().mean(-1, keepdim=True)
    var = x.detach().var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(rstd, 1.0 / torch.sqrt(var + 1e-5), rtol=0, atol=1e-12)
    torch.testing.assert_close(xhat, (x.detach() - mean) * rstd, rtol=0, atol=1e-12)
    assert gamma.data_ptr() == g.data_ptr()
    assert xhat.data_ptr() != x.data_ptr()


class OpRecorder(TorchFunctionMode):
    """Records (name, output shape) of every new tensor (not a view, not an input returned as is,
    e.g. by ``contiguous``) produced by torch calls."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple | list) else (out,)
        for o in outs:
            if isinstance(o, torch.Tensor) and not o._is_view() and not any(o is a for a in args):
                self.ops.append((getattr(func, "__name__", str(func)), tuple(o.shape)))
        return out


N, M = 5, 7  # distinct, so row statistics (N,)/(N,1) and column sums (M,)/(1,M) are told apart
ROW_SHAPES = {(N,), (N, 1)}
COL_SHAPES = {(M,), (1, M)}


def run_backward(need_x: bool, need_gamma: bool, need_beta: bool):
    """Forward with the given requires_grad flags, then call backward directly on the real ctx."""
    torch.manual_seed(6)
    x = torch.randn(N, M, dtype=F64, requires_grad=need_x)
    g = torch.rand(M, dtype=F64).requires_grad_(need_gamma)
    b = torch.randn(M, dtype=F64).requires_grad_(need_beta)
    y = LayerNormFunction.apply(x, g, b, 1e-5)
    if y.grad_fn is not None:  # the real ctx autograd would pass
        ctx = y.grad_fn
    else:  # nothing requires grad: no graph, so a stand-in ctx with the saved tensors
        # (of a graph whose output stays referenced while they are read)
        y_with_graph = LayerNormFunction.apply(x, g.detach().requires_grad_(True), b, 1e-5)
        ctx = SimpleNamespace(
            saved_tensors=y_with_graph.grad_fn.saved_tensors, needs_input_grad=(False, False, False, False)
        )
    assert tuple(ctx.needs_input_grad[:3]) == (need_x, need_gamma, need_beta)
    dy = torch.randn(N, M, dtype=F64)
    with OpRecorder() as rec:
        grads = LayerNormFunction.backward(ctx, dy)
    return grads, rec.ops, (x, g, b, dy)


@pytest.mark.parametrize("need_gamma", [False, True])
@pytest.mark.parametrize("need_beta", [False, True])
def test_no_dx_work_when_x_needs_no_grad(need_gamma, need_beta, backend):
    grads, ops, _ = run_backward(False, need_gamma, need_beta)
    assert grads[0] is None
    assert (grads[1] is not None) == need_gamma and (grads[2] is not None) == need_beta
    if backend == "kernel":  # one C call, which skips dX when handed no dX buffer
        allocated = [shape for op, shape in ops if op.startswith("empty")]
        assert allocated == [(M,)] * (need_gamma + need_beta), ops
        return
    # dX needs the per-row means of dX̂ and dX̂∘X̂: none may be computed
    assert not [op for op in ops if op[1] in ROW_SHAPES], ops
    # the only (N, M) result allowed is dY∘X̂, and only when dγ is needed
    assert sum(op[1] == (N, M) for op in ops) == int(need_gamma), ops
    if not (need_gamma or need_beta):
        assert ops == []


def test_no_dgamma_dbeta_work_when_parameters_need_no_grad():
    grads, ops, (x, g, b, dy) = run_backward(True, False, False)
    assert grads[1] is None and grads[2] is None and grads[0] is not None
    assert not [op for op in ops if op[1] in COL_SHAPES], ops  # no column sums (nor buffers for them)
    # and dX is still right
    x_ref = x.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(torch.nn.functional.layer_norm(x_ref, (M,), g, b), x_ref, dy)
    torch.testing.assert_close(grads[0], want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("need", [(True, True, False), (True, False, True)])
def test_only_requested_parameter_grad_is_computed(need):
    grads, ops, (x, g, b, dy) = run_backward(*need)
    assert [gr is not None for gr in grads[:3]] == list(need)
    assert grads[3] is None  # eps
    assert sum(op[1] in COL_SHAPES for op in ops) >= 1
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, g, b)]
    want = torch.autograd.grad(
        torch.nn.functional.layer_norm(leaves[0], (M,), leaves[1], leaves[2]), leaves, dy
    )
    for got, ref in zip(grads[:3], want):
        if got is not None:
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_end_to_end_frozen_input_and_frozen_parameters():
    """Through the real autograd engine: only the leaves that require grad get one."""
    torch.manual_seed(7)
    mod = LayerNormManual(6).double()
    ref = reference(torch.empty(1, 6, dtype=F64), mod.weight.detach(), mod.bias.detach())
    x = torch.randn(4, 6, dtype=F64)  # requires_grad False
    mod(x).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    assert x.grad is None
    torch.testing.assert_close(mod.weight.grad, ref.weight.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(mod.bias.grad, ref.bias.grad, rtol=0, atol=1e-10)

    before = mod.weight.grad.clone()
    mod.requires_grad_(False)
    x.requires_grad_(True)
    mod(x).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ref(x_ref).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-10)
    assert torch.equal(mod.weight.grad, before)  # frozen parameters were not accumulated into


def test_function_is_once_differentiable():
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    g = torch.ones(4, dtype=F64, requires_grad=True)
    b = torch.zeros(4, dtype=F64, requires_grad=True)
    y = LayerNormFunction.apply(x, g, b, 1e-5)
    # (y**2).sum() makes the upstream gradient 2y depend on x, so gx has a graph to go through
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    assert gx.requires_grad
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()
