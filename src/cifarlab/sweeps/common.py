"""What every sweep shares: flags, running the runs (in parallel processes), collecting them.

Each run of a sweep is a normal ``cifarlab train`` run directory under ``--out-root``; a run
whose summary.json already exists is reused, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cifarlab.errors import UsageError
from cifarlab.runs import RunDir, atomic_write_bytes


@dataclass
class Job:
    name: str  # run directory name, unique in the sweep
    argv: list[str]  # `cifarlab train ...` arguments (model first), without --out


def add_sweep_args(p: argparse.ArgumentParser, name: str, seeds: int = 3) -> None:
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (threads are split)")
    p.add_argument("--seeds", type=int, default=seeds, help="seeds per configuration (default: %(default)s)")
    p.add_argument("--out-root", default=f"runs/sweeps/{name}", help="where the run directories go")
    p.add_argument("--results", default="results", help="where the table and plot go (default: %(default)s)")
    p.add_argument("--max-steps", type=int, help="override every run's steps (for a quick look)")
    p.add_argument(
        "--extra",
        default="",
        metavar="FLAGS",
        help="more flags for every run, e.g. --extra='--batch-size 64'",
    )
    p.add_argument(
        "--data-dir", metavar="DIR", help="CIFAR-10 folder (default: $CIFARLAB_DATA or ~/.cache/cifarlab)"
    )
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the md5 check")


def run_jobs(jobs: list[Job], args: argparse.Namespace) -> dict[str, RunDir]:
    """Run every job not yet complete; returns name -> RunDir. Fails listing the runs that failed."""
    from tqdm import tqdm

    if args.jobs < 1 or args.seeds < 1:
        raise UsageError("--jobs and --seeds must be at least 1")
    root = Path(args.out_root)
    root.mkdir(parents=True, exist_ok=True)
    Path(args.results).mkdir(parents=True, exist_ok=True)
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

    def one(job: Job) -> str | None:
        out = root / job.name
        if (out / "summary.json").is_file():
            return None  # done in an earlier invocation
        if out.exists():  # an interrupted run of an earlier invocation: start it again
            import shutil

            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "cifarlab", "train", *job.argv, *extra, "--out", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        (root / f"{job.name}.log").write_text(" ".join(cmd) + "\n" + r.stdout + r.stderr)
        return None if r.returncode == 0 else f"{job.name}: {(r.stderr.strip().splitlines() or ['?'])[-1]}"

    with ThreadPoolExecutor(args.jobs) as pool:
        failures = [f for f in tqdm(pool.map(one, jobs), total=len(jobs), desc="runs", unit="run") if f]
    if failures:
        raise UsageError(f"{len(failures)} run(s) failed (logs in {root}): " + "; ".join(failures))
    return {j.name: RunDir(root / j.name) for j in jobs}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())
    return path


def mean_curve(runs: list[RunDir], key: str = "test_acc") -> tuple[list[int], list[float]]:
    """Step-wise mean of ``key`` over runs that share their evaluation steps."""
    curves = [[(m["step"], m[key]) for m in r.read_metrics()] for r in runs]
    steps = [s for s, _ in curves[0]]
    return steps, [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
