"""The ConvNet seed protocol end to end: ``cifarlab train convnet`` against a plain PyTorch loop
of the same model and math, each a whole process (start-up, data loading and evaluation
included), launched alternately in one run on one machine.

    CIFARLAB_DATA=../shared/cifar10 python benchmarks/bench_protocol.py --rounds 2
    CIFARLAB_DATA=../shared/cifar10 python benchmarks/bench_protocol.py --steps 100 --rounds 1   # a quick look

The protocol is the seed's: Adam (lr 1e-4) on batches of 32, per-pixel mean subtraction, no
augmentation, ``--steps`` steps (500), then one evaluation of the whole test set. The plain
loop (``plain_loop`` below) is what a PyTorch user writes for it: NCHW tensors, a new
``torch.optim.Adam``, evaluation under ``model.eval()`` + ``torch.no_grad()`` in batches of 200,
as the seed did. Prints each launch's wall time and test accuracy, the medians, the ratio
cifarlab / plain, and the CPU's model and instruction sets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def plain_loop(steps: int, seed: int) -> float:
    """The seed protocol written plainly; returns the test accuracy."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cifarlab.data import load_cifar10
    from cifarlab.models import create_model

    x_train, y_train, x_test, y_test = load_cifar10()
    mean = x_train.mean(axis=0, dtype=np.float64).astype(np.float32)  # per pixel, as the seed

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.float32) - mean).permute(0, 3, 1, 2).contiguous()

    torch.manual_seed(seed)
    model = create_model("convnet")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x_train))
    model.train()
    for step in range(steps):
        idx = order[(step * 32) % (len(order) - 31) :][:32]
        loss = F.cross_entropy(model(tensor(x_train[idx])), torch.from_numpy(y_train[idx]).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x_test), 200):
            pred = model(tensor(x_test[i : i + 200])).argmax(1)
            correct += int((pred == torch.from_numpy(y_test[i : i + 200]).long()).sum())
    return correct / len(x_test)


def cpu_description() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    sets = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(sets) or 'no AVX2'}"


def launch(kind: str, steps: int, seed: int, extra: list[str]) -> tuple[float, float]:
    """One whole process; (wall seconds, test accuracy)."""
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "cifarlab":
            cmd = [sys.executable, "-m", "cifarlab", "train", "convnet", "--preset", "seed", "--max-steps", str(steps),
                   "--eval-freq", str(steps), "--seed", str(seed), "--no-progress", "--out", f"{tmp}/run", *extra]  # fmt: skip
        else:
            cmd = [sys.executable, __file__, "--plain", "--steps", str(steps), "--seed", str(seed)]
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        if kind == "cifarlab":
            acc = json.loads(Path(f"{tmp}/run/summary.json").read_text())["test_accuracy"]
        else:
            acc = float(r.stdout.split()[-1])
    return wall, acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--rounds", type=int, default=2, help="launches of each (alternating, cifarlab first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cifarlab-args", default="", help="extra `cifarlab train` flags, e.g. '--precision bf16'"
    )
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # the plain loop's own process
    args = p.parse_args(argv)
    if args.plain:
        print(plain_loop(args.steps, args.seed))
        return 0
    print(
        f"CPU: {cpu_description()}; ConvNet seed protocol, {args.steps} steps + 1 test evaluation", flush=True
    )
    times: dict[str, list[float]] = {"cifarlab": [], "plain": []}
    for r in range(args.rounds):
        for kind in ("cifarlab", "plain"):
            wall, acc = launch(kind, args.steps, args.seed, args.cifarlab_args.split())
            times[kind].append(wall)
            print(f"round {r + 1} {kind:8s} {wall:7.1f} s  test accuracy {acc:.4f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median: cifarlab {med['cifarlab']:.1f} s, plain loop {med['plain']:.1f} s, "
          f"ratio cifarlab/plain {med['cifarlab'] / med['plain']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
