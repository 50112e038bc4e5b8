"""``cifarlab runs``: every run directory below some folders, one row each, oldest first.

A row says what a run is (model, preset), how far it got (steps reached / planned), what it
scored and in how long, and whether it finished, is running, diverged, was interrupted, or is
damaged. A damaged run is a row saying why, never a crash: listing runs is how one finds them.
Nothing is written, and no lock is taken or removed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cifarlab.errors import UsageError, json_safe
from cifarlab.training.runs import CHECKPOINT_DIRS, CONFIG_FILE, read_run, status

STATUSES = ("finished", "running", "diverged", "interrupted", "damaged")
NOT_RUNS = CHECKPOINT_DIRS  # a run's own folders, never searched
NONE = "—"
PARTIAL = "* last evaluation of a run that has not finished"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "folders", nargs="*", default=["runs"], metavar="FOLDER", help="where to look (default: runs/)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON list of rows instead of a table")


def main(args: argparse.Namespace) -> int:
    rows = list_runs(args.folders)
    if args.json:
        print(json.dumps(json_safe([asdict(r) for r in rows]), indent=2, allow_nan=False))
    else:
        print(render(rows))
    return 0


# -- finding and listing ---------------------------------------------------------------------
@dataclass
class Row:
    """One line of ``cifarlab runs`` (and one object of ``--json``)."""

    run: str
    path: str
    model: str | None
    preset: str | None
    steps: int | None
    max_steps: int | None
    test_accuracy: float | None
    partial: bool  # test_accuracy is the last evaluation of a run that has no summary
    wall_seconds: float | None
    date: str  # config.json's modification time, local
    status: str
    note: str | None  # why a run is damaged, or the step at which it diverged


def find_runs(folder: Path) -> Iterator[Path]:
    """Every directory below ``folder`` (itself included) that holds a config.json. Hidden
    folders (.git, .venv: other tools' config.json files) are not searched."""
    for dirpath, dirnames, filenames in os.walk(folder):
        is_run = CONFIG_FILE in filenames
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (is_run and d in NOT_RUNS))
        if is_run:
            yield Path(dirpath)


def list_runs(folders: Sequence[str]) -> list[Row]:
    """The rows of every run below ``folders``, by date; refuses a missing folder and
    folders that hold no run at all."""
    seen: set[Path] = set()
    rows = []
    for folder in map(Path, folders):
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder} is a file: name a folder of run directories (cifarlab runs FOLDER)")
        if not folder.is_dir():
            raise UsageError(
                f"folder {folder} does not exist: name another (cifarlab runs FOLDER) or train a run "
                "first (e.g. `cifarlab train mlp-numpy`)"
            )
        for path in find_runs(folder):
            if path.resolve() not in seen:
                seen.add(path.resolve())
                rows.append(make_row(path, _label(path, folder, several=len(folders) > 1)))
    if not rows:
        raise UsageError(
            f"no run directories in {', '.join(folders)}: name another folder, or train a run first "
            "(e.g. `cifarlab train mlp-numpy`)"
        )
    return sorted(rows, key=lambda r: (r.date, r.run))


def _label(path: Path, folder: Path, several: bool) -> str:
    """The run's path relative to its folder, or as found when that would be ambiguous
    (several folders); its own name when the folder is the run."""
    label = path if several else path.relative_to(folder)
    return path.resolve().name if label == Path(".") else str(label)


def make_row(path: Path, label: str) -> Row:
    """The row of the run in ``path``; a damaged run's row shows what could be read."""
    run = read_run(path)
    state, note = status(run)
    value, partial = run.final_accuracy()
    train = run.config.get("train", {})
    return Row(
        run=label,
        path=str(path),
        model=run.config.get("model"),
        preset=run.config.get("preset"),
        steps=run.metrics[-1]["step"] if run.metrics else None,
        max_steps=train.get("max_steps"),
        test_accuracy=value,
        partial=partial,
        wall_seconds=run.wall_seconds(),
        date=_date(path / CONFIG_FILE),
        status=state,
        note=note,
    )


def _date(path: Path) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    except OSError:
        return NONE


# -- printing --------------------------------------------------------------------------------
def render(rows: Sequence[Row]) -> str:
    """The aligned table, a footer counting the statuses, and what a starred accuracy means."""
    header = ["run", "model", "preset", "steps", "test acc", "wall time", "date", "status"]
    lines = table(header, [_cells(r) for r in rows])
    counts = Counter(r.status for r in rows)
    parts = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s])
    lines += ["", f"{len(rows)} run{'s' * (len(rows) != 1)} ({parts})"]
    if any(r.partial for r in rows):
        lines.append(PARTIAL)
    return "\n".join(lines)


def printable(text: Any) -> str:
    """A value for the terminal: control characters (escape sequences, newlines) as '?', so a
    hostile run name cannot move the cursor, recolour or fake lines of the table."""
    return "".join("?" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in str(text))


def _cells(r: Row) -> list[str]:
    return [printable(c) for c in _raw_cells(r)]


def _raw_cells(r: Row) -> list[str]:
    steps = f"{_text(r.steps)}/{_text(r.max_steps)}"
    state = r.status if r.note is None else f"{r.status}: {r.note}"
    return [
        r.run,
        _text(r.model),
        _text(r.preset),
        steps,
        accuracy(r.test_accuracy, r.partial),
        duration(r.wall_seconds),
        r.date,
        state,
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table whose columns line up in a terminal too."""
    widths = [max(len(c) for c in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def accuracy(value: float | None, partial: bool) -> str:
    """0.8713, or 0.6639* for the last evaluation of an unfinished run (see PARTIAL)."""
    return NONE if value is None else f"{value:.4f}{'*' * partial}"


def duration(seconds: float | None) -> str:
    """4.6 s, 37.7 min, 2.3 h."""
    if seconds is None:
        return NONE
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _text(value: Any) -> str:
    return NONE if value is None else str(value)
