"""``cifarlab compare RUN RUN ...``: several runs' curves in one PNG, and what sets them apart.

The PNG overlays test accuracy (or ``--metric``) and training loss vs step, one line per run;
the printed tables list only the settings that differ (model, preset and config.json's
``train``), then each run's final test accuracy and wall time. Every run is read, and the
output path checked, before anything is written.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cifarlab.errors import CheckpointError, UsageError
from cifarlab.files import atomic_write_bytes
from cifarlab.study.runlist import NONE, PARTIAL, accuracy, duration, table
from cifarlab.training.runs import Run, RunDir, is_number, read_run

AXIS_LABELS = {
    "test_acc": "test accuracy",
    "test_loss": "test loss",
    "train_acc": "training accuracy",
    "train_loss": "training loss",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="two or more run directories")
    p.add_argument(
        "--out", default="compare.png", metavar="FILE.png", help="the figure (default: ./compare.png)"
    )
    p.add_argument(
        "--metric",
        default="test_acc",
        choices=[k for k in AXIS_LABELS if k != "train_loss"],
        help="what the first panel shows vs step (default: %(default)s; the second is training loss)",
    )


def main(args: argparse.Namespace) -> int:
    out = check_out(Path(args.out))
    runs = read_runs(args.runs)
    labels = run_labels(args.runs)
    atomic_write_bytes(out, plot_overlay({lab: r.metrics for lab, r in zip(labels, runs)}, args.metric))
    print(f"wrote {out}: {AXIS_LABELS[args.metric]} and training loss vs step\n")
    settings = differing_settings([r.config for r in runs])
    if settings:
        print("settings that differ:")
        print("\n".join(table(["setting", *labels], [[k, *v] for k, v in settings])))
    else:
        print("the runs share all settings")
    print()
    print("\n".join(results(runs, labels)))
    return 0


def check_out(out: Path) -> Path:
    """Refuse an --out that is not a .png file name, lies in no folder, or is not a file."""
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out} is not a .png file name; e.g. --out compare.png")
    if not out.parent.is_dir():
        what = "is a file" if out.parent.exists() else "does not exist"
        raise UsageError(f"--out {out}: folder {out.parent} {what}; create it or choose another --out")
    if out.exists() and not out.is_file():
        raise UsageError(f"--out {out} exists and is not a file; choose another --out")
    return out


def read_runs(paths: Sequence[str]) -> list[Run]:
    """Every named run, fully read; refuses fewer than two, one named twice, and a missing or
    damaged run (naming it)."""
    if len(paths) < 2:
        raise UsageError("compare needs at least two run directories: cifarlab compare RUN RUN [RUN ...]")
    runs, seen = [], set()
    for path in paths:
        rundir = RunDir.open(path)
        if rundir.path.resolve() in seen:
            raise UsageError(f"{path} is named twice; compare different runs")
        seen.add(rundir.path.resolve())
        run = read_run(rundir.path)
        if run.problem is not None:
            raise CheckpointError(f"run {path} is damaged ({run.problem}); leave it out of the comparison")
        runs.append(run)
    return runs


def run_labels(paths: Sequence[str]) -> list[str]:
    """Each run's directory name, or the paths as given when two names are the same."""
    names = [Path(p).resolve().name for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def plot_overlay(curves: dict[str, list[dict[str, Any]]], metric: str) -> bytes:
    """A PNG of two panels, ``metric`` and training loss vs step, one line (of one colour in
    both panels) per named list of metrics records; records without the value are skipped."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, (metric, "train_loss")):
        for i, (label, records) in enumerate(curves.items()):
            points = [(m["step"], m[key]) for m in records if is_number(m.get(key))]
            if points:
                ax.plot(*zip(*points), color=f"C{i}", marker="." if len(points) <= 50 else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(AXIS_LABELS[key])
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def differing_settings(configs: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(setting, value per run) for model, preset and every ``train`` key whose values are not
    all the same; a setting a run lacks shows as —."""
    keys = ["model", "preset", *dict.fromkeys(k for c in configs for k in c["train"])]
    rows = []
    for key in keys:
        values = [_setting(c if key in ("model", "preset") else c["train"], key) for c in configs]
        if len(set(values)) > 1:
            rows.append((key, values))
    return rows


def _setting(settings: dict[str, Any], key: str) -> str:
    if key not in settings:
        return NONE
    value = settings[key]
    return value if isinstance(value, str) else json.dumps(value)


def results(runs: Sequence[Run], labels: Sequence[str]) -> list[str]:
    """A table of each run's final test accuracy and wall time (* = the last evaluation of an
    unfinished run)."""
    accuracies = [r.final_accuracy() for r in runs]
    lines = table(
        ["result", *labels],
        [
            ["test accuracy", *(accuracy(a, p) for a, p in accuracies)],
            ["wall time", *(duration(r.wall_seconds()) for r in runs)],
        ],
    )
    if any(p for _, p in accuracies):
        lines.append(PARTIAL)
    return lines
