"""``cifarlab sweep norms``: no normalisation vs BatchNorm vs our LayerNorm, across batch sizes.

MLP 500,300 (ELU), Adam with lr 1e-3·sqrt(B/200) (square-root scaling), every run sees the
same number of training images (2 epochs), batch sizes 2, 8, 32, 200. BatchNorm's train/eval
gap: test accuracy with running statistics (eval mode, what is deployed) vs with the
statistics of test batches of the training batch size (train mode, what training saw).
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from cifarlab.study.sweeps import common
from cifarlab.training.config import FIRST_SEED

NORMS = ("none", "batch", "layer")
BATCHES = (2, 8, 32, 200)
IMAGES = 100_000  # training images per run


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_sweep_args(p, "norms", seeds=1)


def batch_stat_accuracy(run, x_test: np.ndarray, y_test: np.ndarray, batch_size: int) -> float:
    """Test accuracy in train mode: each test batch normalised by its own statistics."""
    import torch

    from cifarlab.training import checkpoints
    from cifarlab.training.torch_learner import logits_in_batches

    ckpt = checkpoints.load(run.checkpoint_dir)
    model = checkpoints.build_model(ckpt)
    model.train()  # BatchNorm normalises each test batch by its own statistics ...
    model.hidden.apply(lambda m: m.eval() if isinstance(m, torch.nn.Dropout) else None)  # ... dropout off
    n = len(x_test) // batch_size * batch_size  # whole batches only
    logits = logits_in_batches(model, x_test[:n], ckpt.preprocess, batch_size)
    return float((logits.argmax(1).numpy() == y_test[:n]).mean())


def jobs(seeds) -> list[common.Job]:
    """One run per norm, batch size and seed; every run sees IMAGES training images, with the
    learning rate scaled by sqrt(B / 200)."""
    out = []
    for norm in NORMS:
        for b in BATCHES:
            steps = IMAGES // b
            for s in seeds:
                settings = {"norm": norm, "dnn_hidden_units": [500, 300], "optimizer": "adam",
                            "learning_rate": float(f"{1e-3 * math.sqrt(b / 200):.3g}"), "batch_size": b,
                            "max_steps": steps, "eval_freq": max(1, steps // 10), "seed": s}  # fmt: skip
                out.append(common.Job(f"{norm}-b{b}-seed{s}", "mlp", settings))
    return out


def main(args: argparse.Namespace) -> int:
    common.set_folders(args, "norms")
    from cifarlab.data import load_cifar10

    seeds = [FIRST_SEED + s for s in range(args.seeds)]
    runs = common.run_jobs(jobs(seeds), args)
    _, _, x_test, y_test = load_cifar10(args.data_dir, verify=args.verify)

    acc = {
        (n, b): [runs[f"{n}-b{b}-seed{s}"].read_summary()["test_accuracy"] for s in seeds]
        for n in NORMS
        for b in BATCHES
    }
    wall = {
        (n, b): np.mean([runs[f"{n}-b{b}-seed{s}"].read_summary()["wall_seconds"] for s in seeds])
        for n in NORMS
        for b in BATCHES
    }
    gap = {
        b: [batch_stat_accuracy(runs[f"batch-b{b}-seed{s}"], x_test, y_test, b) for s in seeds]
        for b in BATCHES
    }
    head = " | ".join(f"B={b}" for b in BATCHES)
    lines = [
        "# LayerNorm vs BatchNorm vs none, across batch sizes",
        "",
        f"Command: `cifarlab sweep norms --seeds {args.seeds}`. MLP 500,300 ELU, Adam lr 1e-3·sqrt(B/200), "
        f"{IMAGES // 1000}k training images per run (2 epochs), seed preprocessing; {args.seeds} seed(s) per cell. "
        f"LayerNorm is `cifarlab.ops.layernorm.LayerNormManual` (hand-written backward). Run directories: `{args.out_root}/`.",
        "",
        f"| final test accuracy | {head} |",
        "|---|" + "---|" * len(BATCHES),
    ]
    for n in NORMS:
        lines.append(f"| {n} | " + " | ".join(common.mean_std(acc[n, b]) for b in BATCHES) + " |")
    lines.append(
        "| BatchNorm, test batches normalised by their own statistics (train mode) | "
        + " | ".join(common.mean_std(gap[b]) for b in BATCHES)
        + " |"
    )
    lines.append(
        "| BatchNorm train/eval gap (train mode − eval mode) | "
        + " | ".join(f"{np.mean(gap[b]) - np.mean(acc['batch', b]):+.4f}" for b in BATCHES)
        + " |"
    )
    lines += ["", f"| wall seconds per run | {head} |", "|---|" + "---|" * len(BATCHES)]
    for n in NORMS:
        lines.append(f"| {n} | " + " | ".join(f"{wall[n, b]:.1f}" for b in BATCHES) + " |")
    series = {n: (list(BATCHES), [float(np.mean(acc[n, b])) for b in BATCHES]) for n in NORMS}
    series["batch (train-mode stats)"] = (list(BATCHES), [float(np.mean(gap[b])) for b in BATCHES])
    title = "normalisation vs batch size (same number of images)"
    common.publish(
        args, "norms", lines, [common.Figure("norms", series, "batch size", "test accuracy", title)]
    )
    return 0
