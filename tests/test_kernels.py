"""Tests for cifarlab.ops.kernels (build on first use, cache, fallback) and the LayerNorm C kernel."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from cifarlab.ops import kernels, layernorm
from cifarlab.ops.layernorm import LayerNormFunction


@pytest.fixture
def fresh_load(tmp_path, monkeypatch):
    """kernels.load with an empty cache directory and its memo cleared (restored afterwards)."""
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    kernels.load.cache_clear()
    yield kernels.load
    kernels.load.cache_clear()


def fake_compiler(tmp_path, script: str) -> str:
    path = tmp_path / "fake-cc"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def reference_grads(x, g, b, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, g, b)]
    y = torch.nn.functional.layer_norm(leaves[0], (x.shape[-1],), leaves[1], leaves[2], 1e-5)
    return (y, *torch.autograd.grad(y, leaves, dy))


def run_function(x, g, b, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, g, b)]
    y = LayerNormFunction.apply(*leaves, 1e-5)
    return (y, *torch.autograd.grad(y, leaves, dy))


def test_builds_once_into_the_cache(fresh_load, tmp_path):
    if fresh_load("layernorm") is None:
        pytest.skip("no C compiler")
    built = list((tmp_path / "cache" / "kernels").glob("layernorm-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    kernels.load.cache_clear()
    assert fresh_load("layernorm") is not None
    assert built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert not list(built[0].parent.glob("*.part"))


def test_disabled_by_environment(fresh_load, monkeypatch):
    monkeypatch.setenv("CIFARLAB_KERNELS", "0")
    assert fresh_load("layernorm") is None


def test_missing_compiler_falls_back_to_eager(fresh_load, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-cifarlab")
    assert fresh_load("layernorm") is None
    assert layernorm.active_backend() == "eager"
    with pytest.raises(RuntimeError, match="C compiler"):
        layernorm.set_backend("kernel")
    torch.manual_seed(0)
    x, g, b, dy = (
        torch.randn(4, 6, dtype=torch.float64),
        torch.rand(6, dtype=torch.float64),
        torch.randn(6, dtype=torch.float64),
        torch.randn(4, 6, dtype=torch.float64),
    )
    for got, want in zip(run_function(x, g, b, dy), reference_grads(x, g, b, dy)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_failing_compiler_warns_and_leaves_nothing(fresh_load, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", fake_compiler(tmp_path, 'echo "fake-cc: error: broken" >&2; exit 1'))
    with pytest.warns(RuntimeWarning, match="could not build the layernorm C kernel"):
        assert fresh_load("layernorm") is None
    cache = tmp_path / "cache" / "kernels"
    assert not cache.exists() or not os.listdir(cache)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown LayerNorm backend"):
        layernorm.set_backend("cuda")


needs_kernel = pytest.mark.skipif(kernels.load("layernorm") is None, reason="no C compiler")


@needs_kernel
@pytest.mark.parametrize("shape", [(64, 512), (3, 7, 1000), (1, 1), (257, 33)])
def test_kernel_matches_pytorch_float32(shape):
    """Row lengths that are and are not multiples of the vector width, one-element rows."""
    torch.manual_seed(1)
    m = shape[-1]
    x = torch.randn(shape) * 3 + 2
    g, b, dy = 1 + 0.1 * torch.randn(m), torch.randn(m), torch.randn(shape)
    with layernorm.use_backend("kernel"):
        got = run_function(x, g, b, dy)
    for a, w in zip(got, reference_grads(x, g, b, dy)):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_kernel_two_pass_variance_survives_a_large_mean():
    """Rows with mean 1e4 and std 1 in float32: E[x²] − μ² would lose every digit of σ²."""
    torch.manual_seed(2)
    x = torch.randn(16, 256) + 1e4
    g, b = torch.ones(256), torch.zeros(256)
    with layernorm.use_backend("kernel"):
        y = LayerNormFunction.apply(x, g, b, 1e-5)
    want = torch.nn.functional.layer_norm(x.double(), (256,), g.double(), b.double(), 1e-5)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=2e-3)


@needs_kernel
def test_kernel_same_result_for_any_thread_count():
    torch.manual_seed(3)
    x, dy = torch.randn(300, 128, dtype=torch.float64), torch.randn(300, 128, dtype=torch.float64)
    g, b = torch.rand(128, dtype=torch.float64), torch.randn(128, dtype=torch.float64)
    # the OpenMP runtime the kernel's parallel regions use (absent if it was built without OpenMP)
    kernel_threads = getattr(layernorm._load_kernel(), "omp_get_max_threads", None)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            # the count really changed, for torch and for the kernel (one shared libgomp), else
            # the comparison below would compare a run with itself
            assert torch.get_num_threads() == n
            if kernel_threads is not None:
                assert kernel_threads() == n
            with layernorm.use_backend("kernel"):
                results.append(run_function(x, g, b, dy))
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for other in results[1:]:
        for a, w in zip(other, results[0]):
            torch.testing.assert_close(a, w, rtol=0, atol=1e-12)


@needs_kernel
def test_other_dtypes_run_eager_under_the_kernel_backend():
    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    g, b = torch.ones(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16)
    with layernorm.use_backend("kernel"):
        y = LayerNormFunction.apply(x, g, b, 1e-5)
    assert y.grad_fn is not None and y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad is not None


# -- what reaches C: every tensor checked before its pointer is passed ---------------------------


@pytest.fixture
def c_calls(monkeypatch):
    """The names of the C functions actually entered (after every check), under the kernel backend."""
    calls = []
    real_call = layernorm._call_kernel

    def spy(fn, *args):
        def entered(*c_args):  # called only once every check has passed
            calls.append(fn.__name__)
            return fn(*c_args)

        return real_call(entered, *args)

    monkeypatch.setattr(layernorm, "_call_kernel", spy)
    with layernorm.use_backend("kernel"):
        yield calls


def leaves64(m=6, rows=(4,), seed=9):
    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(*rows, m, generator=gen, dtype=torch.float64) + 1
    g = 1 + 0.2 * torch.randn(m, generator=gen, dtype=torch.float64)
    b = torch.randn(m, generator=gen, dtype=torch.float64)
    return x, g, b, torch.randn(*rows, m, generator=gen, dtype=torch.float64)


def assert_matches_reference(x, g, b, dy, views=(None, None, None)):
    """The Function's values and dL/dx, dγ, dβ against F.layer_norm's on the same inputs.
    ``views``: one function per input (or None) that maps it to a view (a strided view, say);
    the views are made inside the graph from leaves, so the layout is exactly what the Function
    sees, and the gradients flow back to the leaves. Returns the inputs the Function got."""
    results, inputs = [], []
    for fn in (LayerNormFunction.apply, reference_layer_norm):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, g, b)]
        inputs.append([leaf if v is None else v(leaf) for v, leaf in zip(views, leaves)])
        y = fn(*inputs[-1], 1e-5)
        results.append((y, *torch.autograd.grad(y, leaves, dy)))
    for a, w in zip(*results):
        torch.testing.assert_close(a, w, rtol=0, atol=1e-10)
    return inputs[0]


def reference_layer_norm(x, g, b, eps):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), g, b, eps)


VIEWS = {  # layouts C must not read as they are: a view with the values of t, shape (..., m)
    "transposed": lambda t: t.reshape(-1, t.shape[-1]).t().contiguous().t().reshape(t.shape),
    "every-other": lambda t: torch.stack([t, torch.zeros_like(t)], -1).flatten(-2)[..., ::2],
    "storage-offset": lambda t: torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape),
    "negated-bit": lambda t: torch._neg_view(-t),
}


@needs_kernel
@pytest.mark.parametrize("layout", list(VIEWS))
def test_kernel_reads_non_contiguous_or_lazy_input_correctly(c_calls, layout):
    """x, γ, β as non-contiguous views (γ, β via a strided view), views into a bigger buffer,
    and lazily negated views (whose pointer is that of the un-negated memory): all made dense
    before C sees them, results exact. (Before the negation bit was resolved, the kernel
    silently normalised −x.)"""
    x, g, b, dy = leaves64(rows=(3, 4))
    view = VIEWS[layout]
    vx, vg, vb = assert_matches_reference(x, g, b, dy, (view, view, view))
    if layout == "transposed":
        assert not vx.is_contiguous()
    elif layout == "every-other":
        assert not vx.is_contiguous() and not vg.is_contiguous() and vg.stride() == (2,)
    elif layout == "storage-offset":
        assert vx.storage_offset() == 1 and vg.storage_offset() == 1
    else:
        assert vx.is_neg() and vg.is_neg() and vb.is_neg()
    assert_matches_reference(x, g, b, dy, (view, None, None))  # x alone
    assert_matches_reference(x, g, b, dy, (None, view, view))  # the parameters alone
    assert c_calls.count("cl_layernorm_forward_f64") == 3
    assert c_calls.count("cl_layernorm_backward_f64") == 3


@needs_kernel
def test_kernel_reads_expanded_input_and_parameters(c_calls):
    """Stride-0 views (one row or one value repeated): C needs them materialised."""
    x, g, b, dy = leaves64()
    rows, first = (lambda t: t[:1].expand(5, 6)), (lambda t: t[:1].expand(6))
    vx, vg, vb = assert_matches_reference(
        x, g, b, torch.randn(5, 6, dtype=torch.float64), (rows, first, first)
    )
    assert vx.stride() == (0, 1) and vg.stride() == (0,)
    assert c_calls == ["cl_layernorm_forward_f64", "cl_layernorm_backward_f64"]


@needs_kernel
@pytest.mark.parametrize(
    "gamma_shape, beta_shape, match",
    [((5,), (6,), "gamma of shape"), ((6,), (7,), "beta of shape"), ((1, 6), (6,), "gamma of shape"),
     ((), (6,), "gamma of shape"), ((12,), (6,), "gamma of shape")],
)  # fmt: skip
def test_kernel_path_refuses_wrong_parameter_shapes(c_calls, gamma_shape, beta_shape, match):
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=match):
        LayerNormFunction.apply(x, torch.ones(gamma_shape), torch.zeros(beta_shape), 1e-5)
    assert c_calls == []


@needs_kernel
@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32, torch.float64, torch.float32), (torch.float64, torch.float64, torch.float32),
     (torch.float64, torch.float32, torch.float32), (torch.float32, torch.float16, torch.float16)],
)  # fmt: skip
def test_kernel_path_refuses_mixed_dtypes(c_calls, dtypes):
    """x, γ, β of different dtypes: a ValueError (also a TypeError, as before), nothing run."""
    x_dt, g_dt, b_dt = dtypes
    x, g, b = torch.randn(3, 4, dtype=x_dt), torch.ones(4, dtype=g_dt), torch.zeros(4, dtype=b_dt)
    with pytest.raises(ValueError, match="dtype") as info:
        LayerNormFunction.apply(x, g, b, 1e-5)
    assert isinstance(info.value, TypeError)
    assert c_calls == []


@needs_kernel
def test_kernel_path_refuses_parameters_on_another_device(c_calls):
    """γ on the meta device (data pointer 0) with a CPU input: refused before any C call."""
    x = torch.randn(3, 4)
    for g, b in (
        (torch.ones(4, device="meta"), torch.zeros(4)),
        (torch.ones(4), torch.zeros(4, device="meta")),
    ):
        with pytest.raises(ValueError, match="device"):
            LayerNormFunction.apply(x, g, b, 1e-5)
    assert c_calls == []


@needs_kernel
def test_kernel_path_refuses_sparse_tensors(c_calls):
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="dense"):
        LayerNormFunction.apply(x.to_sparse(), torch.ones(4), torch.zeros(4), 1e-5)
    with pytest.raises(ValueError, match="dense"):
        LayerNormFunction.apply(x, torch.ones(4).to_sparse(), torch.zeros(4), 1e-5)
    assert c_calls == []


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_fp32_through_the_kernel(c_calls, dtype):
    """float16/bfloat16 under the kernel backend: torch's rule for norm layers, fp32 statistics
    (the float32 C kernel), results back in the inputs' dtypes, off by their rounding only."""
    torch.manual_seed(10)
    x32, g32, b32, dy32 = torch.randn(5, 8), 1 + 0.1 * torch.randn(8), torch.randn(8), torch.randn(5, 8)
    leaves = [t.to(dtype).requires_grad_(True) for t in (x32, g32, b32)]
    y = LayerNormFunction.apply(*leaves, 1e-5)
    grads = torch.autograd.grad(y, leaves, dy32.to(dtype))
    assert c_calls == ["cl_layernorm_forward_f32", "cl_layernorm_backward_f32"]
    assert y.dtype == dtype and all(gr.dtype == dtype for gr in grads)
    want = reference_grads(*(t.detach().float() for t in leaves), dy32.to(dtype).float())
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # one rounding of the fp32 result
    for got, w in zip((y, *grads), want):
        torch.testing.assert_close(got.float(), w, rtol=u, atol=u * float(w.abs().max()))


