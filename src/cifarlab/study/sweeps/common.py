"""What every sweep shares: flags, running the runs (in parallel processes), collecting them.

Each run of a sweep is a normal ``cifarlab train`` run directory under ``--out-root``. A
finished run is reused only if its settings are exactly the job's; an interrupted one is
resumed; a run directory with other settings is never overwritten (the sweep stops and says
so). Tables and plots go to ``--out`` (default: the sweep's folder under runs/): results/ is
written only when asked for with ``--out results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarlab.errors import UsageError
from cifarlab.files import atomic_write_bytes, check_writable_dir
from cifarlab.training.config import (
    PRECISIONS,
    add_data_args,
    add_device_arg,
    add_progress_arg,
    flag,
)
from cifarlab.training.recipes import RECIPES, command_line, resolve
from cifarlab.training.runs import RunDir


@dataclass(frozen=True)
class Job:
    """One run of a sweep, as data: ``cifarlab train MODEL --preset PRESET`` with ``settings``."""

    name: str  # run directory name, unique in the sweep
    model: str
    settings: dict[str, Any]  # the settings the job gives (the preset's are the rest)
    preset: str | None = None

    @property
    def argv(self) -> list[str]:
        """The job's ``cifarlab train`` arguments (model first), without --out."""
        return command_line(self.model, self.preset, self.settings)


def add_sweep_args(p: argparse.ArgumentParser, name: str, seeds: int = 3) -> None:
    """The flags every sweep has; ``--out-root``/``--out`` default to runs/sweeps/<name>
    (``name`` may be completed later: see :func:`set_folders`)."""
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (threads are split)")
    p.add_argument("--seeds", type=int, default=seeds, help="seeds per configuration (default: %(default)s)")
    p.add_argument("--out-root", help=f"where the run directories go (default: runs/sweeps/{name})")
    p.add_argument(
        "--out",
        "--results",
        dest="results",
        help=f"where the table and plots go (default: runs/sweeps/{name}; --out results to update the project's)",
    )
    add_progress_arg(p)
    p.add_argument("--max-steps", type=int, help="override every run's steps (for a quick look)")
    p.add_argument(
        "--extra",
        default="",
        metavar="FLAGS",
        help="more flags for every run, e.g. --extra='--batch-size 64'",
    )
    add_device_arg(p)
    add_precision_arg(p)
    add_data_args(p)


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    """``--precision`` for commands that run many torch runs (the NumPy runs keep their dtype)."""
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="every torch run's --precision (default: each run's own, auto); NumPy runs keep their --dtype",
    )


def torch_flags(job: Job, args: argparse.Namespace) -> list[str]:
    """``--precision`` of a sweep or of reproduce, for the torch jobs (the NumPy trainer has none)."""
    precision = getattr(args, "precision", None)
    return ["--precision", precision] if precision and RECIPES[job.model].framework == "torch" else []


def set_folders(args: argparse.Namespace, name: str) -> None:
    """Default ``--out-root`` and ``--out`` to runs/sweeps/<name>."""
    args.out_root = args.out_root or f"runs/sweeps/{name}"
    args.results = args.results or f"runs/sweeps/{name}"


def check_sweep_args(args: argparse.Namespace) -> None:
    """Refuse bad sweep flags before anything runs or is written."""
    if not 1 <= args.jobs <= 64:
        raise UsageError(f"--jobs must be in 1..64, got {args.jobs}")
    if not 1 <= args.seeds <= 100:
        raise UsageError(f"--seeds must be in 1..100, got {args.seeds}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be positive, got {args.max_steps}")
    try:
        shlex.split(args.extra)
    except ValueError as e:
        raise UsageError(f"--extra {args.extra!r}: {e}") from None
    check_writable_dir(Path(args.out_root), "--out-root")
    check_writable_dir(Path(args.results), "--out")


