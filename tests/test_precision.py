"""Precision is a setting of every test here, never the machine's: each cell of the matrix
{model} x {fp32, bf16 (, fp16)} trains a tiny model for 2 steps with ``--precision`` given,
checks that the checkpoint is float32, and that ``cifarlab eval`` gives exactly the run's own
final accuracy and loss. bf16 autocast runs on every x86 CPU (emulated, slowly, without
AVX512-BF16), so these run on whatever machine CI has. What ``--precision auto`` resolves to
is tested with the CPU probe monkeypatched to both answers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from cifarlab.cli import main
from cifarlab.ops import layernorm
from cifarlab.training import devices
from cifarlab.training.recipes import RECIPES

TINY = ["--max-steps", "2", "--eval-freq", "1", "--no-progress"]
# model -> its arguments at a size that trains in about a second on synthetic data
MLP = ["mlp", "--dnn-hidden-units", "16", "--batch-size", "8"]
MODELS = {
    "mlp-batchnorm": [*MLP, "--norm", "batch"],
    "mlp-layernorm-kernel": [*MLP, "--norm", "layer"],  # the Function, C kernel (when it builds)
    "mlp-layernorm-eager": [*MLP, "--norm", "layer"],  # the Function, eager ops (see _backend)
    "mlp-layernorm-autograd": [*MLP, "--norm", "layer", "--layernorm", "autograd"],
    "mlp-layernorm-torch": [*MLP, "--norm", "layer", "--layernorm", "torch"],
    "convnet": ["convnet", "--batch-size", "4", "--eval-batch-size", "8"],
    "fast": ["fast", "--batch-size", "16", "--widths", "8,16,16", "--eval-batch-size", "8"],
    "efficientnet_lite0": [
        "efficientnet_lite0",
        "--no-pretrained",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--eval-batch-size",
        "8",
    ],  # fmt: skip
}
CELLS = [(m, p) for m in MODELS for p in ("fp32", "bf16")] + [
    ("mlp-layernorm-kernel", "fp16"),
    ("mlp-layernorm-autograd", "fp16"),
    ("mlp-batchnorm", "fp16"),
]


def _backend(model: str) -> str:
    return "eager" if model.endswith("-eager") else "auto"


@pytest.mark.parametrize(("model", "precision"), CELLS)
def test_train_then_eval_reproduces_the_final_numbers(synthetic, tmp_path, model, precision):
    run = tmp_path / "run"
    args = ["train", *MODELS[model], *TINY, "--precision", precision]
    with layernorm.use_backend(_backend(model)):
        assert main([*args, "--data-dir", str(synthetic[0]), "--out", str(run)]) == 0
        config = json.loads((run / "config.json").read_text())
        assert config["distributed"]["precision"] == precision  # the resolved precision is recorded
        if model.startswith("mlp-layernorm-") and model.split("-")[-1] in ("kernel", "eager"):
            assert config["distributed"]["layernorm_backend"] == layernorm.active_backend()
        weights = load_file(str(run / "checkpoint" / "model.safetensors"))
        floats = {k: v.dtype for k, v in weights.items() if v.dtype.kind == "f"}
        assert floats and set(floats.values()) == {np.dtype(np.float32)}, floats  # checkpoints stay fp32
        assert main(["eval", str(run), "--data-dir", str(synthetic[0])]) == 0
    summary = json.loads((run / "summary.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    assert ev["precision"] == precision
    assert ev["test_accuracy"] == summary["test_accuracy"]  # exactly, not approximately
    assert ev["test_loss"] == summary["test_loss"]


def test_eval_in_another_precision_says_so(synthetic, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *MODELS["mlp-batchnorm"], *TINY, "--precision", "fp32",
                 "--data-dir", str(synthetic[0]), "--out", str(run)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", str(run), "--precision", "bf16", "--data-dir", str(synthetic[0])]) == 0
    out = capsys.readouterr().out
    assert "bf16, not the run's fp32" in out
    assert json.loads((run / "eval.json").read_text())["precision"] == "bf16"


def test_numpy_mlp_refuses_bf16_in_one_line(synthetic, tmp_path, capsys):
    code = main(["train", "mlp-numpy", "--dnn-hidden-units", "8", *TINY, "--precision", "bf16",
                 "--data-dir", str(synthetic[0]), "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert (
        code == 2
        and "--precision bf16: the NumPy MLP has no autocast" in err
        and len(err.strip().splitlines()) == 1
    )
    assert not (tmp_path / "run").exists()


def test_numpy_mlp_fp32_eval_reproduces(synthetic, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "mlp-numpy", "--dnn-hidden-units", "8", "--batch-size", "8", *TINY,
                 "--data-dir", str(synthetic[0]), "--out", str(run)]) == 0  # fmt: skip
    assert main(["eval", str(run), "--data-dir", str(synthetic[0])]) == 0
    summary = json.loads((run / "summary.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    assert (ev["test_accuracy"], ev["test_loss"]) == (summary["test_accuracy"], summary["test_loss"])


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("model", ["mlp", "convnet", "fast", "efficientnet_lite0", "vgg13"])
def test_auto_follows_the_cpu_and_the_model(monkeypatch, native, model):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    cfg = RECIPES[model].defaults()
    got = devices.resolve_precision("auto", torch.device("cpu"), cfg.cpu_bf16)
    pays = model in ("mlp", "convnet", "fast")  # measured: docs/benchmarks.md, "Precision"
    assert got == ("bf16" if native and pays else "fp32")
    assert devices.resolve_precision("fp32", torch.device("cpu"), cfg.cpu_bf16) == "fp32"
    assert devices.resolve_precision("bf16", torch.device("cpu"), cfg.cpu_bf16) == "bf16"


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_recorded_resolved(synthetic, tmp_path, monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    run = tmp_path / "run"
    assert main(["train", *MODELS["mlp-batchnorm"], *TINY, "--device", "cpu",
                 "--data-dir", str(synthetic[0]), "--out", str(run)]) == 0  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["precision"] == "auto"
    assert config["distributed"]["precision"] == ("bf16" if native else "fp32")
