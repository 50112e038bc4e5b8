"""``cifarlab sweep seeds MODEL``: one training recipe over several seeds -> mean ± std.

    cifarlab sweep seeds mlp-numpy --seeds 3 --extra='--preset best'

Writes ``results/<name>.md`` (per-seed rows and mean ± std of final and best test accuracy,
wall seconds) and ``results/<name>.png`` (test accuracy curves of every seed).
"""

from __future__ import annotations

import argparse
import statistics

from cifarlab.study.sweeps import common
from cifarlab.training.config import FIRST_SEED
from cifarlab.training.recipes import RECIPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", choices=list(RECIPES), help="what `cifarlab train` trains")
    p.add_argument("--name", help="results file name (default: <model>-seeds)")
    common.add_sweep_args(p, "<model>-seeds")


def main(args: argparse.Namespace) -> int:
    name = args.name or f"{args.model}-seeds"
    common.set_folders(args, name)
    seeds = [FIRST_SEED + s for s in range(args.seeds)]
    runs = common.run_jobs([common.Job(f"seed{s}", args.model, {"seed": s}) for s in seeds], args)
    sums = {s: runs[f"seed{s}"].read_summary() for s in seeds}
    cmd = f"cifarlab sweep seeds {args.model} --seeds {args.seeds}"
    cmd += (f" --max-steps {args.max_steps}" if args.max_steps else "") + (
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
        f"| **mean ± std** | **{common.mean_std(acc)}** | {common.mean_std(best)} | {statistics.mean(wall):.1f} | |"
    )
    series = {f"seed {s}": common.mean_curve([runs[f"seed{s}"]]) for s in seeds}
    common.publish(args, name, lines, [common.Figure(name, series, "step", "test accuracy", name)])
    return 0
