"""The one writer and reader of run directories, shared by the NumPy and PyTorch trainers.

runs/<model>-<YYYYmmdd-HHMMSS>/    (or --out DIR)
  config.json     every setting, seed, data md5s, versions
  metrics.jsonl   one JSON record every --log-freq steps and at every evaluation: train loss and
                  accuracy (means since the previous record), lr; evaluations add test_loss, test_acc
  summary.json    test_accuracy (final), best_test_accuracy, steps, wall_seconds, ...,
                  per_class_accuracy and confusion (rows: true class) of the final evaluation
  curves.png      loss and accuracy vs step, train and test
  checkpoint/     weights (safetensors) + trainer state (cifarlab.training.checkpoints)
  tensorboard/    the records as TensorBoard event files (with --tensorboard)
  diverged.json   {"step", "message"} when the loss became NaN/inf (until the run is resumed)
  .lock           the pid of the one process writing it (train / --resume), while it runs

Two ways in: ``RunDir`` for the process that writes a run (create, lock, log, finish) and for
strict reads that must fail loudly (resume, eval); ``read_run`` for everything that only looks
(``cifarlab runs``, report, compare): a ``Run`` snapshot read once, where a damaged file
becomes ``Run.problem`` instead of an exception. Both read through cifarlab.files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifarlab.errors import CheckpointError, CifarlabError, RunLocked, UsageError
from cifarlab.files import (
    atomic_write_bytes,
    atomic_write_json,
    check_writable_dir,
    jsonable,
    parse_json,
    read_bytes,
)

# the layout of a run directory: every file and folder name, here and nowhere else
CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CURVES_FILE = (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "curves.png",
)
DIVERGED_FILE, LOCK_FILE, TENSORBOARD_DIR, CHECKPOINT_DIR = (
    "diverged.json",
    ".lock",
    "tensorboard",
    "checkpoint",
)
NEW_SUFFIX, OLD_SUFFIX = (
    ".tmp",
    ".old",
)  # a checkpoint being written, and the one it replaces (checkpoints.save)
CHECKPOINT_DIRS = (CHECKPOINT_DIR, CHECKPOINT_DIR + NEW_SUFFIX, CHECKPOINT_DIR + OLD_SUFFIX)
TENSORBOARD_SCALARS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")  # of a metrics record


def versions(libraries: tuple[str, ...] = ("numpy", "torch")) -> dict[str, str]:
    """Versions of Python, cifarlab and the libraries that decide a run's numbers
    (read from package metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for lib in ("cifarlab", *libraries):
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "not installed"
    return out


def machine(threads: int | None = None) -> dict[str, Any]:
    """The machine a run's times belong to: CPU model, cores, threads used and the instruction
    sets that decide speed (read from /proc/cpuinfo on Linux; "unknown" elsewhere)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = {
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": bool({"amx_bf16", "amx_tile"} & flags),
    }
    return {
        "cpu": model,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        **({"isa": isa} if flags else {}),
    }


def evaluations(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The metrics records of evaluations (those with a test accuracy; the others hold only a
    training loss); in run directories older than --log-freq every record is one."""
    return [m for m in records if is_number(m.get("test_acc"))]


def print_result(run: RunDir, summary: dict[str, Any]) -> None:
    print(
        f"test accuracy {summary['test_accuracy']:.4f} (best {summary['best_test_accuracy']:.4f}) "
        f"after {summary['steps']} steps in {summary['wall_seconds']:.1f} s"
    )
    print(f"run directory: {run.path}   curves: {run.curves_path}")


class RunDir:
    """A run directory. ``RunDir.create`` makes a new one; ``RunDir(path)`` opens one."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.created = False  # made by this process (so a failed start may remove it)

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls, model: str, out: str | os.PathLike | None = None, root: str | os.PathLike = "runs"
    ) -> RunDir:
        """A new run directory: ``out`` if given (it must be new or empty), else a fresh
        ``<root>/<model>-<YYYYmmdd-HHMMSS>`` (suffixed ``-2``, ``-3``... if taken)."""
        if out is not None:
            path = cls.check_new(out)
            existed = path.is_dir()
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"--out {path}: cannot create it ({e.strerror})") from None
            run = cls(path)
            run.created = not existed
            return run
        check_writable_dir(Path(root), "runs folder")
        base = Path(root) / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, k = base, 1
        while True:
            try:
                path.mkdir(parents=True)
                run = cls(path)
                run.created = True
                return run
            except FileExistsError:
                k += 1
                path = base.with_name(f"{base.name}-{k}")
            except OSError as e:
                raise UsageError(f"cannot create {path} ({e.strerror})") from None

    @staticmethod
    def check_new(out: str | os.PathLike) -> Path:
        """Refuse an ``--out`` that is a file, lies under a file, or is a non-empty directory."""
        path = Path(out)
        check_writable_dir(path, "--out")
        if path.is_dir() and any(path.iterdir()):
            raise UsageError(
                f"--out {path} exists and is not empty; choose a new directory or pass --resume {path}"
            )
        return path

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunDir:
        """An existing run directory (one with a readable config.json), e.g. to resume."""
        run = cls(path)
        if not run.path.is_dir():
            raise UsageError(f"{run.path} is not a run directory (it does not exist or is a file)")
        if not run.config_path.is_file():
            raise UsageError(f"{run.path} has no config.json: not a run directory")
        config = run.read_config()
        if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
            raise CheckpointError(f"{run.config_path} is damaged (no 'train' settings); start a new run")
        return run

    # -- one writer -------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    def lock(self) -> None:
        """Take the run directory for this process, or raise RunLocked naming the live holder.

        An advisory ``flock`` on ``.lock`` (which holds the pid, for the message): the kernel
        drops it when its process dies, so a stale lock can never block a run."""
        import fcntl

        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunLocked(
                    f"{self.path} is being written by process {holder}; wait for it or stop it first"
                ) from None
            try:  # the file we locked must still be the one at the path (not unlinked by a releaser)
                if os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    @property
    def locked(self) -> bool:
        """Whether this process holds the run directory's lock."""
        return getattr(self, "_lock_fd", None) is not None

    def unlock(self) -> None:
        if self.locked:
            self.lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- paths ------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def curves_path(self) -> Path:
        return self.path / CURVES_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def diverged_path(self) -> Path:
        return self.path / DIVERGED_FILE

    # -- writing ----------------------------------------------------------------------------
    def write_config(self, config: dict[str, Any], libraries: tuple[str, ...] = ("numpy", "torch")) -> None:
        atomic_write_json(self.config_path, {**config, "versions": versions(libraries)})

    def remove_if_unstarted(self) -> None:
        """Delete this directory if no training step was checkpointed in it (a failed start
        leaves nothing behind, not even the records before its first evaluation); only the
        files a start writes are removed."""
        if not self.locked or self.checkpoint_dir.exists():
            return
        for path in (self.config_path, self.metrics_path, self.diverged_path):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.tensorboard_dir, ignore_errors=True)
        self.unlock()
        if not self.created:
            return
        try:
            self.path.rmdir()
        except OSError:  # something else is in it: leave it
            pass

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl as one complete write (unbuffered: a crash keeps
        what was logged). A write that fails (a full disk) is undone, so no half line stays,
        and the error names the file: the last checkpoint is intact and resumable."""
        line = (json.dumps(record, default=jsonable) + "\n").encode()
        with open(self.metrics_path, "ab", buffering=0) as f:
            size = f.tell()
            try:
                if f.write(line) != len(line):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as e:
                with contextlib.suppress(OSError):
                    f.truncate(size)
                raise CheckpointError(
                    f"{self.metrics_path}: could not append a record ({e.strerror or e}); the last checkpoint is "
                    f"intact: free space and resume with --resume {self.path}"
                ) from None

    def check_metrics(self, last_step: int, length: int = 0) -> list[dict]:
        """The records a resume keeps (read and checked, nothing written): the first ``length``
        bytes of metrics.jsonl where the checkpoint recorded them (anything appended later, a
        half line of a full disk included, is dropped), else every record up to ``last_step``."""
        if not length:
            return [m for m in self.read_metrics() if m["step"] <= last_step]
        size = self.metrics_path.stat().st_size if self.metrics_path.is_file() else 0
        if size < length:
            raise CheckpointError(
                f"{self.metrics_path}: {size} bytes, shorter than the {length} its checkpoint was saved with "
                "(truncated or replaced); the run cannot be resumed"
            )
        return self._parse_metrics(read_bytes(self.metrics_path)[:length], last_step)

    def _parse_metrics(self, data: bytes, last_step: int | None = None) -> list[dict]:
        out = []
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.metrics_path} is unreadable (not UTF-8 text)") from None
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = parse_json(line, f"{self.metrics_path}:{i}", finite=False)
                except CheckpointError:
                    record = None
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise CheckpointError(f"{self.metrics_path}:{i}: damaged (not a metrics record)")
                out.append(record)
        return out if last_step is None else [m for m in out if m["step"] <= last_step]

    def truncate_metrics(self, last_step: int, length: int = 0) -> list[dict]:
        """Keep only what goes with the checkpoint (see :meth:`check_metrics`): a resumed run
        re-logs what came after."""
        kept = self.check_metrics(last_step, length)
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept).encode())
        return kept

    def finish(self, summary: dict[str, Any], title: str | None = None) -> dict[str, Any]:
        """Write summary.json and curves.png from metrics.jsonl; returns the summary."""
        from cifarlab.plots import plot_curves

        metrics = self.read_metrics()
        tests = evaluations(metrics)
        full = [m["test_acc"] for m in tests if "test_images" not in m]  # not the quick checks' subsets
        summary = {"best_test_accuracy": max(full) if full else None, **summary}
        atomic_write_json(self.summary_path, summary)
        if metrics:
            plot_curves(metrics, tests, self.curves_path, title or self.path.name)
        return summary

    # -- reading ----------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        return _read_json(self.config_path)

    def read_summary(self) -> dict[str, Any]:
        return _read_json(self.summary_path)

    def evaluations(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl that hold test metrics (see :func:`evaluations`)."""
        return evaluations(self.read_metrics())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return self._parse_metrics(read_bytes(self.metrics_path))


