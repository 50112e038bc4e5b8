"""Build docs/robustness.md's table from a run of the robustness tests.

    CIFARLAB_ROBUSTNESS_LOG=/tmp/rob.jsonl python -m pytest -q tests/test_robustness.py
    python scripts/robustness_table.py /tmp/rob.jsonl > /tmp/table.md

Every row is an input the tests tried and the exact line cifarlab printed (exit status 2);
temporary paths are shortened to <tmp>.
"""

from __future__ import annotations

import json
import re
import sys


def shorten(text: str) -> str:
    text = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+", "<tmp>", text)
    text = re.sub(r"\b[0-9a-f]{32}\b", "<run id>", text)  # random per run: not part of the message
    text = re.sub(r"\bprocess \d+", "process <pid>", text)  # likewise
    return text.replace("|", "\\|")


COMMON = (
    "--data-dir <tmp>/root",
    "--no-progress",
    "--max-steps 4 --eval-freq 2 --batch-size 20",
    "--out <tmp>/out",
)


def main(path: str) -> None:
    seen = set()
    print("| # | input (command line) | message (stderr, exit status 2) | test |")
    print("|---|---|---|---|")
    n = 0
    for line in open(path):
        rec = json.loads(line)
        argv = shorten(" ".join(a if " " not in a else repr(a) for a in rec["argv"]))
        for common in COMMON:  # the flags every test passes say nothing about the input
            argv = argv.replace(" " + common, "")
        message = shorten(rec["err"])
        if message in seen:
            continue
        seen.add(message)
        n += 1
        test = rec["test"].split("::")[-1].split("[")[0]
        print(f"| {n} | `cifarlab {argv}` | `{message}` | `{test}` |")


if __name__ == "__main__":
    main(sys.argv[1])