@needs_kernel
def test_other_devices_and_empty_inputs_fall_back_to_eager(c_calls):
    y = LayerNormFunction.apply(torch.randn(3, 4, device="meta"), torch.ones(4, device="meta"),
                                torch.zeros(4, device="meta"), 1e-5)  # fmt: skip
    assert y.device.type == "meta" and y.shape == (3, 4)
    y = LayerNormFunction.apply(torch.randn(0, 4), torch.ones(4), torch.zeros(4), 1e-5)
    assert y.shape == (0, 4)
    assert c_calls == []


@needs_kernel
def test_kernel_backward_refuses_a_mismatched_gradient(c_calls):
    """Called directly (autograd itself always passes dY of Y's shape and dtype)."""
    x, g, b, dy = leaves64()
    x.requires_grad_(True)
    y = LayerNormFunction.apply(x, g, b, 1e-5)
    assert c_calls == ["cl_layernorm_forward_f64"]
    ctx = y.grad_fn
    for bad, match in ((dy.float(), "dtype"), (dy[:2], "shape"), (torch.cat([dy, dy]), "shape")):
        with pytest.raises(ValueError, match=match):
            LayerNormFunction.backward(ctx, bad)
    with pytest.raises(ValueError, match="meta"):
        LayerNormFunction.backward(ctx, torch.empty(dy.shape, dtype=dy.dtype, device="meta"))
    assert c_calls == ["cl_layernorm_forward_f64"]  # no backward call reached C
    (dx,) = torch.autograd.grad(y, x, dy)  # and the good gradient still works
    assert c_calls[-1] == "cl_layernorm_backward_f64" and dx.shape == x.shape