def require_tensorboard() -> None:
    """Refuse --tensorboard, before anything is written, where the package is not installed."""
    try:
        import tensorboard.summary.writer.event_file_writer  # noqa: F401
    except ImportError:
        raise UsageError(
            "--tensorboard needs the tensorboard package: pip install 'cifarlab[tensorboard]'"
        ) from None


class TensorBoardLog:
    """The scalars of metrics records as TensorBoard event files in ``folder``, written with
    tensorboard's own writer and protos: neither torch nor TensorFlow is imported, so a NumPy
    run stays torch-free. Use it as a context manager (its writer thread must be closed)."""

    def __init__(self, folder: Path, first_step: int) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2, summary_pb2
        self._writer = EventFileWriter(str(folder))
        # A resumed run logs again the steps after its checkpoint. A START event at the first
        # new step tells TensorBoard to drop what earlier sessions logged from that step on.
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=first_step + 1, session_log=start))

    def add(self, record: dict[str, Any]) -> None:
        values = [
            self._summary.Summary.Value(tag=key, simple_value=record[key])
            for key in TENSORBOARD_SCALARS
            if key in record
        ]
        summary = self._summary.Summary(value=values)
        self._writer.add_event(self._event.Event(wall_time=time.time(), step=record["step"], summary=summary))

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._writer.close()  # flushes what is queued


def _read_json(path: Path) -> dict[str, Any]:
    return parse_json(read_bytes(path), str(path))


# -- the one snapshot reader: a run directory from anywhere, read once, never raising ----------
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
        """The records with a test accuracy (see :func:`evaluations`)."""
        return evaluations(self.metrics)

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
    config = _read_damaged_json(path)
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
    obj = _read_damaged_json(path)
    check(path, obj)
    return obj


def _check_summary(path: Path, summary: Any) -> None:
    if not isinstance(summary, dict) or not is_number(summary.get("test_accuracy")):
        raise Damaged(f"{path.name} has no test_accuracy")


def _check_diverged(path: Path, diverged: Any) -> None:
    if not isinstance(diverged, dict) or not isinstance(diverged.get("step"), int):
        raise Damaged(f"{path.name} has no step")


def _read_damaged_json(path: Path) -> Any:
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
