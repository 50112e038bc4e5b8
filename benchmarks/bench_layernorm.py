"""Forward+backward time and saved-tensor memory of the LayerNorm implementations on CPU.

Compares, at each shape (N, M):
  * ``F.layer_norm``      — PyTorch's fused C++ kernel (the reference, ratio 1.00);
  * ``LayerNormAutograd`` — differentiable ops, backward derived by autograd;
  * ``LayerNormManual``   — ``LayerNormFunction`` with the hand-written backward, once on each
    backend: ``eager`` (PyTorch tensor ops) and ``kernel`` (the same formulas fused per row in C,
    ``src/cifarlab/ops/kernels/layernorm.c``; the default when a C compiler is available).

One step is ``y = f(x)`` then ``torch.autograd.grad(y, (x, weight, bias), dy)`` with ``x`` requiring
grad and a fixed random upstream gradient ``dy`` (``autograd.grad`` so that no ``.grad``
accumulation is timed). After a warm-up the three are timed interleaved, in a rotating order, so
that load from other processes hits all of them alike; the table shows medians and the ratio of
the forward+backward median to ``F.layer_norm``'s.

Saved memory is what the graph keeps for backward, counted with
``torch.autograd.graph.saved_tensors_hooks`` (every tensor packed; distinct storages counted once),
with the part that is *new* memory (not the input or the parameters, which are saved by reference)
in its own column. For ``LayerNormManual`` the sum of ``nbytes`` of ``grad_fn.saved_tensors`` (the
Function's ``ctx.saved_tensors``) is printed as a cross-check.

    python benchmarks/bench_layernorm.py --repeats 50 --shapes 256x1024,4096x512
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.ops import layernorm
from cifarlab.ops.layernorm import LayerNormAutograd, LayerNormManual


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.lower().split("x"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per implementation")
    p.add_argument(
        "--shapes",
        default="256x1024,4096x512",
        help="comma-separated input shapes, last dim normalised (e.g. 256x1024,8x64x512)",
    )
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class FusedLayerNorm(nn.Module):
    """``F.layer_norm`` with the same parameters as the cifarlab modules."""

    def __init__(self, n_neurons: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_neurons))
        self.bias = nn.Parameter(torch.zeros(n_neurons))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class ManualOn(LayerNormManual):
    """``LayerNormManual`` pinned to one backend of ``LayerNormFunction`` ('kernel' or 'eager')."""

    def __init__(self, n_neurons: int, backend: str) -> None:
        super().__init__(n_neurons)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with layernorm.use_backend(self.backend):
            return super().forward(x)


def make_modules(m: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, nn.Module]:
    mods = {
        "F.layer_norm": FusedLayerNorm(m),
        "LayerNormAutograd": LayerNormAutograd(m),
        "LayerNormManual (eager)": ManualOn(m, "eager"),
    }
    if layernorm.active_backend() == "kernel":
        mods["LayerNormManual (kernel)"] = ManualOn(m, "kernel")
    # Same non-trivial γ, β for all three (ones/zeros would let a kernel skip work).
    gamma = 1.0 + 0.1 * torch.randn(m, generator=gen, dtype=dtype)
    beta = 0.1 * torch.randn(m, generator=gen, dtype=dtype)
    for mod in mods.values():
        mod.to(dtype)
        with torch.no_grad():
            mod.weight.copy_(gamma)
            mod.bias.copy_(beta)
    return mods


def step(mod: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[float, float]:
    """One forward + backward; returns (forward seconds, backward seconds)."""
    t0 = time.perf_counter()
    y = mod(x)
    t1 = time.perf_counter()
    torch.autograd.grad(y, (x, mod.weight, mod.bias), dy)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def saved_bytes(mod: nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    """(bytes saved for backward, distinct storages; of which new memory; ctx.saved_tensors sum)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mod(x)
    inputs = {p.untyped_storage().data_ptr() for p in (x, mod.weight, mod.bias)}
    total = sum(storages.values())
    new = sum(nb for ptr, nb in storages.items() if ptr not in inputs)
    ctx_sum = -1
    if isinstance(mod, LayerNormManual):
        ctx_sum = sum(t.nbytes for t in y.grad_fn.saved_tensors)
    del y
    return total, new, ctx_sum


def bench_shape(shape: tuple[int, ...], args: argparse.Namespace) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    mods = make_modules(shape[-1], dtype, gen)
    x = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(True)
    dy = torch.randn(shape, generator=gen, dtype=dtype)

    names = list(mods)
    for _ in range(args.warmup):
        for name in names:
            step(mods[name], x, dy)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(args.repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate the order every repeat
            times[name].append(step(mods[name], x, dy))

    rows = []
    ref_total = statistics.median(f + b for f, b in times["F.layer_norm"])
    for name in names:
        fwd = statistics.median(f for f, _ in times[name])
        bwd = statistics.median(b for _, b in times[name])
        total = statistics.median(f + b for f, b in times[name])
        saved, new, ctx_sum = saved_bytes(mods[name], x)
        rows.append(
            {
                "shape": "x".join(map(str, shape)),
                "impl": name,
                "fwd": fwd * 1e3,
                "bwd": bwd * 1e3,
                "total": total * 1e3,
                "ratio": total / ref_total,
                "saved": saved / 2**20,
                "new": new / 2**20,
                "ctx": ctx_sum,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    backend = layernorm.active_backend()  # builds the C kernel on first use
    print(f"LayerNormManual's default backend: {backend} (ready in {time.perf_counter() - t0:.2f} s)")
    shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"(os.cpu_count()={os.cpu_count()}), {args.dtype}, {args.repeats} repeats "
        f"after {args.warmup} warm-up, load average before: " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    )
    print()
    print(
        "| shape | implementation | fwd ms | bwd ms | fwd+bwd ms | ratio vs F.layer_norm "
        "| saved MiB | of which new MiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    ctx_lines = []
    for shape in shapes:
        for r in bench_shape(shape, args):
            print(
                f"| {r['shape']} | {r['impl']} | {r['fwd']:.3f} | {r['bwd']:.3f} | "
                f"{r['total']:.3f} | {r['ratio']:.2f} | {r['saved']:.2f} | {r['new']:.2f} |"
            )
            if r["ctx"] >= 0:
                ctx_lines.append(
                    f"{r['shape']}: {r['impl']} ctx.saved_tensors = {r['ctx'] / 2**20:.3f} MiB (X̂, rstd, γ)"
                )
    print()
    print("\n".join(ctx_lines))
    print("load average after: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
