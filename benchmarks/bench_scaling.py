"""Data-parallel scaling on this CPU: the ConvNet trained by cifarlab's trainer in one process
with 2 threads against a torchrun job of 2 processes with 1 thread each (gloo, DDP), at the
same global batch.

Each configuration is a whole launch (``python`` or ``torchrun``), run alternately
``--rounds`` times so background load hits both alike. Inside, after 2 warm-up steps,
``--steps`` training steps and one evaluation of ``--eval-images`` images (split between the
ranks) are timed with the real ``TorchLearner``; rank 0 prints the result as JSON.

    python benchmarks/bench_scaling.py
    python benchmarks/bench_scaling.py --batch-sizes 32,256 --steps 20 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {"1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnet")
    p.add_argument("--preset", default="seed")
    p.add_argument("--batch-sizes", default="32,128", help="global batch sizes, comma-separated")
    p.add_argument("--steps", type=int, default=15, help="timed training steps per launch")
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2, help="launches per configuration (alternating)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One process of a launch: time the trainer; rank 0 prints JSON."""
    import numpy as np

    from cifarlab.data import Batches, Preprocess
    from cifarlab.training import distributed
    from cifarlab.training.distributed import Dist
    from cifarlab.training.recipes import RECIPES
    from cifarlab.training.torch_learner import TorchLearner

    dist = Dist.from_env()
    cfg = RECIPES[args.model].make_config(args.preset, batch_size=args.batch_size, precision="fp32")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(10_000, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=10_000)
    learner = TorchLearner.create(args.model, cfg, Preprocess.fit(cfg.preprocess, x), "cpu", dist)
    data, test = learner.put(x, y), learner.put(x[: args.eval_images], y[: args.eval_images])
    batches = Batches(x, y, cfg.batch_size, seed=0, augment=cfg.augment)
    for s in range(2):
        learner.step(data, batches.plan(s), 1e-4)
    learner.take_running()  # all ranks in step
    t0 = time.perf_counter()
    for s in range(2, 2 + args.steps):
        learner.step(data, batches.plan(s), 1e-4)
    learner.take_running()  # waits for every rank
    train = time.perf_counter() - t0
    t0 = time.perf_counter()
    learner.evaluate(test)
    ev = time.perf_counter() - t0
    if dist.is_main:
        print(
            json.dumps(
                {"train_img_s": args.steps * cfg.batch_size / train, "eval_img_s": args.eval_images / ev}
            )
        )
    del learner, data, test  # DDP's reducer holds the process group: free it before the group goes
    if dist.active:
        distributed.shutdown()


def launch(args: argparse.Namespace, nproc: int, threads: int, batch: int) -> dict:
    me = [os.path.abspath(__file__), "--worker", "--model", args.model, "--preset", args.preset]
    me += ["--batch-size", str(batch), "--steps", str(args.steps), "--eval-images", str(args.eval_images)]
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *me,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from cifarlab.training.runs import machine

    m = machine()
    print(f"CPU: {m['cpu']}, {m['cores']} cores, isa {m.get('isa')}")
    print(f"{args.model} --preset {args.preset}, fp32, {args.steps} timed steps + {args.eval_images}-image evaluation, "
          f"{args.rounds} alternating launches per configuration; medians")  # fmt: skip
    print()
    print("| global batch | configuration | train img/s | eval img/s | train vs 1x2 | eval vs 1x2 |")
    print("|---:|---|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
        for _ in range(args.rounds):
            for name, (nproc, threads) in CONFIGS.items():
                results[name].append(launch(args, nproc, threads, batch))
        med = {
            n: (
                statistics.median(r["train_img_s"] for r in rs),
                statistics.median(r["eval_img_s"] for r in rs),
            )
            for n, rs in results.items()
        }
        base = med[next(iter(CONFIGS))]
        for name, (tr, ev) in med.items():
            print(f"| {batch} | {name} | {tr:.1f} | {ev:.1f} | {tr / base[0]:.2f}x | {ev / base[1]:.2f}x |")


if __name__ == "__main__":
    main()
