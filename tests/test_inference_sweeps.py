"""eval, predict and a tiny sweep, on checkpoints trained in the test."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cifarlab.cli import main


@pytest.fixture
def tiny_run(synthetic, tmp_path):
    out = tmp_path / "run"
    argv = [
        "train",
        "mlp",
        "--data-dir",
        str(synthetic[0]),
        "--out",
        str(out),
        "--no-progress",
        "--max-steps",
        "3",
        "--batch-size",
        "20",
        "--norm",
        "batch",
    ]
    assert main(argv) == 0
    return out


def test_eval_writes_confusion_and_per_class(tiny_run, synthetic, capsys):
    assert main(["eval", str(tiny_run), "--data-dir", str(synthetic[0])]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "airplane" in out
    report = json.loads((tiny_run / "eval.json").read_text())
    assert sum(map(sum, report["confusion"])) == 20
    assert report["test_accuracy"] == pytest.approx(
        json.loads((tiny_run / "summary.json").read_text())["test_accuracy"]
    )
    assert (tiny_run / "confusion.png").stat().st_size > 1000


def test_predict_any_image_and_refuse_non_image(tiny_run, tmp_path, capsys):
    gray = tmp_path / "gray.png"
    Image.new("L", (50, 40), 128).save(gray)
    rgba = tmp_path / "big.png"
    Image.new("RGBA", (300, 200), (10, 200, 30, 255)).save(rgba)
    assert main(["predict", str(tiny_run / "checkpoint"), str(gray), str(rgba)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(str(gray)) and len(lines[0].split(",")) == 3
    assert main(["predict", str(tiny_run / "checkpoint"), str(gray), str(rgba), "--json"]) == 0
    probs = json.loads(capsys.readouterr().out)  # --json prints only JSON
    assert len(probs[str(rgba)]) == 3 and sum(probs[str(rgba)].values()) <= 1.0 + 1e-6
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    assert main(["predict", str(tiny_run), str(gray), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert str(bad) in err and out == "" and err.count("\n") == 1


def test_eval_of_convnet_and_numpy_checkpoints(synthetic, tmp_path, capsys):
    conv = tmp_path / "conv"
    assert (
        main(
            [
                "train",
                "convnet",
                "--data-dir",
                str(synthetic[0]),
                "--out",
                str(conv),
                "--no-progress",
                "--max-steps",
                "1",
                "--batch-size",
                "4",
                "--eval-batch-size",
                "20",
            ]
        )
        == 0
    )
    npy = tmp_path / "npy"
    assert (
        main(
            [
                "train",
                "mlp-numpy",
                "--data-dir",
                str(synthetic[0]),
                "--out",
                str(npy),
                "--no-progress",
                "--max-steps",
                "2",
                "--batch-size",
                "20",
            ]
        )
        == 0
    )
    for run in (conv, npy):
        assert main(["eval", str(run), "--data-dir", str(synthetic[0])]) == 0
        acc = json.loads((run / "eval.json").read_text())["test_accuracy"]
        assert acc == pytest.approx(json.loads((run / "summary.json").read_text())["test_accuracy"])
    assert main(["eval", str(tmp_path / "missing")]) == 2


def test_tiny_table1_sweep_writes_its_table(synthetic, tmp_path, capsys):
    res = tmp_path / "results"
    argv = [
        "sweep",
        "table1",
        "--configs",
        "1,2",
        "--seeds",
        "1",
        "--max-steps",
        "4",
        "--data-dir",
        str(synthetic[0]),
        "--no-verify",
        "--extra=--batch-size 20",
        "--out-root",
        str(tmp_path / "runs"),
        "--results",
        str(res),
        "--jobs",
        "2",
    ]
    assert main(argv) == 0
    table = (res / "table1.md").read_text()
    assert "| 1 | 100 | sgd | 0.001 | 4 | 0.421 |" in table and "| 2 | 100 | adam |" in table
    assert "| 3 |" not in table and (res / "table1.png").is_file()
    assert (tmp_path / "runs" / "config2-seed42" / "summary.json").is_file()


def test_seeds_sweep_reports_mean_and_std(synthetic, tmp_path):
    res = tmp_path / "results"
    argv = [
        "sweep",
        "seeds",
        "mlp-numpy",
        "--seeds",
        "2",
        "--data-dir",
        str(synthetic[0]),
        "--no-verify",
        "--extra=--batch-size 20 --max-steps 2",
        "--out-root",
        str(tmp_path / "runs"),
        "--results",
        str(res),
    ]
    assert main(argv) == 0
    md = (res / "mlp-numpy-seeds.md").read_text()
    assert "| 42 |" in md and "| 43 |" in md and "±" in md and (res / "mlp-numpy-seeds.png").is_file()
    assert main([*argv[:-4], "--extra=--seed 3"]) == 2  # the sweep owns the seeds


def test_activations_sweep_measures_each_activation(synthetic, tmp_path, capsys, monkeypatch):
    from cifarlab.study.sweeps import activations

    monkeypatch.setattr(activations, "HIDDEN", [8, 8])
    monkeypatch.setattr(activations, "STEPS", 4)
    monkeypatch.setattr(activations, "EVAL", 2)
    monkeypatch.chdir(tmp_path)  # tables go under ./runs/sweeps/activations, never ./results
    argv = ["sweep", "activations", "--seeds", "1", "--jobs", "1", "--data-dir", str(synthetic[0])]
    assert main([*argv, "--no-verify", "--extra=--batch-size 20"]) == 0
    out = tmp_path / "runs" / "sweeps" / "activations"
    md = (out / "activations.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| elu", "| tanh", "| relu"))]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert 0 <= float(cells[1]) <= 1  # final test accuracy
        assert len(cells[5].split("→")) == 2 and len(cells[6].split("→")) == 2  # one value per hidden layer
    grads = json.loads((out / "elu-seed42" / "metrics.jsonl").read_text().splitlines()[-1])["grad_norms"]
    assert set(grads) == {"hidden.0.linear.weight", "hidden.1.linear.weight", "output.weight"}
    assert (out / "activations.png").is_file() and (out / "activations_grad.png").is_file()
    assert not (tmp_path / "results").exists()


def test_norms_sweep_covers_every_norm_and_batch_size(synthetic, tmp_path, capsys, monkeypatch):
    from cifarlab.study.sweeps import norms

    monkeypatch.setattr(norms, "BATCHES", (2, 8))
    monkeypatch.setattr(norms, "IMAGES", 16)  # 8 steps at batch 2, 2 at batch 8
    res = tmp_path / "tables"
    argv = ["sweep", "norms", "--jobs", "1", "--data-dir", str(synthetic[0]), "--no-verify"]
    assert main([*argv, "--out-root", str(tmp_path / "runs"), "--out", str(res)]) == 0
    md = (res / "norms.md").read_text()
    assert "| final test accuracy | B=2 | B=8 |" in md
    for norm in ("none", "batch", "layer"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {norm} |"))
        assert all(0 <= float(c) <= 1 for c in row.strip("|").split("|")[1:])
        assert (
            json.loads((tmp_path / "runs" / f"{norm}-b2-seed42" / "summary.json").read_text())["steps"] == 8
        )
    gap = next(line for line in md.splitlines() if line.startswith("| BatchNorm train/eval gap"))
    assert len(gap.split("|")) == 5 and (res / "norms.png").is_file()
    cfg = json.loads((tmp_path / "runs" / "layer-b8-seed42" / "config.json").read_text())
    assert cfg["model_kwargs"]["norm"] == "layer" and cfg["train"]["batch_size"] == 8
