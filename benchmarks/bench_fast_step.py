"""One training step of ``cifarlab train fast`` (batch 1024, channels_last, its optimizer), in
eager mode against ``torch.compile``, alternating in one process; plus where the eager step's
time goes (torch.profiler, by operator) and the cost of an evaluation with and without
test-time augmentation.

    python benchmarks/bench_fast_step.py                 # 4 timed steps per variant, 2 rounds
    python benchmarks/bench_fast_step.py --steps 2 --rounds 1 --no-compile   # a quick look

The inputs are random (a step's time does not depend on the pixel values). Compilation is
timed separately: its first call, which ``cifarlab train`` would pay once per run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench_protocol import cpu_description
from cifarlab.models import create_model
from cifarlab.training.recipes import FAST, FastConfig
from cifarlab.training.torch_learner import make_optimizer


def make_step(model: torch.nn.Module, opt: torch.optim.Optimizer, smoothing: float):
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def timed(fn, *args, n: int) -> float:
    """Median seconds of ``n`` calls."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def per_layer(model: torch.nn.Module, x: torch.Tensor, n: int) -> None:
    """Each convolution alone, forward + backward (weights and input gradients, as in training),
    in channels_last and in NCHW memory: its time and GFLOP/s."""
    shapes: dict[str, tuple] = {}

    def record(name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            shapes[name] = (inputs[0].shape, module)

        return hook

    hooks = [
        m.register_forward_hook(record(name))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    print("\nconvolutions alone, forward + backward (median of", n, "calls):")
    for name, (shape, conv) in shapes.items():
        w = conv.weight.detach().clone().requires_grad_(True)
        out_hw = (shape[2] - conv.kernel_size[0] + 1) * (shape[3] - conv.kernel_size[1] + 1)
        if conv.padding == "same":
            out_hw = shape[2] * shape[3]
        flops = 2 * shape[0] * out_hw * conv.out_channels * conv.in_channels * conv.kernel_size[0] ** 2
        grads_in = name != "whiten"  # the whitening layer's input is the image: no gradient needed
        row = []
        for fmt in (torch.channels_last, torch.contiguous_format):
            xi = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(grads_in)
            wf = w.contiguous(memory_format=fmt).detach().requires_grad_(name != "whiten")

            def fwd_bwd(xi: torch.Tensor, wf: torch.Tensor, padding: str | int) -> None:
                out = F.conv2d(xi, wf, padding=padding)
                if out.requires_grad:
                    out.backward(torch.ones_like(out))

            fwd_bwd(xi, wf, conv.padding)
            s = timed(fwd_bwd, xi, wf, conv.padding, n=n)
            passes = 1 + xi.requires_grad + wf.requires_grad  # forward, input grad, weight grad
            row.append(f"{s * 1e3:7.0f} ms {passes * flops / s / 1e9:5.0f} GFLOP/s")
        print(f"  {name:18s} {str(tuple(shape)):20s} channels_last {row[0]} | NCHW {row[1]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=FAST["batch_size"])
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--layers", action="store_true", help="also time each convolution alone")
    p.add_argument("--layers-only", action="store_true", help="only time each convolution alone")
    args = p.parse_args()
    cfg = FastConfig(**{k: v for k, v in FAST.items()})
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    model = create_model("fast").to(memory_format=torch.channels_last)
    model.init_from_data(x.contiguous())
    model.train()
    opt = make_optimizer(cfg, model)
    for g in opt.param_groups:
        g["lr"] = 0.01 * g["lr_scale"]  # small: the weights stay sane over the timed steps
    eager = make_step(model, opt, cfg.label_smoothing)
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"batch {args.batch_size}; GFLOP per step ~ {0.7 * args.batch_size:.0f} (forward + backward)")

    if args.layers_only:
        per_layer(model, x, n=3)
        return
    eager(x, y)  # warm-up
    compiled = None
    if args.compile:
        t = time.perf_counter()
        compiled = torch.compile(eager)
        compiled(x, y)
        print(f"torch.compile: first call (compilation + one step) {time.perf_counter() - t:.1f} s")
        compiled(x, y)
    results: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        results["eager"].append(timed(eager, x, y, n=args.steps))
        if compiled is not None:
            results["compiled"].append(timed(compiled, x, y, n=args.steps))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s/step" for k, v in results.items() if v))
    e = statistics.median(results["eager"])
    print(f"eager: {e:.2f} s/step = {0.7 * args.batch_size / e:.0f} GFLOP/s")
    if results["compiled"]:
        c = statistics.median(results["compiled"])
        print(f"compiled: {c:.2f} s/step; compiled / eager = {c / e:.2f}")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eager(x, y)
    print("\nwhere an eager step's time goes (self CPU time, top operators):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

    if args.layers:
        per_layer(model, x, n=3)
    model.eval()
    xe = x[:1000]
    for level in (0, 2):
        model.tta = level
        with torch.inference_mode():
            s = timed(model, xe, n=2)
        print(
            f"evaluation, tta {level}: {len(xe) / s:.0f} images/s ({10_000 / (len(xe) / s):.0f} s for the test set)"
        )


if __name__ == "__main__":
    main()
