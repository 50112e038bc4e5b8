"""``cifarlab sweep table1``: the seed's Table 1, seven PyTorch MLP configurations, re-run.

Like the seed's code, every hidden Linear is followed by ELU and then BatchNorm1d; batch 200,
evaluation every 100 steps, the seed preprocessing. Each configuration runs ``--seeds`` times.
"""

from __future__ import annotations

import argparse
import statistics

from cifarlab.errors import UsageError
from cifarlab.study.sweeps import common
from cifarlab.training.config import FIRST_SEED, parse_int_list

# (hidden, optimizer, lr, steps, the seed's test accuracy): spec.md, Part 2
CONFIGS = [
    ("100", "sgd", 1e-3, 1400, 0.421),
    ("100", "adam", 1e-3, 1400, 0.519),
    ("100,100", "adam", 1e-3, 1400, 0.521),
    ("100,100", "adam", 1e-3, 3000, 0.529),
    ("500,300", "adam", 1e-3, 3000, 0.546),
    ("500,300", "adam", 1e-2, 3000, 0.532),
    ("500,300,100", "adam", 1e-3, 3000, 0.555),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_sweep_args(p, "table1")
    p.add_argument("--configs", default="1,2,3,4,5,6,7", help="which rows of Table 1 (default: all)")
    p.add_argument(
        "--bn-first", action="store_true", help="Linear -> BatchNorm -> ELU instead of the seed's order"
    )


def parse_configs(text: str) -> list[int]:
    """ "1,3,5" -> [1, 3, 5]; every row must be one of Table 1's (1..7), each once."""
    try:
        rows = [int(c) for c in text.split(",")]
    except ValueError:
        raise UsageError(
            f"--configs {text!r}: expected comma-separated row numbers 1..{len(CONFIGS)}"
        ) from None
    bad = [r for r in rows if not 1 <= r <= len(CONFIGS)]
    if bad or len(set(rows)) != len(rows):
        raise UsageError(f"--configs {text!r}: rows must be distinct numbers in 1..{len(CONFIGS)}")
    return rows


def jobs(rows, seeds, bn_first: bool = False) -> list[common.Job]:
    """The runs of Table 1's ``rows`` (1..7) over ``seeds``, as the seed's code built them."""
    out = []
    for i in rows:
        hidden, opt, lr, steps, _ = CONFIGS[i - 1]
        for seed in seeds:
            settings = {"dnn_hidden_units": parse_int_list(hidden), "optimizer": opt, "learning_rate": lr,
                        "max_steps": steps, "norm": "batch", "seed": seed}  # fmt: skip
            if not bn_first:
                settings["norm_after_activation"] = True
            out.append(common.Job(f"config{i}-seed{seed}", "mlp", settings))
    return out


def main(args: argparse.Namespace) -> int:
    common.set_folders(args, "table1")
    rows = parse_configs(args.configs)
    jobs_ = jobs(rows, [FIRST_SEED + s for s in range(args.seeds)], args.bn_first)
    runs = common.run_jobs(jobs_, args)
    lines = [
        "# Table 1 — the seed's PyTorch MLP configurations, re-run",
        "",
        f"Command: `cifarlab sweep table1 --seeds {args.seeds}`"
        + (f" --max-steps {args.max_steps}" if args.max_steps else "")
        + (
            " --bn-first. Linear → BatchNorm1d → ELU"
            if args.bn_first
            else ". Linear → ELU → BatchNorm1d (the seed's code)"
        )
        + " per hidden layer, batch 200, seed preprocessing;",
        f"ours = final test accuracy, mean ± std over {args.seeds} seed(s) ({FIRST_SEED}, {FIRST_SEED + 1}, ...). Run directories: "
        f"`{args.out_root}/`.",
        "",
        "| # | hidden | optimizer | lr | steps | seed's accuracy | ours | best during run | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    series = {}
    for i in rows:
        hidden, opt, lr, steps, seed_acc = CONFIGS[i - 1]
        rs = [runs[f"config{i}-seed{FIRST_SEED + s}"] for s in range(args.seeds)]
        sums = [r.read_summary() for r in rs]
        acc = [s["test_accuracy"] for s in sums]
        best = [s["best_test_accuracy"] for s in sums]
        wall = statistics.mean(s["wall_seconds"] for s in sums)
        lines.append(
            f"| {i} | {hidden} | {opt} | {lr:g} | {sums[0]['steps']} | {seed_acc:.3f} | {common.mean_std(acc)} "
            f"| {common.mean_std(best)} | {wall:.1f} |"
        )
        series[f"{i}: {hidden} {opt} lr={lr:g}"] = common.mean_curve(rs)
    title = "Table 1 configurations: test accuracy (mean over seeds)"
    common.publish(args, "table1", lines, [common.Figure("table1", series, "step", "test accuracy", title)])
    return 0
