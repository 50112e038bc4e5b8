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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cifarlab.errors import CheckpointError, CifarlabError, UsageError, json_safe
from cifarlab.files import parse_json, read_bytes
from cifarlab.training.runs import CHECKPOINT_DIRS, CONFIG_FILE, RunDir

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


# -- reading one run directory ---------------------------------------------------------------
class Damaged(Exception):
    """A run directory file that cannot be read; the message is the short reason for its row."""


@dataclass
class Run:
    """What a run directory holds, read once. A damaged one has ``problem`` set and holds
    whatever could be read before the damage."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    diverged: dict[str, Any] | None = None
    problem: str | None = None

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        """The records with a test accuracy (the others hold only a training loss)."""
        return [m for m in self.metrics if is_number(m.get("test_acc"))]

    def final_accuracy(self) -> tuple[float | None, bool]:
        """(test accuracy, partial): the summary's, else the last evaluation's (partial)."""
        if self.summary is not None:
            return self.summary["test_accuracy"], False
        evaluations = self.evaluations
        return (evaluations[-1]["test_acc"], True) if evaluations else (None, False)

    def wall_seconds(self) -> float | None:
        """The summary's wall time, else the time of the last record (how long it ran so far)."""
        if self.summary is not None and is_number(self.summary.get("wall_seconds")):
            return self.summary["wall_seconds"]
        seconds = self.metrics[-1].get("seconds") if self.metrics else None
        return seconds if is_number(seconds) else None


def read_run(path: Path) -> Run:
    """Read config.json, metrics.jsonl, summary.json and diverged.json of ``path``; a file
    that cannot be read sets ``problem`` instead of raising."""
    run = Run(path)
    rundir = RunDir(path)
    try:
        run.config = _read_config(rundir.config_path)
        run.metrics = _read_metrics(rundir)
        run.summary = _read_optional(rundir.summary_path, _check_summary)
        run.diverged = _read_optional(rundir.diverged_path, _check_diverged)  # {step, message}
    except Damaged as e:
        run.problem = str(e)
    return run


def _read_config(path: Path) -> dict[str, Any]:
    config = _read_json(path)
    if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
        raise Damaged(f"{path.name} has no train settings")
    return config


def _read_metrics(rundir: RunDir) -> list[dict[str, Any]]:
    try:
        return rundir.read_metrics()
    except CheckpointError as e:  # "<run>/metrics.jsonl:7: damaged (...)": the row names the run
        raise Damaged(str(e).removeprefix(f"{rundir.path}{os.sep}")) from None
    except (OSError, ValueError) as e:
        raise Damaged(f"{rundir.metrics_path.name} is unreadable ({_why(e)})") from None


def _read_optional(path: Path, check: Callable[[Path, Any], None]) -> dict[str, Any] | None:
    """The JSON object in ``path`` if the file exists, after ``check`` (which raises Damaged)."""
    if not path.exists():
        return None
    obj = _read_json(path)
    check(path, obj)
    return obj


def _check_summary(path: Path, summary: Any) -> None:
    if not isinstance(summary, dict) or not is_number(summary.get("test_accuracy")):
        raise Damaged(f"{path.name} has no test_accuracy")


def _check_diverged(path: Path, diverged: Any) -> None:
    if not isinstance(diverged, dict) or not isinstance(diverged.get("step"), int):
        raise Damaged(f"{path.name} has no step")


def _read_json(path: Path) -> Any:
    """A file of the run through the one hardened reader (cifarlab.files.read_bytes/parse_json)."""
    try:
        return parse_json(read_bytes(path), path.name)
    except CifarlabError as e:
        why = str(e).split(": damaged, ", 1)[-1]
        raise Damaged(f"{path.name} is {why}" if why.startswith("not ") else f"{path.name}: {why}") from None
    except OSError as e:
        raise Damaged(f"{path.name} is unreadable ({_why(e)})") from None


def _why(e: Exception) -> str:
    return getattr(e, "strerror", None) or type(e).__name__


def is_number(x: Any) -> bool:
    """A JSON number (not a bool, which Python counts as an int)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def lock_holder(rundir: RunDir) -> int | None:
    """The pid in ``.lock`` if that process is alive, else None (no lock, or a stale one).

    ``RunDir.unlock`` removes the file, so one that is left names a process that was killed;
    the pid is checked, not the ``flock``, because probing the flock would take it for a moment
    and could make a starting ``train --resume`` fail as if the run were busy."""
    try:
        pid = int(rundir.lock_path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    if pid <= 0:  # kill(0) and kill(-n) would signal process groups
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def status(run: Run) -> tuple[str, str | None]:
    """(one of STATUSES, a note or None). A live writer comes first (an extended run has no
    summary until it ends again); a summary outranks diverged.json (a diverged run resumed
    from its last good checkpoint and finished)."""
    if run.problem is not None:
        return "damaged", run.problem
    if lock_holder(RunDir(run.path)) is not None:
        return "running", None
    if run.summary is not None:
        return "finished", None
    if run.diverged is not None:
        return "diverged", f"at step {run.diverged['step']}"
    return "interrupted", None


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