@pytest.mark.parametrize(
    "tensor, problem",
    [(torch.zeros(3, 4).t(), "not contiguous"), (torch.zeros(4, 3, dtype=torch.float64), "dtype"),
     (torch.zeros(4, 2), "shape"), (torch.zeros(4, 3, device="meta"), "CPU"),
     (torch._neg_view(torch.zeros(4, 3)), "negation"), (torch.zeros(4, 3).to_sparse(), "dense")],
)  # fmt: skip
def test_last_check_before_c_refuses_unfit_tensors(tensor, problem):
    """_c_pointers, the last gate: a pointer is only handed out for a fitting tensor."""
    fit = torch.zeros(4, 3)
    assert layernorm._c_pointers(torch.float32, {"a": (fit, (4, 3)), "b": (None, (3,))}) == [
        fit.data_ptr(),
        None,
    ]
    with pytest.raises(ValueError, match=problem):
        layernorm._c_pointers(torch.float32, {"a": (fit, (4, 3)), "b": (tensor, (4, 3))})


@needs_kernel
def test_c_kernel_rejects_null_pointers_and_bad_sizes():
    """The C side's own guard: status 2, nothing read or written (a NULL would otherwise crash)."""
    lib = layernorm._load_kernel()
    fwd, bwd = lib.cl_layernorm_forward_f32, lib.cl_layernorm_backward_f32
    # every buffer stays referenced here while C may write to it
    x, y, xhat, rstd, vec, dgamma = (
        torch.ones(2, 3),
        torch.empty(2, 3),
        torch.empty(2, 3),
        torch.empty(2, 1),
        torch.ones(3),
        torch.empty(3),
    )
    p = [t.data_ptr() for t in (x, vec, vec, y, xhat, rstd)]
    assert fwd(*p, 2, 3, 1e-5) == 0
    for i in range(6):
        assert fwd(*p[:i], None, *p[i + 1 :], 2, 3, 1e-5) == 2
    assert fwd(*p, -1, 3, 1e-5) == 2 and fwd(*p, 2, 0, 1e-5) == 2
    dy, xh, rs, g, dx = (t.data_ptr() for t in (x, xhat, rstd, vec, y))
    assert bwd(dy, xh, rs, g, dx, None, None, 2, 3) == 0
    assert bwd(None, xh, rs, g, dx, None, None, 2, 3) == 2
    assert bwd(dy, xh, None, g, dx, None, None, 2, 3) == 2  # dX needs rstd and gamma
    assert bwd(dy, xh, rs, None, dx, None, None, 2, 3) == 2
    assert bwd(dy, xh, None, None, None, dgamma.data_ptr(), None, 2, 3) == 0  # dγ alone needs neither
    torch.testing.assert_close(dgamma, (x * xhat).sum(0))
