"""The fast recipe's round-4 ablation (issue 24) as the Markdown table in docs/results.md,
computed from the run directories in results/ (tests/test_docs_tables.py checks the docs
still say what this prints).

    python scripts/fast_ablation_table.py
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cifarlab.files import parse_json, read_bytes  # noqa: E402

# variant -> (what it adds, validation runs, test runs); paths relative to results/
VARIANTS = {
    "base": ("the default before issue 24: none of the parts", "gpu/round4/val-fast4-base-s*", "fast-v1/s?"),
    "all": ("+ Lookahead, schedule ends 0.2/0.07, bias decay", "gpu/round4/val-fast4-all-s*",
            "gpu/round4/fast4-all-s*"),
    "peak": ("+ the peak at 23 % of the steps", "gpu/round4/val-fast4-peak-s*", "gpu/round4/fast4-peak-s*"),
    "wb3": ("+ the whitening bias frozen after 3 epochs (**the new default**)", "gpu/round4/val-fast4-wb3-s*",
            "fast/s?"),
}  # fmt: skip


def _seed(path: Path) -> int:
    return int(re.search(r"s(\d+)$", path.name).group(1))


def _accuracies(pattern: str, key: str) -> list[tuple[int, float]]:
    out = []
    for d in sorted((REPO / "results").glob(pattern), key=_seed):
        summary = parse_json(read_bytes(d / "summary.json"), str(d / "summary.json"))
        out.append((_seed(d), float(summary[key])))
    return out


def _cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} ({len(values)})"


def table() -> str:
    rows = [
        "| variant | adds | validation: mean ± std (seeds) | test: mean ± std (seeds) |",
        "|---|---|---|---|",
    ]
    for name, (adds, val, test) in VARIANTS.items():
        v = [a for _, a in _accuracies(val, "val_accuracy")]
        t = [a for _, a in _accuracies(test, "test_accuracy")]
        rows.append(f"| {name} | {adds} | {_cell(v)} | {_cell(t)} |")
    fp32 = dict(_accuracies("fast/s?", "test_accuracy"))
    bf16 = dict(_accuracies("fast/bf16-s?", "test_accuracy"))
    same = sorted(set(fp32) & set(bf16))
    rows += [
        "",
        "| the new default, same seeds | " + " | ".join(f"seed {s}" for s in same) + " | mean |",
        "|---|" + "---:|" * (len(same) + 1),
        "| fp32 | " + " | ".join(f"{fp32[s]:.4f}" for s in same) + f" | {statistics.mean(fp32[s] for s in same):.4f} |",
        "| bf16 autocast | " + " | ".join(f"{bf16[s]:.4f}" for s in same)
        + f" | {statistics.mean(bf16[s] for s in same):.4f} |",
    ]  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
