"""Training and evaluation images/s of every torch recipe in fp32 and under bf16 autocast, on
this CPU, through cifarlab's own trainer (``TorchLearner``: device-side batches, autocast,
optimizer step), so the numbers are what ``cifarlab train --precision`` gets.

The precisions are timed in alternating blocks (``--block`` steps each) so that background
load hits both alike; medians per step. The CPU's instruction sets are printed first: bf16 is
native with AVX512-BF16 or AMX and emulated (slow) on AVX2-only CPUs, which is what
``--precision auto`` decides from.

    python benchmarks/bench_precision.py
    python benchmarks/bench_precision.py --models convnet --blocks 5 --block 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from cifarlab.data import Batches, Preprocess
from cifarlab.training.recipes import RECIPES
from cifarlab.training.runs import machine
from cifarlab.training.torch_learner import TorchLearner

# recipe -> (preset, overrides): each recipe's default preset, at a size that times in seconds
MODELS = {
    "mlp": ("best", {}),
    "convnet": ("best", {}),
    "efficientnet_lite0": ("finetune", {"pretrained": False, "image_size": 64}),
    "fast": ("default", {}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated recipes")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--blocks", type=int, default=3, help="alternating blocks per precision")
    p.add_argument("--block", type=int, default=3, help="timed training steps per block")
    p.add_argument("--eval-images", type=int, default=1000, help="images per timed evaluation")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    m = machine(torch.get_num_threads())
    print(
        "command: python benchmarks/bench_precision.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
    )
    print(f"CPU: {m['cpu']}, {m['cores']} cores, torch threads {m['threads']}, isa {m.get('isa')}")
    print(f"torch {torch.__version__}; {args.blocks} alternating blocks of {args.block} steps per precision")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5000, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=5000)
    precisions = args.precisions.split(",")
    rows = []
    for name in args.models.split(","):
        preset, overrides = MODELS[name]
        learners, data, batches = {}, {}, None
        for prec in precisions:
            cfg = RECIPES[name].make_config(preset, **overrides, precision=prec, threads=args.threads)
            learners[prec] = TorchLearner.create(name, cfg, Preprocess.fit(cfg.preprocess, x), "cpu")
            data[prec] = learners[prec].put(x, y)
            batches = Batches(x, y, cfg.batch_size, seed=0, augment=cfg.augment)
        step_times = {p: [] for p in precisions}
        eval_times = {p: [] for p in precisions}
        test = {p: learners[p].put(x[: args.eval_images], y[: args.eval_images]) for p in precisions}
        for p in precisions:  # warm-up: first-call allocations and oneDNN kernel selection
            learners[p].step(data[p], batches.plan(0), 1e-4)
        for b in range(args.blocks):
            for p in precisions:
                for s in range(args.block):
                    t0 = time.perf_counter()
                    learners[p].step(data[p], batches.plan(1 + b * args.block + s), 1e-4)
                    step_times[p].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                learners[p].evaluate(test[p])
                eval_times[p].append(time.perf_counter() - t0)
        bs = batches.batch_size
        for p in precisions:
            tr, ev = statistics.median(step_times[p]), statistics.median(eval_times[p])
            rows.append((name, p, bs, bs / tr, args.eval_images / ev))
    print()
    print("| model | precision | batch | train img/s | eval img/s | train vs fp32 | eval vs fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    base = {r[0]: r for r in rows if r[1] == "fp32"}
    for name, p, bs, tr, ev in rows:
        b = base.get(name)
        ratio = (f"{tr / b[3]:.2f}x", f"{ev / b[4]:.2f}x") if b else ("", "")
        print(f"| {name} | {p} | {bs} | {tr:.1f} | {ev:.1f} | {ratio[0]} | {ratio[1]} |")


if __name__ == "__main__":
    main()
