"""Time each "fast form" of a formula in ``cifarlab.numpy_nn.modules`` against the plain formula.

A fast form computes the same numbers as the formula in the module's docstring, but in a less
obvious way to save time. The rule (docs/benchmarks.md, "NumPy fast forms vs plain formulas"):
a fast form stays only if it saves at least 5 % of forward+backward time at the shapes the
trainer uses; otherwise the module uses the plain formula. Both forms of each are written out
below, so this script measures the same pair whichever one the module currently uses:

* ``Linear``: fast = W stored column-major (Wᵀ C-contiguous, so Y = X Wᵀ is a plain row-major
  GEMM), Y = X Wᵀ then ``Y += b`` in place, dW written as (Xᵀ dY)ᵀ into the column-major
  gradient; plain = W row-major, Y = X Wᵀ + b, dW = dYᵀ X. Both: db = Σ_s dY, dX = dY W (only
  for layers whose input needs a gradient: not the first layer, whose input is the data).
* ``ELU`` (α = 1, the trainer's): fast = y = max(expm1(min(x, 0)), x) and dx = (min(y, 0) + 1) ∘ dy,
  in place; plain = y = where(x > 0, x, α expm1(min(x, 0))), dx = dy ∘ where(y > 0, 1, y + α).
* ``Tanh``: same forward; backward fast = 1 − y² built in place, plain = dy ∘ (1 − y²).
* ``SoftMax`` (10 classes): fast = exp and the division in place on x − max; plain =
  e = exp(x − max), y = e / Σe. Same backward.

Shapes: batch 200 (the seed preset) and 256 (the wide preset); Linear 3072→100, 3072→1024,
1024→1024; the activations at the widths those layers output (100, 1024). Each step is one
forward and one backward, on float32 (the trainer's dtype). Fast and plain are timed
interleaved, one step each in turn (ABBA order, so neither always runs on the other's warm
cache), so that load from other processes hits both alike. The table shows median milliseconds,
the ratio fast/plain of the medians (< 1: the fast form is faster) and the time it saves.

    python benchmarks/bench_numpy_fast_forms.py --repeats 30
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

BATCHES = (200, 256)
LINEAR_SHAPES = ((3072, 100), (3072, 1024), (1024, 1024))  # (in, out)
ACT_WIDTHS = (100, 1024)
N_CLASSES = 10
THRESHOLD = 0.05  # a fast form must save at least this fraction of the plain form's time

Step = Callable[[], tuple[np.ndarray | None, ...]]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- the pairs: each factory returns (fast step, plain step) on the same operands --------------


def linear_pair(rng: np.random.Generator, S: int, D: int, M: int) -> tuple[Step, Step]:
    x = rng.standard_normal((S, D), dtype=np.float32)
    dy = rng.standard_normal((S, M), dtype=np.float32)
    w = rng.standard_normal((M, D), dtype=np.float32) * np.float32(np.sqrt(2 / D))
    b = rng.standard_normal(M, dtype=np.float32)
    input_grad = D != 3072  # the first layer (input = the data) skips dX, as in MLP

    W_f = np.asfortranarray(w)  # fast: Wᵀ is C-contiguous
    gW_f, gb_f = np.zeros_like(W_f), np.zeros_like(b)

    def fast():
        y = x @ W_f.T
        y += b
        np.matmul(x.T, dy, out=gW_f.T)  # dWᵀ = Xᵀ dY
        np.sum(dy, axis=0, out=gb_f)
        dx = dy @ W_f if input_grad else None
        return y, gW_f, gb_f, dx

    W_p = np.ascontiguousarray(w)  # plain: W row-major, as its shape (M, D) reads
    gW_p, gb_p = np.zeros_like(W_p), np.zeros_like(b)

    def plain():
        y = x @ W_p.T + b
        np.matmul(dy.T, x, out=gW_p)  # dW = dYᵀ X
        np.sum(dy, axis=0, out=gb_p)
        dx = dy @ W_p if input_grad else None
        return y, gW_p, gb_p, dx

    return fast, plain


def elu_pair(rng: np.random.Generator, S: int, D: int, alpha: float = 1.0) -> tuple[Step, Step]:
    x = 2 * rng.standard_normal((S, D), dtype=np.float32)
    dy = rng.standard_normal((S, D), dtype=np.float32)

    def fast():
        y = np.minimum(x, 0)
        np.expm1(y, out=y)
        if alpha != 1.0:
            y *= alpha
        if alpha <= 1.0:
            np.maximum(y, x, out=y)
        else:
            y += np.maximum(x, 0)
        dx = np.minimum(y, 0)
        dx += alpha
        if alpha != 1.0:
            dx += dx.dtype.type(1 - alpha) * (y > 0)
        dx *= dy
        return y, dx

    def plain():
        y = np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))
        dx = dy * np.where(y > 0, 1, y + alpha)
        return y, dx

    return fast, plain


def tanh_pair(rng: np.random.Generator, S: int, D: int) -> tuple[Step, Step]:
    x = rng.standard_normal((S, D), dtype=np.float32)
    dy = rng.standard_normal((S, D), dtype=np.float32)

    def fast():
        y = np.tanh(x)
        dx = y * y
        np.subtract(1, dx, out=dx)
        dx *= dy
        return y, dx

    def plain():
        y = np.tanh(x)
        dx = dy * (1 - y * y)
        return y, dx

    return fast, plain


def softmax_pair(rng: np.random.Generator, S: int, C: int) -> tuple[Step, Step]:
    x = 3 * rng.standard_normal((S, C), dtype=np.float32)
    dy = rng.standard_normal((S, C), dtype=np.float32)

    def backward(y):
        return y * (dy - np.sum(dy * y, axis=1, keepdims=True))

    def fast():
        y = x - x.max(axis=1, keepdims=True)
        np.exp(y, out=y)
        y /= y.sum(axis=1, keepdims=True)
        return y, backward(y)

    def plain():
        e = np.exp(x - x.max(axis=1, keepdims=True))
        y = e / e.sum(axis=1, keepdims=True)
        return y, backward(y)

    return fast, plain


def cases() -> list[tuple[str, str, Callable[[np.random.Generator], tuple[Step, Step]]]]:
    """(form, shape label, factory) for every row of the table."""
    out = []
    for D, M in LINEAR_SHAPES:
        for S in BATCHES:
            out.append(("Linear", f"{S}x{D} -> {M}", lambda r, S=S, D=D, M=M: linear_pair(r, S, D, M)))
    for name, make in (("ELU", elu_pair), ("Tanh", tanh_pair)):
        for D in ACT_WIDTHS:
            for S in BATCHES:
                out.append((name, f"{S}x{D}", lambda r, S=S, D=D, make=make: make(r, S, D)))
    for S in BATCHES:
        out.append(("SoftMax", f"{S}x{N_CLASSES}", lambda r, S=S: softmax_pair(r, S, N_CLASSES)))
    return out


# -- timing ---------------------------------------------------------------------------------


def check_same(fast: Step, plain: Step, label: str) -> None:
    for a, b in zip(fast(), plain()):
        if a is None or b is None:
            assert a is None and b is None, label
            continue
        # float32 sums taken in another order: agree to float32 precision of the largest entry
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()), err_msg=label)


def time_interleaved(fast: Step, plain: Step, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds per step of each, one step at a time in ABBA order."""
    for _ in range(warmup):
        fast()
        plain()
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats):
        order = ((0, fast), (1, plain)) if i % 2 == 0 else ((1, plain), (0, fast))
        for k, fn in order:
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30, help="timed steps of each form per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each form per row")
    ap.add_argument("--only", default="", help="comma-separated forms to run (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    only = {s.strip() for s in args.only.split(",") if s.strip()}
    print(
        f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); numpy {np.__version__}; "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; float32; "
        f"{args.repeats} interleaved steps of each form per row\n"
    )
    print("| form | shape | fast ms | plain ms | fast/plain | fast/plain (min) | saves |")
    print("|---|---|---:|---:|---:|---:|---:|")
    ratios: dict[str, list[float]] = {}
    t_start = time.perf_counter()
    for form, label, factory in cases():
        if only and form not in only:
            continue
        fast, plain = factory(np.random.default_rng(args.seed))
        check_same(fast, plain, f"{form} {label}")
        t_fast, t_plain = time_interleaved(fast, plain, args.repeats, args.warmup)
        med_f, med_p = statistics.median(t_fast), statistics.median(t_plain)
        ratio = med_f / med_p
        ratios.setdefault(form, []).append(ratio)
        print(
            f"| {form} | {label} | {med_f * 1e3:.3f} | {med_p * 1e3:.3f} | {ratio:.3f} | "
            f"{min(t_fast) / min(t_plain):.3f} | {1 - ratio:+.1%} |"
        )
    print("\n| form | fast/plain, geometric mean over its rows | saves | verdict (>= 5 % to keep) |")
    print("|---|---:|---:|---|")
    for form, rs in ratios.items():
        g = float(np.exp(np.mean(np.log(rs))))
        verdict = "keep fast form" if 1 - g >= THRESHOLD else "use the plain formula"
        print(f"| {form} | {g:.3f} | {1 - g:+.1%} | {verdict} |")
    print(f"\n(total {time.perf_counter() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