def _plan(job: Job, extra: list[str], out: Path) -> str:
    """What to do with a job: "new", "done" (reuse), "resume", or "restart" (a run killed
    before its first checkpoint). Refuses an --extra that
    changes what the sweep varies, and a directory that holds a run with other settings
    (it is never overwritten)."""
    from cifarlab.training.train_command import parse_overrides

    preset, given = parse_overrides(job.model, extra)
    model, preset = job.model, preset or job.preset
    own = dataclasses.asdict(resolve(model, job.preset, job.settings))
    settings = dataclasses.asdict(resolve(model, preset, {**job.settings, **given}))
    if job.preset and preset != job.preset:
        raise UsageError("--extra must not change --preset: the sweep sets it for each run")
    overridden = sorted(k for k in set(given) & set(job.settings) - {"max_steps"} if settings[k] != own[k])
    if overridden:
        raise UsageError(f"--extra must not change {flag(overridden[0])}: the sweep sets it for each run")
    run = RunDir(out)
    if not out.exists() or (not run.config_path.is_file() and not any(out.iterdir())):
        return "new"
    saved = run.read_config() if run.config_path.is_file() else {}
    # a job that leaves --precision to auto takes a run in any precision (how it computed, like
    # the device); one that asks for a precision takes only a run in it
    ignore = frozenset({"precision"}) if settings.get("precision") == "auto" else frozenset()
    if saved.get("model") != model or not same_settings(saved, settings, ignore):
        diff = sorted(k for k in settings if saved.get("train", {}).get(k) != settings[k])
        raise UsageError(
            f"{out} holds a run with other settings ({', '.join(diff[:4]) or 'model'} differ); "
            "it is kept: choose another --out-root or remove it"
        )
    if run.summary_path.is_file():
        return "done"
    from cifarlab.training.checkpoints import STATE_FILE
    from cifarlab.training.runs import lock_holder

    holder = lock_holder(run)
    if holder is not None:
        raise UsageError(f"{out} is being written by process {holder}: wait for it or stop it first")
    # killed before its first checkpoint: nothing to resume, so it starts again (the half-made
    # folder is moved aside, not deleted)
    return "resume" if (run.checkpoint_dir / STATE_FILE).is_file() else "restart"


def same_settings(config: dict, settings: dict, ignore: frozenset[str] = frozenset()) -> bool:
    """Does a run's config.json hold ``settings`` (all but those in ``ignore``)? A setting
    that an older version did not record counts as its default (it had no other value then)."""
    saved = config.get("train")
    recipe = RECIPES.get(config.get("model", ""))
    if not isinstance(saved, dict) or recipe is None or not set(saved) <= set(settings):
        return False
    defaults = dataclasses.asdict(recipe.config())
    return all(saved.get(k, defaults.get(k)) == v for k, v in settings.items() if k not in ignore)


def run_jobs(
    jobs: list[Job],
    args: argparse.Namespace,
    on_start: Callable[[str, bool], None] | None = None,
    on_done: Callable[[str, bool], None] | None = None,
) -> dict[str, RunDir]:
    """Run every job not yet complete; returns name -> RunDir. Fails listing the runs that failed
    (after all of them ran). See :func:`run_all`."""
    runs, failures = run_all(jobs, args, on_start, on_done)
    if failures:
        raise UsageError(
            f"{len(failures)} run(s) failed (logs in {args.out_root}): "
            + "; ".join(f"{name}: {why}" for name, (why, _) in failures.items())
        )
    return runs


def check_data(args: argparse.Namespace) -> None:
    """The data every run will read, checked once (one line, exit 2), not once per run."""
    from cifarlab.data import load_cifar10

    load_cifar10(args.data_dir, verify=args.verify)


