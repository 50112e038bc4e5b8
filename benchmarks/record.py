"""Run one benchmark command and keep its raw output under ``results/bench/``, headed by the
command and the machine, so that a figure quoted in docs/benchmarks.md can be traced to it.

    python benchmarks/record.py data -- python benchmarks/bench_data.py --data-dir ../shared/cifar10

writes ``results/bench/data-<cpu>.txt`` (``<cpu>`` from the CPU model and its widest vector
instruction set, e.g. ``amd-epyc-avx512bf16``): a ``command:`` line, a ``cpu:`` line (model,
cores, instruction sets), the library versions and the date, then everything the command
printed. An existing file is kept unless ``--force`` is given; the command's own exit status is
returned.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import subprocess
import sys
from pathlib import Path

from cifarlab.training.runs import machine, versions

ROOT = Path(__file__).resolve().parent.parent


def cpu_slug(m: dict) -> str:
    """'AMD EPYC' + AVX512-BF16 -> 'amd-epyc-avx512bf16': a file-name label for the CPU kind."""
    name = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", "", m["cpu"].lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown-cpu"
    isa = m.get("isa") or {}
    widest = next((k for k in ("amx", "avx512_bf16", "avx512", "avx2") if isa.get(k)), "")
    return f"{name}-{widest.replace('_', '')}" if widest else name


def cpu_line(m: dict) -> str:
    sets = ", ".join(k.upper().replace("_", "-") for k, on in (m.get("isa") or {}).items() if on)
    return f"{m['cpu']} ({m['cores']} cores; {sets or 'instruction sets unknown'})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="the output's name: results/bench/<name>-<cpu>.txt")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.usage = "record.py [--force] NAME -- COMMAND..."
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args, command = p.parse_args(argv[:cut]), argv[cut + 1 :]
    if not command:
        p.error("give the benchmark command after --")
    m = machine()
    out = ROOT / "results" / "bench" / f"{args.name}-{cpu_slug(m)}.txt"
    if out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    v = versions()
    head = [
        f"command: {shlex.join('python' if Path(a).name.startswith('python') else a for a in command)}",
        f"cpu: {cpu_line(m)}",
        f"versions: python {v['python']}, numpy {v['numpy']}, torch {v['torch']}",
        f"date: {datetime.date.today().isoformat()}",
        "",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    body = proc.stdout + (f"\n[stderr]\n{proc.stderr}" if proc.returncode else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(head) + body)
    tmp.replace(out)
    print(out.relative_to(ROOT))
    print(body, end="")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
