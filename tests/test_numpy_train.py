"""The NumPy trainer end to end: the seed's flags, run directory, real-data learning."""

from __future__ import annotations

import json

import pytest

from cifarlab.cli import main


def test_mlp_numpy_cli_with_course_spellings(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "mlp-numpy",
        "--data-dir",
        str(synthetic[0]),
        "--out",
        str(out),
        "--no-progress",
        "--dnn_hidden_units",
        "8,6",
        "--max_steps",
        "6",
        "--eval-freq",
        "3",
        "--batch_size",
        "20",
        "--learning_rate",
        "1e-2",
    ]
    assert main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["dnn_hidden_units"] == [8, 6] and cfg["train"]["max_steps"] == 6
    assert cfg["train"]["learning_rate"] == 1e-2 and cfg["train"]["init"] == "seed"
    assert "numpy" in cfg["versions"] and "torch" not in cfg["versions"]  # torch plays no part
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # log_freq 0: max(1, 6 // 100)
    assert [m["step"] for m in metrics if "test_acc" in m] == [3, 6]
    assert (out / "curves.png").is_file() and (out / "checkpoint" / "model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] == metrics[-1]["test_acc"]


def test_mlp_numpy_logistic_regression_and_bad_flags(synthetic, tmp_path, capsys):
    base = [
        "train",
        "mlp-numpy",
        "--data-dir",
        str(synthetic[0]),
        "--no-progress",
        "--max-steps",
        "2",
        "--batch-size",
        "20",
    ]
    assert main([*base, "--out", str(tmp_path / "a"), "--dnn-hidden-units", ""]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--dnn-hidden-units", "10,x"]) == 2
    assert main([*base, "--out", str(tmp_path / "c"), "--learning-rate", "-1"]) == 2
    err = capsys.readouterr().err
    assert "expected comma-separated integers" in err and "--learning-rate must be in (0, inf)" in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # nothing half-made


@pytest.mark.slow
def test_numpy_mlp_learns_real_cifar10(real_data_dir, tmp_path):
    out = tmp_path / "real"
    argv = [
        "train",
        "mlp-numpy",
        "--data-dir",
        str(real_data_dir),
        "--out",
        str(out),
        "--no-progress",
        "--max-steps",
        "300",
    ]
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] > 0.35


def test_mlp_numpy_resumes_bitwise_through_the_same_loop(synthetic, tmp_path):
    import os
    import signal

    import numpy as np

    from cifarlab.data import Preprocess, load_cifar10
    from cifarlab.numpy_nn.train import NumpyLearner
    from cifarlab.training import checkpoints
    from cifarlab.training.loop import fit, restore
    from cifarlab.training.recipes import RECIPES
    from cifarlab.training.runs import RunDir

    d = load_cifar10(synthetic[0])
    cfg = RECIPES["mlp-numpy"].make_config(
        "best", dnn_hidden_units=[16], max_steps=10, eval_freq=4, log_freq=3, batch_size=20, warmup_steps=2
    )  # records at steps 3, 4, 6, 8, 9, 10: the stop at 5 falls between two
    meta = {"model": "mlp-numpy", "model_kwargs": cfg.model_kwargs()}
    prep = Preprocess.fit(cfg.preprocess, d[0])

    def run(out, resume=False, **kw):
        learner = NumpyLearner.create("mlp-numpy", cfg, prep)
        state = restore(learner, out, meta) if resume else None
        return fit(learner, cfg, out, d, meta, prep, state=state, progress=False, **kw)

    full, part = RunDir.create("t", out=tmp_path / "full"), RunDir.create("t", out=tmp_path / "part")
    run(full)

    def sigterm_at_5(state):
        if state.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        run(part, on_step=sigterm_at_5)
    run(part, resume=True)
    a, b = checkpoints.load(full.path), checkpoints.load(part.path)
    assert a.weights.keys() == b.weights.keys()
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert strip(full.read_metrics()) == strip(part.read_metrics())
