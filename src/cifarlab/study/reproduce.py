"""``cifarlab reproduce``: run every experiment of the study, then write the report.

``--budget quick`` runs each experiment once for a few steps (minutes: the study in
miniature, to check that everything works); ``--budget full`` runs the seed's protocols and
the best presets over their seeds (hours). The runs go to ``OUT/runs/<budget>/`` as ordinary
run directories, through the sweeps' machinery: run again, and finished runs with the same
settings are reused, interrupted ones resume, and a directory holding other settings is
never overwritten. Ctrl-C stops cleanly at any time (each run checkpoints). The report goes
to ``OUT/report/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cifarlab.errors import UsageError
from cifarlab.training.config import add_data_args, add_device_arg, add_progress_arg
from cifarlab.training.runs import RunDir

START_SECONDS = 4.0  # a process start: Python, torch, the data


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cifarlab.study.experiments import BUDGETS
    from cifarlab.study.sweeps.common import add_precision_arg

    p.add_argument("--budget", choices=BUDGETS, default="quick",
                   help="quick: every experiment once, a few steps (minutes); full: the real protocols (hours)")  # fmt: skip
    p.add_argument("--out", default="reproduce", metavar="DIR",
                   help="run directories go to DIR/runs/<budget>/, the report to DIR/report/ (default: reproduce/)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (the cores are split)")
    add_progress_arg(p, "no progress line")
    add_device_arg(p)
    add_precision_arg(p)
    add_data_args(p)


def estimate_seconds(settings: dict, model: str) -> float:
    """A run's expected wall time on the reference CPU, from its steps and evaluations and its
    recipe's rough speeds (``Recipe.speed``)."""
    from cifarlab.training.recipes import RECIPES

    train_ips, eval_ips = RECIPES[model].speed
    if "image_size" in settings:  # the speeds are at 64 px
        scale = (64 / settings["image_size"]) ** 2
        train_ips, eval_ips = train_ips * scale, eval_ips * scale
    steps = settings["max_steps"]
    evals = -(-steps // settings["eval_freq"])
    test = settings.get("test_images") or 10_000
    return START_SECONDS + steps * settings["batch_size"] / train_ips + evals * test / eval_ips


def main(args: argparse.Namespace) -> int:
    from cifarlab.study import report

    if not 1 <= args.jobs <= 64:
        raise UsageError(f"--jobs must be in 1..64, got {args.jobs}")
    out = Path(args.out)
    runs_root = out / "runs" / args.budget
    report_dir = out / "report"
    report.check_out(report_dir)  # refuse a bad --out before hours of training
    out.mkdir(parents=True, exist_ok=True)
    owner = RunDir(out)  # one reproduce per --out: two would leapfrog each other's runs
    owner.lock()
    try:
        return _reproduce(args, out, runs_root, report_dir)
    finally:
        owner.unlock()


def _reproduce(args: argparse.Namespace, out: Path, runs_root: Path, report_dir: Path) -> int:
    from cifarlab.study import report
    from cifarlab.study.experiments import catalogue, expected_settings
    from cifarlab.study.sweeps import common

    jobs, estimates, experiment = [], {}, {}
    for exp in catalogue():
        for seed in exp.run_seeds(args.budget):
            job = common.Job(
                f"{exp.name}-seed{seed}", exp.model, exp.overrides(args.budget, seed), exp.preset
            )
            experiment[job.name] = exp.name
            model, settings = expected_settings(exp, args.budget, seed)
            estimates[job.name] = estimate_seconds(settings, model)
            jobs.append(job)
    total = sum(estimates.values())
    print(f"cifarlab reproduce --budget {args.budget}: {len(jobs)} runs into {runs_root}/, "
          f"about {_duration(total / args.jobs)} on a 2-core CPU like the project's")  # fmt: skip
    ns = argparse.Namespace(
        jobs=args.jobs, seeds=1, out_root=str(runs_root), results=str(report_dir), progress=False,
        max_steps=None, extra="", data_dir=args.data_dir, verify=args.verify, device=args.device,
        precision=args.precision,
    )  # fmt: skip
    progress = _Progress(estimates, args.jobs, enabled=args.progress)
    _, failures = common.run_all(jobs, ns, on_start=progress.start, on_done=progress.done)
    # a failed run costs its own row, not the report: the row says failed, with its log
    failed = {experiment[name]: log for name, (_, log) in failures.items()}
    page, md, found = report.write_report([runs_root], report_dir, failed=failed)
    print(f"report: {page} ({len(found.runs)} runs)")
    if failures:
        print(
            f"cifarlab: error: {len(failures)} run(s) failed; their rows in the report say so: "
            + "; ".join(f"{name}: {why} (log: {log})" for name, (why, log) in failures.items()),
            file=sys.stderr,
        )
        return 1
    return 0


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return (
        f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
        if seconds >= 3600
        else f"{seconds // 60} min {seconds % 60:02d} s"
    )


class _Progress:
    """'[k/N] name: ETA ...; all: ETA ...', the estimates rescaled by the speed the finished
    runs had (their real time over their estimate), the total divided between parallel jobs."""

    def __init__(self, estimates: dict[str, float], jobs: int = 1, enabled: bool = True) -> None:
        self.estimates, self.jobs, self.enabled = estimates, jobs, enabled
        self.started: dict[str, float] = {}
        self.done_est = self.done_real = 0.0
        self.k = 0

    def factor(self) -> float:
        return self.done_real / self.done_est if self.done_est > 0 else 1.0

    def start(self, name: str, reused: bool) -> None:
        self.k += 1
        self.started[name] = time.perf_counter()
        if not self.enabled:
            return
        remaining = sum(v for n, v in self.estimates.items() if n not in self.started) + self.estimates[name]
        what = (
            "reused (finished earlier)"
            if reused
            else f"ETA {_duration(self.estimates[name] * self.factor())}"
        )
        print(f"[{self.k}/{len(self.estimates)}] {name}: {what}; all: ETA {_duration(remaining * self.factor() / self.jobs)}",
              flush=True)  # fmt: skip

    def done(self, name: str, reused: bool) -> None:
        if not reused:
            self.done_est += self.estimates[name]
            self.done_real += time.perf_counter() - self.started[name]
