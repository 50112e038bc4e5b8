"""The CLI contract: one-line errors with exit status 2, nothing overwritten, run directories."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cifarlab import data
from cifarlab.cli import main
from cifarlab.errors import UsageError
from cifarlab.training.runs import RunDir


def test_verify_ok_then_one_changed_byte(synthetic, capsys):
    root, _ = synthetic
    assert main(["data", "verify", "--data-dir", str(root)]) == 0
    assert capsys.readouterr().out.count("OK ") == len(data.MD5[data.BIN_DIR])
    f = root / data.BIN_DIR / "data_batch_4.bin"
    b = bytearray(f.read_bytes())
    b[-1] ^= 0xFF
    f.write_bytes(bytes(b))
    assert main(["data", "verify", "--data-dir", str(root)]) == 2
    out, err = capsys.readouterr()
    assert "BAD" in out and "data_batch_4.bin" in out and "1 file(s) failed" in err


def test_info_prints_counts(synthetic, capsys):
    assert main(["data", "info", "--data-dir", str(synthetic[0])]) == 0
    out = capsys.readouterr().out
    assert "airplane" in out and "channel mean" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--bogus"],
        ["train", "nope"],
        ["sweep", "nope"],
        ["data", "verify", "--x"],
        ["train", "mlp", "--max-steps", "ten"],
    ],
)
def test_usage_errors_are_one_line_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifarlab: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_missing_data_is_one_line(tmp_path, capsys):
    assert main(["data", "verify", "--data-dir", str(tmp_path)]) == 2
    assert "run `cifarlab data download`" in capsys.readouterr().err


def test_subprocess_entry_point_and_help():
    r = subprocess.run(
        [sys.executable, "-m", "cifarlab", "train", "mlp-numpy", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "--dnn-hidden-units" in r.stdout and "--dnn_hidden_units" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "cifarlab", "data", "verify", "--data-dir", "/nonexistent"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_rundir_refuses_non_empty_out(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not empty"):
        RunDir.create("mlp", out=out)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(UsageError, match="no config.json"):
        RunDir.open(out)


def test_rundir_auto_names_are_unique(tmp_path):
    a = RunDir.create("mlp", root=tmp_path)
    b = RunDir.create("mlp", root=tmp_path)
    assert a.path != b.path and a.path.name.startswith("mlp-")


def test_rundir_writes_summary_and_curves(tmp_path):
    run = RunDir.create("x", out=tmp_path / "r")
    run.write_config({"lr": 0.1})
    for s in (1, 2):
        run.log(
            {
                "step": s,
                "train_loss": 2.0 / s,
                "train_acc": 0.1 * s,
                "test_loss": 2.1 / s,
                "test_acc": 0.3 - 0.1 * s,
            }
        )
    summary = run.finish({"test_accuracy": 0.1, "wall_seconds": 1.0})
    assert summary["best_test_accuracy"] == pytest.approx(0.2)
    assert json.loads(run.summary_path.read_text())["test_accuracy"] == 0.1
    assert run.curves_path.stat().st_size > 1000
    assert {"python", "cifarlab", "numpy", "torch"} <= run.read_config()["versions"].keys()
    assert [m["step"] for m in run.truncate_metrics(1)] == [1]
