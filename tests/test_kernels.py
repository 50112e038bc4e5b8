"""Tests for cifarlab.kernels (build on first use, cache, fallback) and the LayerNorm C kernel."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from cifarlab import kernels, layernorm
from cifarlab.layernorm import LayerNormFunction


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
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with layernorm.use_backend("kernel"):
                results.append(run_function(x, g, b, dy))
    finally:
        torch.set_num_threads(threads)
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
