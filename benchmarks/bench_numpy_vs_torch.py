"""Time forward + backward (with the loss) of the NumPy MLP against the same network in PyTorch.

Both sides run the same work per iteration on the same fp32 batch:

* NumPy: ``MLP.logits`` → ``SoftmaxCrossEntropy`` forward/backward → ``MLP.backward_logits``
  (no gradient for the input, as in PyTorch where the data does not require grad);
* PyTorch: ``nn.Sequential(Linear, ELU, ..., Linear)`` → ``F.cross_entropy`` → ``backward()``
  with ``torch.set_num_threads(os.cpu_count())``; gradients are set to None before each
  iteration (``zero_grad``), so both sides allocate fresh gradients.

The two are timed interleaved in blocks (``--block`` numpy iterations, then ``--block`` torch
iterations, and so on) so that load from other processes hits both alike. Blocks are separated
by a short pause: after a call, OpenBLAS worker threads (numpy) and OpenMP worker threads
(torch) keep spinning for a while, and interleaving single iterations would make each library's
idle spinners steal the cores from the other (on 2 cores that inflates both sides several
times). The table reports median milliseconds per iteration and the ratio numpy/torch (< 1
means NumPy is faster), and also the ratio of the fastest iterations, which is less sensitive to
other processes on a shared machine. NumPy's BLAS threads follow ``OPENBLAS_NUM_THREADS``
(default: all cores).

    python benchmarks/bench_numpy_vs_torch.py --repeats 50
    python benchmarks/bench_numpy_vs_torch.py --repeats 50 --breakdown   # + each matrix product
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.numpy_nn import MLP, SoftmaxCrossEntropy

CONFIGS = [
    # (name, n_inputs, n_hidden, num_classes, batch)
    ("seed MLP 3072-100-10", 3072, [100], 10, 200),
    ("3072-1024-1024-10", 3072, [1024, 1024], 10, 256),
]


def torch_mlp(n_inputs: int, n_hidden: list[int], num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_inputs
    for h in n_hidden:
        layers += [nn.Linear(width, h), nn.ELU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def bench_config(n_inputs, n_hidden, num_classes, batch, repeats, warmup, block, pause, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n_inputs), dtype=np.float32)
    y = rng.integers(0, num_classes, size=batch)

    net = MLP(n_inputs, n_hidden, num_classes, activation="elu", init="he", rng=rng)
    loss_fn = SoftmaxCrossEntropy()
    tnet = torch_mlp(n_inputs, n_hidden, num_classes)
    with torch.no_grad():  # same weights on both sides
        for (_, p), tp in zip(net.params.items(), tnet.parameters()):
            tp.copy_(torch.from_numpy(p))
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def step_numpy() -> float:
        loss = loss_fn.forward(net.logits(x), y)
        net.backward_logits(loss_fn.backward())
        return loss

    def step_torch() -> float:
        tnet.zero_grad(set_to_none=True)
        loss = F.cross_entropy(tnet(tx), ty)
        loss.backward()
        return loss.item()

    l_np, l_t = step_numpy(), step_torch()
    assert abs(l_np - l_t) < 1e-3 * max(1.0, abs(l_t)), (l_np, l_t)

    times: dict[str, list[float]] = {"numpy": [], "torch": []}
    while len(times["torch"]) < repeats:
        for name, fn in (("numpy", step_numpy), ("torch", step_torch)):
            time.sleep(pause)  # let the other library's worker threads go idle
            for _ in range(warmup):
                fn()
            for _ in range(min(block, repeats - len(times[name]))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {k: (statistics.median(v) * 1e3, min(v) * 1e3) for k, v in times.items()}


def time_pair(fn_np, fn_torch, repeats: int, block: int, pause: float) -> tuple[float, float]:
    """Median seconds of two callables, timed in alternating blocks (see the module docstring)."""
    times: dict[int, list[float]] = {0: [], 1: []}
    while len(times[1]) < repeats:
        for i, fn in enumerate((fn_np, fn_torch)):
            time.sleep(pause)
            fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def gemm_breakdown(n_inputs, n_hidden, num_classes, batch, repeats, block, pause, seed=0) -> None:
    """Every matrix product of one training step, NumPy (as ``numpy_nn.Linear`` computes it)
    against ``torch.mm``/``torch.addmm`` on the same operands: where the time goes and which
    library's sgemm is faster on each shape."""
    rng = np.random.default_rng(seed)
    widths = [n_inputs, *n_hidden, num_classes]
    rows = []
    for i, (d, m) in enumerate(zip(widths[:-1], widths[1:])):
        x = rng.standard_normal((batch, d), dtype=np.float32)
        dy = rng.standard_normal((batch, m), dtype=np.float32)
        w = rng.standard_normal((m, d), dtype=np.float32)  # row-major (M, D), as Linear stores W
        b = np.zeros(m, np.float32)
        gw = np.zeros_like(w)
        tx, tdy, tw, tb = (torch.from_numpy(np.ascontiguousarray(a)) for a in (x, dy, w, b))
        tgw = torch.empty(m, d)
        # (operands bound as default arguments: each lambda keeps this layer's arrays)
        products = [
            (
                f"layer {i + 1} forward  Y = X Wᵀ + b",
                lambda x=x, w=w, b=b: np.add(x @ w.T, b),
                lambda x=tx, w=tw, b=tb: torch.addmm(b, x, w.T),
            ),
            (
                f"layer {i + 1} backward dW = dYᵀ X",
                lambda x=x, dy=dy, gw=gw: np.matmul(dy.T, x, out=gw),
                lambda x=tx, dy=tdy, gw=tgw: torch.mm(dy.T, x, out=gw),
            ),
        ]
        if i > 0:  # the first layer's input (the data) needs no gradient
            products.append(
                (f"layer {i + 1} backward dX = dY W", lambda dy=dy, w=w: dy @ w, lambda dy=tdy, w=tw: dy @ w)
            )
        for name, fn_np, fn_t in products:
            t_np, t_t = time_pair(fn_np, fn_t, repeats, block, pause)
            rows.append((f"{name} ({batch}x{d}, {m})", t_np, t_t))
    print("\n| product (batch x in, out) | numpy ms | torch ms | numpy/torch |")
    print("|---|---:|---:|---:|")
    for name, t_np, t_t in rows:
        print(f"| {name} | {t_np * 1e3:.3f} | {t_t * 1e3:.3f} | {t_np / t_t:.2f} |")
    tot_np, tot_t = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"| **all products** | {tot_np * 1e3:.3f} | {tot_t * 1e3:.3f} | {tot_np / tot_t:.2f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30, help="timed iterations per side")
    ap.add_argument("--block", type=int, default=5, help="timed iterations per side in a row")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations before each block")
    ap.add_argument("--pause", type=float, default=0.2, help="seconds of sleep between blocks")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also time every matrix product of the wide network on its own, numpy vs torch",
    )
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    print(
        f"numpy {np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
        f"repeats={args.repeats} in blocks of {args.block}\n"
    )
    print("| config | batch | numpy ms | torch ms | numpy/torch | numpy/torch (min) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, d, hidden, c, batch in CONFIGS:
        r = bench_config(d, hidden, c, batch, args.repeats, args.warmup, args.block, args.pause)
        (np_med, np_min), (t_med, t_min) = r["numpy"], r["torch"]
        cells = [name, batch, f"{np_med:.2f}", f"{t_med:.2f}", f"{np_med / t_med:.2f}"]
        cells.append(f"{np_min / t_min:.2f}")
        print("| " + " | ".join(map(str, cells)) + " |")
    if args.breakdown:
        name, d, hidden, c, batch = CONFIGS[-1]
        print(f"\nMatrix products of {name} (batch {batch}), each timed alone:")
        gemm_breakdown(d, hidden, c, batch, args.repeats, args.block, args.pause)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
