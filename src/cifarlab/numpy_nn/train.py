"""``cifarlab train mlp-numpy``: the NumPy MLP trained by hand-written backprop.

Presets: ``seed`` is the seed's Part 1 (hidden 100, SGD, lr 1e-3, 1400 steps, batch 200,
evaluation every 100 steps, N(0, 1e-4^2) init, seed preprocessing); ``best`` is our NumPy
recipe (He init, Adam, cosine schedule, weight decay, augmentation), still pure NumPy.
Writes the same run directory as the torch trainer (cifarlab.runs). Never imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cifarlab.config import add_config_args, config_from_args
from cifarlab.data import PREPROCESSINGS, Batches, Preprocess, dataset_fingerprint, load_cifar10
from cifarlab.errors import UsageError
from cifarlab.numpy_nn.mlp import MLP
from cifarlab.numpy_nn.modules import SoftmaxCrossEntropy
from cifarlab.numpy_nn.optim import SGD, Adam, Optimizer
from cifarlab.runs import RunDir, print_result, training_summary
from cifarlab.schedules import SCHEDULES, lr_at


@dataclass
class NumpyMLPConfig:
    dnn_hidden_units: list[int] = field(
        default_factory=lambda: [100], metadata={"help": "hidden sizes, comma-separated ('' = none)"}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    max_steps: int = field(default=1400, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=200, metadata={"help": "training batch size"})
    eval_freq: int = field(default=100, metadata={"help": "evaluate on the whole test set every N steps"})
    seed: int = field(default=42, metadata={"help": "seed of init, batches and augmentation"})
    activation: str = field(
        default="elu", metadata={"help": "hidden activation", "choices": ("elu", "relu", "tanh")}
    )
    init: str = field(default="seed", metadata={"help": "weight init", "choices": ("seed", "he", "glorot")})
    optimizer: str = field(
        default="sgd", metadata={"help": "optimizer", "choices": ("sgd", "momentum", "adam")}
    )
    momentum: float = field(default=0.9, metadata={"help": "momentum of 'momentum' (Nesterov)"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay (decoupled for adam)"})
    schedule: str = field(default="constant", metadata={"help": "LR schedule", "choices": SCHEDULES})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    augment: bool = field(default=False, metadata={"help": "random crop (pad 4) + horizontal flip"})
    preprocess: str = field(
        default="seed", metadata={"help": "input preprocessing", "choices": PREPROCESSINGS}
    )
    dtype: str = field(default="float32", metadata={"help": "float type", "choices": ("float32", "float64")})
    eval_batch_size: int = field(default=2500, metadata={"help": "evaluation batch"})

    def validate(self) -> None:
        for name in ("learning_rate", "max_steps", "batch_size", "eval_freq", "eval_batch_size"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


PRESETS: dict[str, dict[str, Any]] = {
    "seed": {},
    "best": {
        "dnn_hidden_units": [1024, 1024],
        "activation": "elu",
        "init": "he",
        "optimizer": "adam",
        "learning_rate": 1e-3,
        "weight_decay": 0.02,
        "schedule": "cosine",
        "warmup_steps": 200,
        "batch_size": 256,
        "max_steps": 6000,
        "eval_freq": 500,
        "augment": True,
        "preprocess": "standard",
    },
}


def make_optimizer(cfg: NumpyMLPConfig, model: MLP) -> Optimizer:
    params = model.parameters()
    if cfg.optimizer == "adam":
        return Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "momentum":
        return SGD(
            params, lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
        )
    return SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def features(x: np.ndarray, prep: Preprocess, dtype: np.dtype) -> np.ndarray:
    """uint8 NHWC -> (N, 3072) rows. NHWC order: an MLP does not care which pixel is where."""
    return prep.nhwc(x).reshape(len(x), -1).astype(dtype, copy=False)


def evaluate(model: MLP, x: np.ndarray, y: np.ndarray, prep: Preprocess, batch_size: int) -> dict[str, float]:
    """Mean loss and accuracy over the whole of ``x``, in batches."""
    ce = SoftmaxCrossEntropy()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model.logits(features(x[i : i + batch_size], prep, model.dtype))
        yb = y[i : i + batch_size]
        loss_sum += ce.forward(logits, yb) * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
    return {"loss": loss_sum / len(x), "acc": correct / len(x)}


def fit(
    cfg: NumpyMLPConfig, run: RunDir, data: tuple, progress: bool = True, started: float | None = None
) -> dict[str, Any]:
    """Train the NumPy MLP of ``cfg``; logs to ``run`` and returns the summary."""
    from tqdm import tqdm

    t0 = time.perf_counter() if started is None else started  # wall time includes loading
    x_train, y_train, x_test, y_test = data
    dtype = np.dtype(cfg.dtype)
    model = MLP(
        3072,
        cfg.dnn_hidden_units,
        10,
        activation=cfg.activation,
        init=cfg.init,
        dtype=dtype,
        rng=np.random.default_rng(cfg.seed),
    )
    opt = make_optimizer(cfg, model)
    ce = SoftmaxCrossEntropy()
    prep = Preprocess.fit(cfg.preprocess, x_train)
    batches = Batches(x_train, y_train, cfg.batch_size, seed=cfg.seed, augment=cfg.augment)
    loss_sum, correct, seen, train_seconds = 0.0, 0, 0, 0.0
    t_train = time.perf_counter()
    for step in tqdm(range(cfg.max_steps), disable=not progress, unit="step", desc=run.path.name):
        opt.lr = lr_at(cfg, step)
        xb, yb = batches.batch(step)
        logits = model.logits(features(xb, prep, dtype))
        loss = ce.forward(logits, yb)
        model.backward_logits(ce.backward())
        opt.step()
        loss_sum += loss * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(yb)
        done = step + 1
        if done % cfg.eval_freq == 0 or done == cfg.max_steps:
            train_seconds += time.perf_counter() - t_train
            if not np.isfinite(loss_sum):
                raise UsageError(f"loss became {loss_sum} before step {done}; try a lower --learning-rate")
            ev = evaluate(model, x_test, y_test, prep, cfg.eval_batch_size)
            run.log(
                {
                    "step": done,
                    "epoch": round(batches.epoch_of(done), 4),
                    "train_loss": loss_sum / seen,
                    "train_acc": correct / seen,
                    "test_loss": ev["loss"],
                    "test_acc": ev["acc"],
                    "seconds": round(time.perf_counter() - t0, 3),
                    "lr": opt.lr,
                }
            )
            loss_sum, correct, seen = 0.0, 0, 0
            t_train = time.perf_counter()
    save_weights(run, model, prep)
    summary = training_summary(
        run,
        cfg.max_steps,
        cfg.batch_size,
        batches.epoch_of(cfg.max_steps),
        time.perf_counter() - t0,
        train_seconds,
    )
    return run.finish(summary, title=f"mlp-numpy {run.path.name}")


def save_weights(run: RunDir, model: MLP, prep: Preprocess) -> None:
    from safetensors.numpy import save_file

    run.checkpoint_dir.mkdir(exist_ok=True)
    tensors = {**model.state_dict(), "__preprocess__.shift": prep.shift, "__preprocess__.scale": prep.scale}
    meta = {
        "model": "mlp-numpy",
        "n_hidden": model.n_hidden,
        "activation": model.activation,
        "preprocess": prep.name,
    }
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        str(run.checkpoint_dir / "model.safetensors"),
        metadata={"cifarlab": json.dumps(meta)},
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, NumpyMLPConfig, PRESETS)


def main(args: argparse.Namespace) -> int:
    if args.resume:
        raise UsageError("mlp-numpy runs take seconds to minutes and are not resumable; start a new run")
    cfg = config_from_args(NumpyMLPConfig, args, PRESETS)
    started = time.perf_counter()
    run = RunDir.create("mlp-numpy", out=args.out)
    data = load_cifar10(args.data_dir, verify=args.verify)
    run.write_config(
        {
            "command": "cifarlab train mlp-numpy",
            "preset": args.preset,
            "model": "mlp-numpy",
            "train": dataclasses.asdict(cfg),
            "data": dataset_fingerprint(args.data_dir),
        },
        libraries=("numpy",),
    )
    summary = fit(cfg, run, data, progress=args.progress, started=started)
    print_result(run, summary)
    return 0
