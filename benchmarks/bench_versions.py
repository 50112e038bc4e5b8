"""Has the trainer become slower? ``cifarlab train`` from two source trees (e.g. a git worktree
of the previous commit and this one), whole processes launched alternately, compared by the
training and evaluation images/s each run's summary.json records.

    git worktree add /tmp/before HEAD~1
    python benchmarks/bench_versions.py --before /tmp/before/src --after src \\
        --run "convnet --preset seed --max-steps 100 --eval-freq 100" --rounds 3

Each ``--run`` is a ``cifarlab train`` command line without ``--out`` (repeatable).
``CIFARLAB_DATA`` must point at the data. Prints medians and the after/before ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the older tree's src/ folder")
    p.add_argument("--after", default="src", help="the newer tree's src/ folder (default: src)")
    p.add_argument("--run", action="append", required=True, help="cifarlab train arguments (repeatable)")
    p.add_argument("--rounds", type=int, default=3, help="launches per tree and run (alternating)")
    return p.parse_args(argv)


def launch(src: str, run: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
    cmd = [sys.executable, "-m", "cifarlab", "train", *shlex.split(run), "--no-progress", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"PYTHONPATH={src} {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from cifarlab.training.runs import machine

    m = machine()
    print(
        f"CPU: {m['cpu']}, {m['cores']} cores, isa {m.get('isa')}; {args.rounds} alternating launches; medians"
    )
    print()
    print("| run | tree | train img/s | eval img/s | wall s |")
    print("|---|---|---:|---:|---:|")
    trees = {"before": args.before, "after": args.after}
    with tempfile.TemporaryDirectory() as tmp:
        for i, run in enumerate(args.run):
            got: dict[str, list[dict]] = {t: [] for t in trees}
            for r in range(args.rounds):
                for t, src in trees.items():
                    got[t].append(launch(src, run, Path(tmp) / f"{i}-{t}-{r}"))
            med = {
                t: [statistics.median(s[k] for s in ss) for k in ("images_per_second", "eval_images_per_second", "wall_seconds")]
                for t, ss in got.items()
            }  # fmt: skip
            for t, (tr, ev, wall) in med.items():
                print(f"| `{run}` | {t} | {tr:.1f} | {ev:.1f} | {wall:.1f} |")
            (b_tr, b_ev, _), (a_tr, a_ev, _) = med["before"], med["after"]
            print(f"| `{run}` | after/before | {a_tr / b_tr:.3f}x | {a_ev / b_ev:.3f}x | |")


if __name__ == "__main__":
    main()
