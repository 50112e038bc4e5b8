"""The one writer and reader of run directories, shared by the NumPy and PyTorch trainers.

runs/<model>-<YYYYmmdd-HHMMSS>/    (or --out DIR)
  config.json     every setting, seed, data md5s, versions
  metrics.jsonl   one JSON line per evaluation
  summary.json    test_accuracy (final), best_test_accuracy, steps, wall_seconds, ...
  curves.png      loss and accuracy vs step, train and test
  checkpoint/     weights (safetensors) + trainer state, written by the trainer
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cifarlab.errors import UsageError

METRIC_KEYS = ("step", "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy scalars and arrays
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


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


def training_summary(
    run: RunDir,
    steps: int,
    batch_size: int,
    epochs: float,
    wall_seconds: float,
    train_seconds: float,
    trained_steps: int | None = None,
) -> dict[str, Any]:
    """The summary both trainers write: final and best test accuracy, time and throughput."""
    last = run.read_metrics()[-1]
    trained = steps if trained_steps is None else trained_steps
    return {
        "test_accuracy": last["test_acc"],
        "test_loss": last["test_loss"],
        "steps": steps,
        "epochs": round(epochs, 3),
        "wall_seconds": round(wall_seconds, 2),
        "images_per_second": round(trained * batch_size / max(train_seconds, 1e-9), 1),
    }


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

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        model: str,
        out: str | os.PathLike | None = None,
        resume: bool = False,
        root: str | os.PathLike = "runs",
    ) -> RunDir:
        """``out`` if given (refused when non-empty unless ``resume``), else a fresh
        ``<root>/<model>-<YYYYmmdd-HHMMSS>`` (suffixed ``-2``, ``-3``... if taken)."""
        if out is not None:
            path = Path(out)
            if path.exists() and not path.is_dir():
                raise UsageError(f"--out {path} exists and is not a directory")
            if resume:
                if not (path / "config.json").is_file():
                    raise UsageError(f"cannot resume {path}: it has no config.json (not a run directory)")
            elif path.is_dir() and any(path.iterdir()):
                raise UsageError(
                    f"--out {path} exists and is not empty; choose a new directory or pass --resume {path}"
                )
            path.mkdir(parents=True, exist_ok=True)
            return cls(path)
        base = Path(root) / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, k = base, 1
        while True:
            try:
                path.mkdir(parents=True)
                return cls(path)
            except FileExistsError:
                k += 1
                path = base.with_name(f"{base.name}-{k}")

    # -- paths ------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def curves_path(self) -> Path:
        return self.path / "curves.png"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    # -- writing ----------------------------------------------------------------------------
    def write_config(self, config: dict[str, Any], libraries: tuple[str, ...] = ("numpy", "torch")) -> None:
        atomic_write_json(self.config_path, {**config, "versions": versions(libraries)})

    def log(self, record: dict[str, Any]) -> None:
        """Append one evaluation record to metrics.jsonl (flushed: a crash keeps what was logged)."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")

    def truncate_metrics(self, last_step: int) -> list[dict]:
        """Keep only records up to ``last_step`` (a resumed run re-logs what came after)."""
        kept = [m for m in self.read_metrics() if m["step"] <= last_step]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept).encode())
        return kept

    def finish(self, summary: dict[str, Any], title: str | None = None) -> dict[str, Any]:
        """Write summary.json and curves.png from metrics.jsonl; returns the summary."""
        from cifarlab.plots import plot_curves

        metrics = self.read_metrics()
        tests = [m["test_acc"] for m in metrics if m.get("test_acc") is not None]
        summary = {"best_test_accuracy": max(tests) if tests else None, **summary}
        atomic_write_json(self.summary_path, summary)
        if metrics:
            plot_curves(metrics, self.curves_path, title or self.path.name)
        return summary

    # -- reading ----------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        return _read_json(self.config_path)

    def read_summary(self) -> dict[str, Any]:
        return _read_json(self.summary_path)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        out = []
        for i, line in enumerate(self.metrics_path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UsageError(f"{self.metrics_path}:{i}: not a JSON line") from None
        return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist (is this a run directory?)") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