def run_all(
    jobs: list[Job],
    args: argparse.Namespace,
    on_start: Callable[[str, bool], None] | None = None,
    on_done: Callable[[str, bool], None] | None = None,
) -> tuple[dict[str, RunDir], dict[str, tuple[str, Path]]]:
    """Run every job not yet complete: (name -> RunDir, name -> (why it failed, its log)) for
    the failed ones. With ``--jobs 1`` the runs go one after the other in this process; with
    more, each is a ``cifarlab train`` process and the cores are split between them.
    ``on_start``/``on_done`` (name, reused) are called around each job, from worker threads."""
    from tqdm import tqdm

    check_sweep_args(args)
    check_data(args)
    root = Path(args.out_root)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    extra = ["--no-progress"]
    # split the cores between parallel runs (torch and NumPy's BLAS both read these)
    env = {
        **os.environ,
        **{v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
    }
    if args.data_dir:
        extra += ["--data-dir", args.data_dir]
    if not args.verify:
        extra.append("--no-verify")
    if args.max_steps:
        extra += ["--max-steps", str(args.max_steps)]
    extra += shlex.split(args.extra)  # last: overrides the sweep's own flags
    plan = {
        j.name: _plan(j, [*torch_flags(j, args), *extra], root / j.name) for j in jobs
    }  # all checked first
    root.mkdir(parents=True, exist_ok=True)
    Path(args.results).mkdir(parents=True, exist_ok=True)

    def one(job: Job) -> str | None:
        reused = plan[job.name] == "done"  # the same run, finished in an earlier invocation
        if on_start is not None:
            on_start(job.name, reused)
        failure = None if reused else run_one(job)
        if on_done is not None:
            on_done(job.name, reused)
        return failure

    def run_one(job: Job) -> str | None:
        out = root / job.name
        if plan[job.name] == "restart":
            out.rename(out.with_name(f"{out.name}.unstarted-{time.strftime('%Y%m%d-%H%M%S')}"))
        where = ["--resume", str(out)] if plan[job.name] == "resume" else ["--out", str(out)]
        if RECIPES[job.model].framework == "torch":  # device: where it runs, not what it computes
            where += ["--device", args.device]
        argv = ["train", *job.argv, *torch_flags(job, args), *extra, *where]
        with open(root / f"{job.name}.log", "a") as log:  # a resumed job adds to its log
            log.write("cifarlab " + " ".join(argv) + "\n")
            log.flush()
            if args.jobs == 1:
                code, err = _run_here(argv, log)
            else:
                r = subprocess.run([sys.executable, "-m", "cifarlab", *argv], stdout=log, stderr=subprocess.PIPE,
                                   text=True, env=env)  # fmt: skip
                log.write(r.stderr)
                code, err = r.returncode, r.stderr
        return None if code == 0 else (err.strip().splitlines() or ["?"])[-1]

    if args.jobs == 1:  # in this process, one after the other: torch is imported once, not per run
        bar = tqdm(map(one, jobs), total=len(jobs), desc="runs", unit="run", disable=not args.progress)
        results = list(bar)
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            bar = tqdm(
                pool.map(one, jobs), total=len(jobs), desc="runs", unit="run", disable=not args.progress
            )
            results = list(bar)
    failures = {j.name: (why, root / f"{j.name}.log") for j, why in zip(jobs, results) if why}
    return {j.name: RunDir(root / j.name) for j in jobs if j.name not in failures}, failures


def _run_here(argv: list[str], log) -> tuple[int, str]:
    """`cifarlab *argv` (a train command) in this process, its output into ``log``: (exit
    status, its stderr). A bug in one run is that run's failure: the others go on."""
    import contextlib
    import io

    from cifarlab.errors import run_command
    from cifarlab.training.train_command import run_argv

    err = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(err):
        code = run_command(lambda: run_argv(argv[1:]))
    log.write(err.getvalue())
    if code == 130:  # Ctrl-C reached the run (which checkpointed): stop the sweep too
        raise KeyboardInterrupt(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "")
    return code, err.getvalue()


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())
    return path


@dataclass
class Figure:
    """One plot of a sweep's page: series name -> (x values, y values)."""

    stem: str  # file name without .png
    series: dict[str, tuple[list, list]]
    xlabel: str
    ylabel: str
    title: str
    logy: bool = False


def publish(args: argparse.Namespace, name: str, lines: list[str], figures: list[Figure]) -> Path:
    """Plot every figure into ``--out``, add them to the table's lines, write ``<name>.md``
    there and print it; returns the .md path."""
    from cifarlab.plots import plot_series

    out = Path(args.results)
    pngs = [
        plot_series(f.series, out / f"{f.stem}.png", f.xlabel, f.ylabel, f.title, logy=f.logy)
        for f in figures
    ]
    lines = [*lines, "", " ".join(f"![{f.title}]({p.name})" for f, p in zip(figures, pngs)), ""]
    md = write_text(out / f"{name}.md", "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {md}")
    return md


def mean_curve(
    runs: list[RunDir], key: str | Callable[[dict], float] = "test_acc"
) -> tuple[list[int], list[float]]:
    """Step-wise mean of ``key`` (a metrics key, or a function of an evaluation record) over
    the evaluations of runs that share their evaluation steps."""
    value = key if callable(key) else (lambda m: m[key])
    curves = [[(m["step"], value(m)) for m in r.evaluations()] for r in runs]
    steps = [s for s, _ in curves[0]]
    return steps, [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
