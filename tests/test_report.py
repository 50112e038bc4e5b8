"""``cifarlab report`` and ``cifarlab reproduce``: the study in miniature on the real data, the
page in a real browser, and what happens with empty folders and damaged runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cifarlab.cli import main
from cifarlab.errors import UsageError
from cifarlab.study import report
from cifarlab.study.experiments import SECTIONS, catalogue, expected_settings, matches
from cifarlab.training.recipes import resolve

REPO = Path(__file__).resolve().parents[1]


def _images(page: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page.read_text())


@pytest.fixture(scope="module")
def quick_study(real_data_dir, tmp_path_factory) -> Path:
    """`cifarlab reproduce --budget quick` once, on the real data (the CI's few minutes)."""
    out = tmp_path_factory.mktemp("study") / "study"
    assert main(["reproduce", "--budget", "quick", "--out", str(out), "--no-progress", "--precision", "fp32",
                 "--data-dir", str(real_data_dir)]) == 0  # fmt: skip
    return out


@pytest.mark.slow
def test_quick_study_writes_every_section(quick_study):
    page, md = quick_study / "report" / "index.html", quick_study / "report" / "REPORT.md"
    assert page.is_file() and md.is_file()
    text = md.read_text()
    for title in SECTIONS.values():
        assert title in text and title in page.read_text()
    assert "quick budget" in text
    assert "**missing**" not in text  # every experiment ran
    for src in _images(page):
        assert (page.parent / src).is_file(), src
    assert len(_images(page)) >= 5
    # Table 1 has the seed's column, with the seed's numbers beside ours
    table1 = text.split("### Table 1")[1].split("###")[0]
    assert "| seed report |" in table1 and "0.4210" in table1 and "0.5550" in table1
    # every number links to its run directory
    rows = [
        line for line in table1.splitlines() if line.startswith("| ") and not line.startswith("| experiment")
    ]
    assert len(rows) == 7
    for line in rows:
        assert re.search(r"\[[^\]]+-seed42\]\(\.\./runs/quick/", line), line
    assert "**passed**" in text  # the live gradient check


@pytest.mark.slow
def test_reproduce_again_reuses_every_run(quick_study, real_data_dir, capsys):
    before = {p: p.stat().st_mtime_ns for p in (quick_study / "runs").rglob("summary.json")}
    assert (
        main(
            [
                "reproduce",
                "--budget",
                "quick",
                "--out",
                str(quick_study),
                "--data-dir",
                str(real_data_dir),
                "--precision",
                "fp32",
            ]
        )
        == 0  # fmt: skip
    )
    out = capsys.readouterr().out
    assert out.count("reused") == len(before)
    assert {p: p.stat().st_mtime_ns for p in (quick_study / "runs").rglob("summary.json")} == before


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no Chromium")
def test_the_page_in_a_real_browser(quick_study, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "page.png"
    page = (quick_study / "report" / "index.html").resolve()
    r = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--screenshot={shot}", "--window-size=1100,2400", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.is_file() and shot.stat().st_size > 10_000
    console = [line for line in r.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    assert not console, console
    assert "Failed to load resource" not in r.stderr


def test_report_of_an_empty_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no run directories" in err
    assert not (tmp_path / "rep").exists()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_refuses_a_folder_of_other_files(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["report", str(REPO / "results"), "--out", str(out)]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_report_of_results_with_a_damaged_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(REPO / "results" / "convnet-seed", runs / "convnet-seed")
    shutil.copytree(REPO / "results" / "convnet-best", runs / "broken")
    (runs / "broken" / "summary.json").write_text("{not json")
    out = tmp_path / "rep"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    text = (out / "REPORT.md").read_text()
    assert "broken" in text and "damaged" in text  # listed as damaged ...
    summary = json.loads((runs / "convnet-seed" / "summary.json").read_text())
    assert f"{summary['test_accuracy']:.4f}" in text  # ... and the rest still reported
    assert (
        "**missing**" in text and "cifarlab train mlp-numpy --preset seed" in text
    )  # missing: with its command
    for src in _images(out / "index.html"):
        assert (out / src).is_file()


def test_every_results_run_is_found_by_its_settings():
    """results/ holds full-budget runs of the catalogue: each is recognised as its experiment."""
    found = report.find_runs([REPO / "results"])
    assert not found.damaged
    by_name = {r.path.name: r for r in found.runs}
    for exp in catalogue():
        if exp.name in by_name:
            model, settings = expected_settings(exp, "full")
            assert matches(by_name[exp.name].config, model, settings), exp.name
    model, settings = expected_settings(next(e for e in catalogue() if e.name == "convnet-seed"), "quick")
    assert not matches(by_name["convnet-seed"].config, model, settings)  # quick is not full


def test_fast_runs_before_and_after_the_default_changed_keep_their_experiments():
    """results/fast-v1 was recorded before Lookahead & co. existed (config.json lacks them):
    they read as off, so those runs stay fast-v1's and never count for the new default."""
    found = report.find_runs([REPO / "results"])
    exps = {e.name: e for e in catalogue() if e.name.startswith("fast")}
    settings = {name: expected_settings(e, "full") for name, e in exps.items()}
    expect = {"fast-v1": "fast-v1/s0", "fast": "fast/s0", "fast-lookahead": "round4/fast4-all-s0"}
    for name, rel in expect.items():
        run = next(r for r in found.runs if r.path.as_posix().endswith(rel))
        assert [n for n, (m, st) in settings.items() if matches(run.config, m, st)] == [name], rel
    assert settings["fast"][1]["whiten_bias_epochs"] == 3 and settings["fast"][1]["lookahead"] == 5


def test_markdown_inline_to_html_escapes():
    out = report._inline_html("a <b> `x<y>` **bold** [run](../runs/a b)")
    assert "&lt;b&gt;" in out and "<code>x&lt;y&gt;</code>" in out and "<strong>bold</strong>" in out
    assert "<a " not in out  # a link with a space is not a link: no broken href
    assert '<a href="../r">r</a>' in report._inline_html("[r](../r)")


def test_a_failed_run_costs_its_row_not_the_report(synthetic, tmp_path, monkeypatch, capsys):
    """One experiment diverges: the report is still written, its row says failed with the
    path of its log, the other row has its number, and the exit status is not 0."""
    from cifarlab.study import experiments
    from cifarlab.study.experiments import Experiment

    tiny = {"dnn_hidden_units": [8], "batch_size": 10}
    quick = {"max_steps": 2, "eval_freq": 2}
    exps = [
        Experiment("ok", "beyond", "fine", "mlp", tiny, quick=quick),
        Experiment("boom", "beyond", "diverges", "mlp", {**tiny, "learning_rate": 1e30}, quick=quick),
    ]
    monkeypatch.setattr(experiments, "catalogue", lambda: exps)
    out = tmp_path / "study"
    code = main(["reproduce", "--out", str(out), "--no-progress", "--precision", "fp32",
                 "--data-dir", str(synthetic[0])])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "1 run(s) failed" in err and "boom-seed42" in err
    md = (out / "report" / "REPORT.md").read_text()
    boom = next(line for line in md.splitlines() if line.startswith("| diverges"))
    assert "**failed**" in boom and "boom-seed42.log" in boom
    fine = next(line for line in md.splitlines() if line.startswith("| fine"))
    assert "failed" not in fine and "(1 run)" in fine and "precision fp32" in fine


def test_reproduce_checks_the_data_once_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CIFARLAB_DATA", raising=False)
    empty = tmp_path / "nodata"
    empty.mkdir()
    from cifarlab.errors import DataError

    def offline(*args, **kwargs):
        raise DataError("could not download cifar-10-binary.tar.gz: no network")

    monkeypatch.setattr("cifarlab.data.download_cifar10", offline)
    code = main(["reproduce", "--out", str(tmp_path / "s"), "--no-progress", "--data-dir", str(empty)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and len(err) < 400, err
    assert not (tmp_path / "s" / "runs").exists()


# ----------------------------------------------------------------------------- hostile input


EVIL = "a](javascript:alert(1))\n# injected"


def test_data_never_becomes_markup():
    """A value of a run (its name, its machine) is text: no link, no heading, no tag."""
    blocks = [report.Block("table", rows=[["run", "machine"], [report.md_text(EVIL), report._machine(
        {"machine": {"cpu": "<script>x</script>[y](javascript:z)", "cores": 2, "threads": 2}})]])]  # fmt: skip
    page, md = report.to_html(blocks, "t"), report.to_markdown(blocks)
    assert "<a " not in page and "<script>" not in page and "javascript:alert(1))" in page
    assert "\n# injected" not in md and md.count("\n") == 3  # header, rule, one row
    assert report.safe_href("javascript:alert(1)") is None and report.safe_href("https://x.org/a") is not None
    assert report.safe_href("../runs/a%20b") == "../runs/a%20b"


def test_a_hostile_run_name_is_escaped_in_both_pages(tmp_path):
    runs = tmp_path / "runs"
    evil = runs / "a](javascript:alert(1)) [x]"
    evil.mkdir(parents=True)
    (evil / "config.json").write_text("{not json")
    (evil / "metrics.jsonl").write_text("")
    out = tmp_path / "report"
    report.write_report([runs], out)
    page = (out / "index.html").read_text()
    assert 'href="javascript' not in page and "javascript:alert(1)" in page
    assert re.search(r'href="\.\./runs/a%5D%28javascript%3Aalert%281%29%29%20%5Bx%5D"', page)


def test_the_report_removes_only_its_own_files(tmp_path, synthetic):
    runs = tmp_path / "runs"
    assert main(["train", "mlp", "--dnn-hidden-units", "8", "--batch-size", "10", "--max-steps", "2",
                 "--no-progress", "--data-dir", str(synthetic[0]), "--out", str(runs / "r")]) == 0  # fmt: skip
    out = tmp_path / "report"
    report.write_report([runs], out)
    mine = out / "figures" / "mine.svg"
    mine.parent.mkdir(exist_ok=True)
    mine.write_text("<svg/>")
    (out / "notes.txt").write_text("my notes")
    (out / "figures" / "stale.png").write_bytes(b"x")  # not the report's: kept
    manifest = json.loads((out / report.MANIFEST).read_text())
    assert "REPORT.md" in manifest and "index.html" in manifest
    report.write_report([runs], out)
    assert mine.read_text() == "<svg/>" and (out / "notes.txt").read_text() == "my notes"
    assert (out / "figures" / "stale.png").exists()
    assert not list(out.glob(".building-*"))  # the build folder is gone


def test_a_failing_report_leaves_the_previous_one_whole(tmp_path, synthetic, monkeypatch):
    runs = tmp_path / "runs"
    assert main(["train", "mlp", "--dnn-hidden-units", "8", "--batch-size", "10", "--max-steps", "2",
                 "--no-progress", "--data-dir", str(synthetic[0]), "--out", str(runs / "r")]) == 0  # fmt: skip
    out = tmp_path / "report"
    report.write_report([runs], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def boom(self):
        raise RuntimeError("half-way")

    monkeypatch.setattr(report.Report, "beyond", boom)
    with pytest.raises(RuntimeError):
        report.write_report([runs], out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------- one machine per row


def _fake_run(path: Path, device: str, cpu: str, acc: float, wall: float, seed: int, precision: str):
    from cifarlab.training.runs import Run

    config = {"model": "mlp", "train": {"seed": seed}, "distributed": {"device": device, "precision": precision},
              "machine": {"cpu": cpu, "cores": 2, "threads": 2, "isa": {"avx2": True}}}  # fmt: skip
    return Run(path, config=config, summary={"test_accuracy": acc, "wall_seconds": wall, "steps": 10})


def test_rows_never_pool_two_machines(tmp_path):
    exp = next(e for e in catalogue() if e.name == "convnet-seed")
    runs = [
        _fake_run(tmp_path / "a", "cpu", "Intel Xeon", 0.80, 2000.0, 42, "fp32"),
        _fake_run(tmp_path / "b", "cpu", "Intel Xeon", 0.82, 2200.0, 43, "fp32"),
        _fake_run(tmp_path / "c", "cuda:0 (NVIDIA H200)", "Intel Xeon", 0.81, 60.0, 42, "fp32"),
    ]
    rep = report.Report(report.Found(runs=runs), tmp_path / "out")
    rep._matched = {e.name: (None, []) for e in rep.experiments} | {exp.name: ("full", runs)}
    head, *rows = rep.results_table([exp])
    assert len(rows) == 2  # the CPU pair, and the GPU run on its own
    cpu = next(r for r in rows if "Intel Xeon" in r[4])
    gpu = next(r for r in rows if "GPU NVIDIA H200" in r[4])
    assert "0.8100 ± 0.0141 (2 runs)" in cpu[2] and cpu[4].startswith("2100 s")
    assert "0.8100 (1 run)" in gpu[2] and gpu[4].startswith("60 s") and "Xeon" not in gpu[4]
    assert "seeds 42, 43" in cpu[6] and "--seed 42" in gpu[6]


def test_the_report_is_a_function_of_its_inputs(tmp_path, synthetic):
    runs = tmp_path / "runs"
    assert main(["train", "mlp", "--dnn-hidden-units", "8", "--batch-size", "10", "--max-steps", "2",
                 "--no-progress", "--data-dir", str(synthetic[0]), "--out", str(runs / "r")]) == 0  # fmt: skip
    bench = runs / "bench" / "layernorm-somecpu.txt"
    bench.parent.mkdir()
    bench.write_text("command: python benchmarks/bench_layernorm.py\n| a | b |\n")
    pages = []
    for out in (tmp_path / "one", tmp_path / "two"):
        report.write_report([runs], out)
        pages.append(((out / "REPORT.md").read_bytes(), (out / "index.html").read_bytes()))
    assert pages[0] == pages[1]
    assert b"layernorm-somecpu.txt" in pages[0][0]


@pytest.mark.parametrize("doc", ["README.md", "docs/results.md"])
def test_headline_tables_are_generated_from_results(doc):
    """README's and docs/results.md's results tables are what `cifarlab report results --readme
    README.md --readme docs/results.md` writes: a number edited by hand (or a run added to
    results/ without regenerating) fails here."""
    path = REPO / doc
    text = path.read_text()
    assert text.count(report.HEADLINE_BEGIN) == 1 and text.count(report.HEADLINE_END) == 1
    region = text.split(report.HEADLINE_BEGIN)[1].split(report.HEADLINE_END)[0].strip()
    assert region == report.headline_table([REPO / "results"], path.parent)


def test_fast_ablation_table_in_the_docs_is_generated():
    """docs/results.md quotes scripts/fast_ablation_table.py's output verbatim."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fast_ablation_table", REPO / "scripts/fast_ablation_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.table() in (REPO / "docs/results.md").read_text()


def test_an_experiment_outside_the_known_families_still_gets_its_row(tmp_path, monkeypatch):
    """A new Part 2 experiment whose name is neither table1-* nor activation-* appears in the
    report (with its command, as missing) instead of dropping out silently."""
    import dataclasses

    from cifarlab.study import experiments

    base = next(e for e in catalogue() if e.name == "activation-tanh")
    extra = dataclasses.replace(base, name="dropout-probe", label="MLP with dropout 0.3",
                                settings={**base.settings, "dropout": 0.3})  # fmt: skip
    monkeypatch.setattr(experiments, "catalogue", lambda: [*catalogue(), extra])
    rep = report.Report(report.Found(), tmp_path / "out")
    text = report.to_markdown(rep.build())
    assert "More Part 2 experiments" in text and "MLP with dropout 0.3" in text and "--dropout 0.3" in text


def test_every_experiment_command_runs_exactly_its_resolved_config():
    """An experiment is data (model, preset, settings); the command the report prints for it,
    read back by `cifarlab train`'s own parser, gives the config `resolve` gives."""
    import dataclasses

    from cifarlab.training.train_command import parse_overrides

    for exp in catalogue():
        for budget in ("full", "quick"):
            argv = exp.command(budget)
            preset, given = parse_overrides(argv[0], argv[1:])
            assert (argv[0], preset) == (exp.model, exp.preset)
            from_text = resolve(exp.model, preset, given)
            assert dataclasses.asdict(from_text) == dataclasses.asdict(exp.config(budget)), exp.name


def test_resolve_refuses_unknown_names_in_one_line():
    with pytest.raises(UsageError, match="unknown model 'resnet'"):
        resolve("resnet")
    with pytest.raises(UsageError, match="no preset 'best'"):
        resolve("fast", "best")
    with pytest.raises(UsageError, match="unknown setting"):
        resolve("mlp", None, {"learning_rat": 0.1})
    with pytest.raises(UsageError, match="--learning-rate must be in"):
        resolve("mlp", None, {"learning_rate": -1})
    assert resolve("mlp", None, {"learning_rate": 1}).learning_rate == 1.0  # an int for a float, as its flag
    assert isinstance(resolve("mlp", None, {"learning_rate": 1}).learning_rate, float)


def test_to_flags_writes_what_the_parser_reads():
    from cifarlab.training.config import to_flags
    from cifarlab.training.train_command import parse_overrides

    settings = {"augment": True, "dnn_hidden_units": [500, 300], "learning_rate": 1e-30, "channels_last": False,
                "optimizer": "adamw", "max_steps": 7, "momentum": 0.0}  # fmt: skip
    assert parse_overrides("mlp", to_flags(settings)) == (None, settings)


def test_a_new_section_of_the_catalogue_appears_in_the_report(tmp_path, monkeypatch):
    """The report's sections come from the catalogue: a section the report has no words for
    still gets its heading and its experiments' rows."""
    import dataclasses

    from cifarlab.study import experiments

    base = next(e for e in catalogue() if e.name == "mlp-best")
    extra = dataclasses.replace(base, name="mlp-wide", section="probes", label="MLP, wide probe")
    monkeypatch.setitem(experiments.SECTIONS, "probes", "Probes: one more section")
    monkeypatch.setattr(experiments, "catalogue", lambda: [*catalogue(), extra])
    text = report.to_markdown(report.Report(report.Found(), tmp_path / "out").build())
    assert "## Probes: one more section" in text and "MLP, wide probe" in text
    assert text.index("## Probes") > text.index("Beyond the seed")


def test_every_results_path_the_docs_cite_exists():
    """A path under results/ named in README, CONTRIBUTING or docs/ (links and backticks alike)
    is in the repository (CI checks a clean clone, so: in git). Patterns such as
    `results/<name>/` or `results/efficientnet-*/` are not paths and are skipped."""
    cited = re.compile(r"(?<![\w/])(?:\.\./)*(results/[A-Za-z0-9_.\-/]*)([<*{]?)")
    docs = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").rglob("*.md"))]
    missing = [
        f"{doc.relative_to(REPO)}: {path}"
        for doc in docs
        for m in cited.finditer(doc.read_text())
        if not m.group(2) and not (REPO / (path := m.group(1).rstrip("."))).exists()
    ]
    assert not missing, "\n".join(missing)
