"""``--val-split N``: a seeded, stratified hold-out of the training images, evaluated with the
test set, so settings can be chosen without looking at the test set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cifarlab.cli import main
from cifarlab.data import load_cifar10, split_validation
from cifarlab.errors import UsageError
from cifarlab.training import checkpoints
from cifarlab.training.recipes import RECIPES
from cifarlab.training.torch_learner import TorchLearner


def test_split_is_stratified_disjoint_and_seeded():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), [30, 30, 30, 30, 30, 20, 20, 20, 20, 20])  # 250 images, two class sizes
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(len(y))  # each image identifiable
    xt, yt, xv, yv = split_validation(x, y, 50, seed=1)
    assert len(yv) == 50 and len(yt) == 200
    assert np.bincount(yv, minlength=10).tolist() == [6] * 5 + [4] * 5  # each class its share
    ids_t, ids_v = set(xt[:, 0, 0, 0]), set(xv[:, 0, 0, 0])
    assert not ids_t & ids_v and len(ids_t | ids_v) == len(y)
    assert np.array_equal(split_validation(x, y, 50, seed=1)[3], yv)
    assert not np.array_equal(split_validation(x, y, 50, seed=2)[2], xv)
    with pytest.raises(UsageError, match="--val-split"):
        split_validation(x, y, len(y), seed=1)


def test_val_metrics_are_logged_and_summarised(synthetic, tmp_path):
    out = tmp_path / "run"
    flags = ["--dnn-hidden-units", "16", "--batch-size", "20", "--max-steps", "6", "--eval-freq", "3",
             "--preprocess", "standard", "--val-split", "20"]  # fmt: skip
    assert (
        main(["train", "mlp", *flags, "--data-dir", str(synthetic[0]), "--no-progress", "--out", str(out)])
        == 0
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "test_acc" in r]
    assert [r["step"] for r in evals] == [3, 6] and all({"val_loss", "val_acc"} <= set(r) for r in evals)
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["val_accuracy"] == evals[-1]["val_acc"] and summary["test_accuracy"] == evals[-1]["test_acc"]
    )
    # the logged validation numbers are those of the held-out images, which training never saw
    x_train, y_train, _, _ = load_cifar10(synthetic[0])
    _, _, x_val, y_val = split_validation(x_train, y_train, 20, seed=42)
    ckpt = checkpoints.load(out)
    cfg = RECIPES["mlp"].make_config(None, **json.loads((out / "config.json").read_text())["train"])
    learner = TorchLearner.create("mlp", cfg, ckpt.preprocess, "cpu")
    learner.model.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.weights.items()})
    ev = learner.evaluate(learner.put(x_val, y_val))
    assert (ev["loss"], ev["acc"]) == (summary["val_loss"], summary["val_accuracy"])


def test_val_split_too_large_is_one_line(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", "mlp", "--val-split", "100", "--data-dir", str(synthetic[0]), "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--val-split 100" in err and not out.exists()
