"""``cifarlab sweep seeds MODEL``: one training recipe over several seeds -> mean ± std.

    cifarlab sweep seeds mlp-numpy --seeds 3 --extra='--preset best'

Writes ``results/<name>.md`` (per-seed rows and mean ± std of final and best test accuracy,
wall seconds) and ``results/<name>.png`` (test accuracy curves of every seed).
"""

from __future__ import annotations

import argparse
import statistics

from cifarlab.errors import UsageError
from cifarlab.recipes import RECIPES
from cifarlab.sweeps.common import Figure, Job, add_sweep_args, mean_std, publish, run_jobs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", choices=list(RECIPES), help="what `cifarlab train` trains")
    p.add_argument("--name", help="results file name (default: <model>-seeds)")
    add_sweep_args(p, "seeds")


def main(args: argparse.Namespace) -> int:
    name = args.name or f"{args.model}-seeds"
    if args.out_root == "runs/sweeps/seeds":
        args.out_root = f"runs/sweeps/{name}"
    if args.results == "runs/sweeps/seeds":
        args.results = f"runs/sweeps/{name}"
    if "--seed" in args.extra.split():
        raise UsageError("--extra must not set --seed: the sweep chooses the seeds")
    seeds = [42 + s for s in range(args.seeds)]
    runs = run_jobs([Job(f"seed{s}", [args.model, "--seed", str(s)]) for s in seeds], args)
    sums = {s: runs[f"seed{s}"].read_summary() for s in seeds}
    cmd = f"cifarlab sweep seeds {args.model} --seeds {args.seeds}" + (
        f" --extra='{args.extra}'" if args.extra else ""
    )
    lines = [
        f"# {name}: `cifarlab train {args.model} {args.extra}` over {args.seeds} seeds",
        "",
        f"Command: `{cmd}`. Run directories: `{args.out_root}/`.",
        "",
        "| seed | final test accuracy | best test accuracy | wall seconds | train images/s |",
        "|---|---|---|---|---|",
    ]
    for s, m in sums.items():
        lines.append(
            f"| {s} | {m['test_accuracy']:.4f} | {m['best_test_accuracy']:.4f} | {m['wall_seconds']:.1f} | {m['images_per_second']:.0f} |"
        )
    acc = [m["test_accuracy"] for m in sums.values()]
    best = [m["best_test_accuracy"] for m in sums.values()]
    wall = [m["wall_seconds"] for m in sums.values()]
    lines.append(
        f"| **mean ± std** | **{mean_std(acc)}** | {mean_std(best)} | {statistics.mean(wall):.1f} | |"
    )
    series = {
        f"seed {s}": (
            [m["step"] for m in runs[f"seed{s}"].read_metrics()],
            [m["test_acc"] for m in runs[f"seed{s}"].read_metrics()],
        )
        for s in seeds
    }
    publish(args, name, lines, [Figure(name, series, "step", "test accuracy", name)])
    return 0
