"""The torch trainer: runs end to end, resumes bitwise, stops on NaN keeping the last checkpoint."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cifarlab.cli import main
from cifarlab.data import Preprocess, load_cifar10
from cifarlab.errors import TrainingDiverged
from cifarlab.schedules import lr_at
from cifarlab.training import checkpoints
from cifarlab.training.config import TrainConfig
from cifarlab.training.loop import TrainState, fit, restore
from cifarlab.training.runs import RunDir
from cifarlab.training.torch_learner import TorchLearner, make_optimizer


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


def _fit(model, cfg, run, d, meta=None, resume=False, **kw):
    prep = Preprocess.fit(cfg.preprocess, d[0])
    meta = meta or {"model": "mlp", "model_kwargs": {}}
    learner = TorchLearner(model, cfg, prep)
    state = restore(learner, run, meta) if resume else None
    return fit(learner, cfg, run, d, meta, prep, state=state, progress=False, **kw)


def _sigterm_at(step):
    """An on_step callback that sends this process SIGTERM after ``step`` (the Ctrl-C path)."""

    def on_step(state: TrainState) -> None:
        if state.step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_step


def _tiny_conv_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    )


@pytest.mark.parametrize(
    ("make_model", "extra"),
    [
        (_tiny_model, {}),
        (_tiny_model, {"lookahead": 3}),  # the slow weights travel in the checkpoint
        (_tiny_conv_model, {"channels_last": True}),
        (_tiny_conv_model, {"lookahead": 3}),
        (_tiny_conv_model, {"lookahead": 3, "channels_last": True}),  # BN statistics, NHWC memory
    ],
)
def test_resume_equals_uninterrupted_bitwise(synthetic, tmp_path, make_model, extra):
    d = load_cifar10(synthetic[0])
    cfg = _cfg(log_freq=5, **extra)  # records at steps 4, 5, 8, 10, 12 (evaluations at 4, 8, 12)
    full = RunDir.create("t", out=tmp_path / "full")
    _fit(make_model(), cfg, full, d)
    assert [m["step"] for m in full.read_metrics()] == [4, 5, 8, 10, 12]

    part = RunDir.create("t", out=tmp_path / "part")
    torch.manual_seed(123)  # the interrupted process's RNG history must not matter
    with pytest.raises(KeyboardInterrupt, match="stopped at step 6"):
        _fit(make_model(), cfg, part, d, on_step=_sigterm_at(6))  # between two evaluations and two records
    assert not part.summary_path.exists()
    torch.manual_seed(999)
    _fit(make_model(), cfg, part, d, resume=True)

    a = load_file(str(full.checkpoint_dir / "model.safetensors"))
    b = load_file(str(part.checkpoint_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert strip(full.read_metrics()) == strip(part.read_metrics())
    assert part.read_summary()["test_accuracy"] == full.read_summary()["test_accuracy"]


def test_lookahead_weights_of_another_shape_are_refused(synthetic):
    prep = Preprocess.fit("standard", load_cifar10(synthetic[0])[0])
    learner = TorchLearner(_tiny_model(), _cfg(lookahead=3), prep)
    learner.lookahead(0.5)  # the slow weights start as a copy
    arrays, plain = learner.trainer_state()
    weights = learner.weights()
    fresh = TorchLearner(_tiny_model(), _cfg(lookahead=3), prep)
    fresh.load(weights, arrays, plain)
    assert fresh.slow.keys() == learner.slow.keys()
    arrays["lookahead.4.bias"] = arrays["lookahead.4.bias"][:1]  # (1,) would broadcast into (10,)
    with pytest.raises(ValueError, match="Lookahead weights do not match"):
        fresh.load(weights, arrays, plain)


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
        _fit(_Exploding(), _cfg(augment=False), run, d)
    _, md = checkpoints.load_state(run.checkpoint_dir)
    assert TrainState.from_json(md["state"]).step == 4
    ckpt = checkpoints.load(run.checkpoint_dir)
    assert all(np.isfinite(v).all() for v in ckpt.weights.values())


def test_safetensors_round_trip_keeps_weights_and_preprocessing(synthetic, tmp_path):
    d = load_cifar10(synthetic[0])
    run = RunDir.create("t", out=tmp_path / "r")
    model = _tiny_model()
    _fit(model, _cfg(max_steps=4), run, d, {"model": "mlp", "model_kwargs": {"n_hidden": [7]}})
    ckpt = checkpoints.load(run.checkpoint_dir)
    for k, v in model.state_dict().items():
        assert torch.equal(torch.from_numpy(ckpt.weights[k]), v)
    assert (
        ckpt.model == "mlp" and ckpt.model_kwargs == {"n_hidden": [7]} and ckpt.preprocess.name == "standard"
    )


def test_lr_schedules():
    c = _cfg(max_steps=100, warmup_steps=10, learning_rate=1.0)
    assert lr_at(c, 0) == pytest.approx(0.1) and lr_at(c, 9) == pytest.approx(1.0)
    assert lr_at(c, 99) < 0.01
    oc = _cfg(max_steps=100, warmup_steps=0, schedule="onecycle", learning_rate=1.0)
    assert lr_at(oc, 24) == pytest.approx(1.0) and lr_at(oc, 0) == pytest.approx(1 / 25)
    assert 0 < lr_at(oc, 99) < 0.02  # no step is spent at rate 0
    ends = TrainConfig(learning_rate=2.0, max_steps=100, schedule="onecycle", lr_start=0.2, lr_end=0.1)
    assert lr_at(ends, 0) == pytest.approx(2.0 * (0.2 + 0.8 / 25))
    assert lr_at(ends, 24) == pytest.approx(2.0)
    assert lr_at(ends, 99) == pytest.approx(2.0 * (0.1 + 0.9 / 75))
    assert [lr_at(ends, s) for s in range(25, 100)] == sorted(lr_at(ends, s) for s in range(25, 100))[::-1]


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
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6  # log_freq 0: max(1, 6 // 100)
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
    deadline = time.time() + 180
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.1)
    assert (out / "metrics.jsonl").is_file(), "the run never reached its first evaluation"
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


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "adamw"])
def test_no_weight_decay_on_biases_and_norm_scales(optimizer):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = make_optimizer(_cfg(optimizer=optimizer, weight_decay=0.1), model)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(model[0].weight)] == 0.1
    assert decay[id(model[0].bias)] == decay[id(model[1].weight)] == decay[id(model[1].bias)] == 0.0
    assert len(decay) == 4  # every parameter is in exactly one group


def test_frozen_parameters_are_left_out_of_the_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    opt = make_optimizer(_cfg(), model)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
