"""The torch trainer: runs end to end, resumes bitwise, stops on NaN keeping the last checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cifarlab.cli import main
from cifarlab.data import load_cifar10
from cifarlab.runs import RunDir
from cifarlab.schedules import lr_at
from cifarlab.train import TrainConfig, TrainingDiverged, fit, load_weights


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(3072, 16),
        torch.nn.ELU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 10),
    )


def _cfg(**kw):
    base = dict(
        max_steps=12,
        eval_freq=4,
        batch_size=16,
        optimizer="adam",
        learning_rate=1e-3,
        schedule="cosine",
        warmup_steps=2,
        augment=True,
        preprocess="standard",
        threads=1,
    )
    return TrainConfig(**{**base, **kw})


def test_resume_equals_uninterrupted_bitwise(synthetic, tmp_path):
    d = load_cifar10(synthetic[0])
    meta = {"model": "tiny"}
    full = RunDir.create("t", out=tmp_path / "full")
    fit(_tiny_model(), _cfg(), full, d, meta, progress=False)

    part = RunDir.create("t", out=tmp_path / "part")
    torch.manual_seed(123)  # the interrupted process's RNG history must not matter
    assert fit(_tiny_model(), _cfg(), part, d, meta, progress=False, stop_after=6) == {"stopped_at": 6}
    torch.manual_seed(999)
    fit(_tiny_model(), _cfg(), part, d, meta, progress=False, resume=True)

    a = load_file(str(full.checkpoint_dir / "model.safetensors"))
    b = load_file(str(part.checkpoint_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert strip(full.read_metrics()) == strip(part.read_metrics())
    assert part.read_summary()["test_accuracy"] == full.read_summary()["test_accuracy"]


class _Exploding(torch.nn.Module):
    """Returns inf logits from the 7th training forward on."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3072, 10)
        self.calls = 0

    def forward(self, x):
        out = self.lin(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls >= 7:
                out = out * float("inf")
        return out


def test_nan_stops_and_keeps_last_good_checkpoint(synthetic, tmp_path):
    d = load_cifar10(synthetic[0])
    run = RunDir.create("t", out=tmp_path / "r")
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        fit(_Exploding(), _cfg(augment=False), run, d, {"model": "x"}, progress=False)
    state = json.loads(
        __import__("safetensors")
        .safe_open(str(run.checkpoint_dir / "state.safetensors"), "pt")
        .metadata()["state"]
    )
    assert state["step"] == 4
    weights, _, _ = load_weights(run.checkpoint_dir)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_safetensors_round_trip_keeps_weights_and_preprocessing(synthetic, tmp_path):
    d = load_cifar10(synthetic[0])
    run = RunDir.create("t", out=tmp_path / "r")
    model = _tiny_model()
    fit(model, _cfg(max_steps=4), run, d, {"model": "tiny", "model_kwargs": {"a": 1}}, progress=False)
    weights, meta, prep = load_weights(run.checkpoint_dir)
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v)
    assert meta["model_kwargs"] == {"a": 1} and prep.name == "standard"


def test_lr_schedules():
    c = _cfg(max_steps=100, warmup_steps=10, learning_rate=1.0)
    assert lr_at(c, 0) == pytest.approx(0.1) and lr_at(c, 9) == pytest.approx(1.0)
    assert lr_at(c, 99) < 0.01
    oc = _cfg(max_steps=100, warmup_steps=0, schedule="onecycle", learning_rate=1.0)
    assert lr_at(oc, 24) == pytest.approx(1.0) and lr_at(oc, 0) == pytest.approx(1 / 25)
    assert 0 < lr_at(oc, 99) < 0.02  # no step is spent at rate 0


def test_train_mlp_cli_end_to_end(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "mlp",
        "--data-dir",
        str(synthetic[0]),
        "--out",
        str(out),
        "--max-steps",
        "6",
        "--eval-freq",
        "3",
        "--batch-size",
        "20",
        "--no-progress",
        "--optimizer",
        "adam",
    ]
    assert main(argv) == 0
    assert "test accuracy" in capsys.readouterr().out
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 6 and cfg["model_kwargs"]["n_hidden"] == [100]
    assert cfg["data"]["data_batch_1.bin"]
    summary = json.loads((out / "summary.json").read_text())
    assert {"test_accuracy", "best_test_accuracy", "wall_seconds", "images_per_second"} <= summary.keys()
    before = (out / "summary.json").read_bytes()
    assert main(argv) == 2  # refuses to overwrite the run
    assert (out / "summary.json").read_bytes() == before
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["train", "mlp", "--resume", str(out), "--data-dir", str(synthetic[0])]) == 2  # finished
    assert (out / "summary.json").read_bytes() == before
    np.testing.assert_equal(
        main(["train", "mlp", "--resume", str(tmp_path / "nothing"), "--data-dir", str(synthetic[0])]), 2
    )


def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(synthetic, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "cifarlab",
        "train",
        "mlp",
        "--data-dir",
        str(synthetic[0]),
        "--no-verify",
        "--out",
        str(out),
        "--no-progress",
        "--max-steps",
        "1000000",
        "--eval-freq",
        "5",
        "--batch-size",
        "20",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and f"--resume {out}" in err and "Traceback" not in err
    state = json.loads(
        __import__("safetensors")
        .safe_open(str(out / "checkpoint" / "state.safetensors"), "pt")
        .metadata()["state"]
    )
    assert state["step"] >= 5
    assert not (out / "summary.json").exists()  # an interrupted run is not a finished one
