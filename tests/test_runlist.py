"""`cifarlab runs` and `cifarlab compare`: every status, damaged runs as rows, the project's
own results/, and one-line errors that write nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cifarlab
from cifarlab.cli import main
from cifarlab.training.runs import read_run

RESULTS = Path(__file__).resolve().parents[1] / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(
    folder: Path,
    name: str,
    *,
    steps: tuple[int, ...] = (100, 200),
    summary: bool = True,
    train: dict | None = None,
    preset: str = "seed",
) -> Path:
    """A run directory as the trainers write it: an evaluation record per step in ``steps``."""
    path = folder / name
    path.mkdir(parents=True)
    config = {
        "model": "mlp",
        "preset": preset,
        "train": {"learning_rate": 0.001, "max_steps": 200, **(train or {})},
    }
    (path / "config.json").write_text(json.dumps(config))
    records = [
        {"step": s, "train_loss": 2 - s / 1000, "test_acc": s / 1000, "seconds": s / 10} for s in steps
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary:
        (path / "summary.json").write_text(json.dumps({"test_accuracy": 0.5, "wall_seconds": 42.0}))
    return path


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def listed(capsys, *folders: str) -> dict[str, dict]:
    """run name -> row of `cifarlab runs FOLDER... --json`."""
    assert main(["runs", *folders, "--json"]) == 0
    return {row["run"]: row for row in json.loads(capsys.readouterr().out)}


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("cifarlab: error:") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_every_status_and_a_damaged_run_is_a_row(tmp_path, capsys):
    make_run(tmp_path, "done")
    (make_run(tmp_path, "live", summary=False) / ".lock").write_text(str(os.getpid()))
    (make_run(tmp_path, "stale", summary=False) / ".lock").write_text(str(dead_pid()))
    make_run(tmp_path, "stopped", summary=False)
    diverged = make_run(tmp_path, "nan", summary=False)
    (diverged / "diverged.json").write_text(json.dumps({"step": 150, "message": "loss is nan"}))
    (make_run(tmp_path, "broken") / "config.json").write_text("{not json")

    rows = listed(capsys, str(tmp_path))
    assert {name: r["status"] for name, r in rows.items()} == {
        "done": "finished",
        "live": "running",
        "stale": "interrupted",
        "stopped": "interrupted",
        "nan": "diverged",
        "broken": "damaged",
    }
    assert rows["nan"]["note"] == "at step 150"
    assert rows["broken"]["note"] == "config.json is not valid JSON"
    keys = ("test_accuracy", "partial", "wall_seconds", "steps", "max_steps")
    assert [rows["done"][k] for k in keys] == [0.5, False, 42.0, 200, 200]
    assert (tmp_path / "live" / ".lock").read_text() == str(os.getpid())  # no lock taken or removed

    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "damaged: config.json is not valid JSON" in out and "diverged: at step 150" in out
    assert "6 runs (1 finished, 1 running, 1 diverged, 2 interrupted, 1 damaged)" in out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 6 and len({len(line) for line in table}) == 1  # aligned columns


def test_unfinished_run_shows_its_last_evaluation_as_partial(tmp_path, capsys):
    run = make_run(tmp_path, "half", steps=(100,), summary=False)
    with open(run / "metrics.jsonl", "a") as f:  # a training-loss-only record after the evaluation
        f.write(json.dumps({"step": 150, "train_loss": 1.2, "seconds": 90.0}) + "\n")
    row = listed(capsys, str(tmp_path))["half"]
    assert (row["steps"], row["max_steps"], row["test_accuracy"], row["partial"]) == (150, 200, 0.1, True)
    assert row["wall_seconds"] == 90.0
    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 150/200 " in out and "0.1000*" in out and "1.5 min" in out and "* last evaluation" in out


@pytest.mark.parametrize(
    ("file", "content", "reason"),
    [
        ("metrics.jsonl", '{"step": 100}\n{"step": 2', "metrics.jsonl:2: damaged"),
        ("metrics.jsonl", b"\xff\xfe\x00", "metrics.jsonl is unreadable"),
        ("summary.json", "[]", "summary.json has no test_accuracy"),
        ("config.json", '{"model": "mlp"}', "config.json has no train settings"),
        ("diverged.json", "{}", "diverged.json has no step"),
    ],
)
def test_damaged_files_are_named(tmp_path, capsys, file, content, reason):
    run = make_run(tmp_path, "bad")
    make_run(tmp_path, "good")
    target = run / file
    target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    rows = listed(capsys, str(tmp_path))
    assert rows["bad"]["status"] == "damaged" and rows["bad"]["note"].startswith(reason)
    assert rows["good"]["status"] == "finished"


def test_sorted_by_date_and_checkpoints_and_hidden_folders_not_searched(tmp_path, capsys):
    for name, mtime in (("a", 3_000_000_000), ("b", 1_000_000_000), ("c", 2_000_000_000)):
        config = make_run(tmp_path / "sub", name) / "config.json"
        os.utime(config, (mtime, mtime))
    (tmp_path / "sub" / "a" / "checkpoint").mkdir()
    (tmp_path / "sub" / "a" / "checkpoint" / "config.json").write_text("{}")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "config.json").write_text("{}")
    assert list(listed(capsys, str(tmp_path))) == ["sub/b", "sub/c", "sub/a"]
    assert list(listed(capsys, str(tmp_path / "sub" / "c"))) == ["c"]  # the folder is the run


def test_runs_on_the_projects_results(capsys):
    expected = {  # run directories at any depth (results/fast/s0, ...), named relative to results/
        c.parent.relative_to(RESULTS).as_posix(): json.loads((c.parent / "summary.json").read_text())[
            "test_accuracy"
        ]
        for c in RESULTS.rglob("config.json")
    }
    assert len(expected) >= 5
    rows = listed(capsys, str(RESULTS))
    assert {name: (r["status"], r["test_accuracy"]) for name, r in rows.items()} == {
        name: ("finished", accuracy) for name, accuracy in expected.items()
    }
    assert main(["runs", str(RESULTS)]) == 0
    out = capsys.readouterr().out
    assert f"{len(expected)} runs ({len(expected)} finished)" in out
    assert all(f"{accuracy:.4f}" in out for accuracy in expected.values())


def test_compare_the_projects_convnets(tmp_path, capsys):
    out = tmp_path / "c.png"
    assert (
        main(["compare", str(RESULTS / "convnet-seed"), str(RESULTS / "convnet-best"), "--out", str(out)])
        == 0
    )
    assert out.read_bytes()[:8] == PNG_MAGIC
    text = capsys.readouterr().out
    table = text.split("settings that differ:\n")[1].split("\n\n")[0].splitlines()
    settings = {line.split("|")[1].strip() for line in table[2:]}
    assert {"preset", "learning_rate", "max_steps", "optimizer", "schedule"} <= settings
    assert not {"model", "batch_size", "seed"} & settings  # the same in both runs
    assert "0.8079" in text and "0.8713" in text and "min" in text
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]  # no temporary file left


def test_compare_same_settings_missing_key_and_default_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, "x")
    make_run(tmp_path, "y", steps=(100,), summary=False)
    assert main(["compare", "x", "y"]) == 0
    text = capsys.readouterr().out
    assert "the runs share all settings" in text and "0.1000*" in text
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG_MAGIC
    make_run(tmp_path, "z", train={"augment": True})
    assert main(["compare", "x", "z"]) == 0  # replaces compare.png: the output asked for
    assert any(
        line.split() == ["|", "augment", "|", "—", "|", "true", "|"]
        for line in capsys.readouterr().out.splitlines()
    )


def test_runs_errors_are_one_line(tmp_path, capsys):
    assert "does not exist" in one_line_error(capsys, ["runs", str(tmp_path / "nope")])
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    err = one_line_error(capsys, ["runs", str(tmp_path / "empty")])
    assert "no run directories" in err and "cifarlab train" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["x"], "at least two run directories"),
        (["x", "nope"], "nope"),
        (["x", "bad"], "bad is damaged"),
        (["x", "x"], "named twice"),
        (["x", "y", "--out", "missing/c.png"], "does not exist"),
        (["x", "y", "--out", "notes.txt"], "not a .png"),
        (["x", "y", "--out", "folder.png"], "not a file"),
        (["x", "y", "--metric", "bogus"], "invalid choice"),
    ],
)
def test_compare_errors_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, "x")
    make_run(tmp_path, "y")
    (make_run(tmp_path, "bad") / "metrics.jsonl").write_text("garbage\n")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "folder.png").mkdir()
    before = sorted(tmp_path.rglob("*"))
    assert message in one_line_error(capsys, ["compare", *argv])
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / "notes.txt").read_text() == "mine"


def test_importing_the_commands_imports_neither_torch_nor_matplotlib():
    """The CLI imports both modules to build its parser: `cifarlab runs` must stay fast."""
    code = "import sys, cifarlab.study.runlist, cifarlab.study.compare; print(sorted({'torch', 'matplotlib'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(Path(cifarlab.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert r.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- the hardened reader

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "diverged.json")
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    file=st.sampled_from(RUN_FILES),
    content=st.binary(max_size=200) | _json.map(lambda v: json.dumps(v).encode()),
)
def test_any_bytes_in_any_file_give_a_row_or_a_reason(tmp_path, file, content):
    """Random bytes or random JSON in any file of a run: read_run never raises; the run is read
    or marked damaged with a reason (and `cifarlab runs` prints a table)."""
    run = tmp_path / "r"
    shutil.rmtree(run, ignore_errors=True)
    make_run(tmp_path, "r")
    (run / file).write_bytes(content)
    got = read_run(run)
    assert got.problem is None or (isinstance(got.problem, str) and got.problem)


@pytest.mark.parametrize("file", RUN_FILES)
def test_deep_json_fifo_and_endless_files_are_damaged_not_a_hang(tmp_path, capsys, file):
    deep = tmp_path / "deep"
    make_run(tmp_path, "deep")
    (deep / file).write_text("[" * 100_000 + "]" * 100_000)
    assert any(why in read_run(deep).problem for why in ("nested", "not valid JSON", "not a metrics record"))
    fifo = tmp_path / "fifo"
    make_run(tmp_path, "fifo")
    (fifo / file).unlink(missing_ok=True)
    os.mkfifo(fifo / file)
    assert "not a regular file" in read_run(fifo).problem
    endless = tmp_path / "endless"
    make_run(tmp_path, "endless")
    (endless / file).unlink(missing_ok=True)
    (endless / file).symlink_to("/dev/zero")
    assert "not a regular file" in read_run(endless).problem
    assert main(["runs", str(tmp_path)]) == 0
    assert "3 runs" in capsys.readouterr().out
