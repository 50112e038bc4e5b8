"""The NumPy side of the one training loop (``cifarlab.training.loop.fit``): ``NumpyLearner``.

``cifarlab train mlp-numpy`` trains the NumPy MLP by hand-written backprop through the same
loop, run directory, checkpoints and resume as every torch model; presets are in
``cifarlab.training.recipes``. Never imports torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cifarlab.data import Batch, Preprocess, confusion_matrix
from cifarlab.numpy_nn.mlp import MLP
from cifarlab.numpy_nn.modules import SoftmaxCrossEntropy
from cifarlab.numpy_nn.optim import SGD, Adam, Optimizer
from cifarlab.training.config import TrainConfig


def make_optimizer(cfg: TrainConfig, model: MLP) -> Optimizer:
    """The optimizer of ``cfg`` (no weight decay on biases, as in the torch trainer)."""
    params, lr, wd = model.parameters(), cfg.learning_rate, cfg.weight_decay
    if cfg.optimizer in ("adam", "adamw"):
        return Adam(params, lr=lr, weight_decay=wd, decoupled=cfg.optimizer == "adamw")
    if cfg.optimizer == "momentum":
        return SGD(params, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=wd)
    return SGD(params, lr=lr, weight_decay=wd)


def features(x: np.ndarray, prep: Preprocess, dtype: np.dtype) -> np.ndarray:
    """uint8 NHWC -> (N, 3072) rows. NHWC order: an MLP does not care which pixel is where."""
    return prep.nhwc(x).reshape(len(x), -1).astype(dtype, copy=False)


def evaluate(model: MLP, x: np.ndarray, y: np.ndarray, prep: Preprocess, batch_size: int) -> dict[str, Any]:
    """Mean loss, accuracy and the confusion matrix (rows: true class, columns: predicted)
    over the whole of ``x``, in batches."""
    ce = SoftmaxCrossEntropy()
    loss_sum, confusion = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model.logits(features(x[i : i + batch_size], prep, model.dtype))
        yb = y[i : i + batch_size]
        loss_sum += ce.forward(logits, yb) * len(yb)
        confusion = confusion + confusion_matrix(yb, logits.argmax(1))
    return {"loss": loss_sum / len(x), "acc": int(np.trace(confusion)) / len(x), "confusion": confusion}


class NumpyLearner:
    """The NumPy MLP and its optimizer, driven by ``cifarlab.training.loop.fit``."""

    libraries = ("numpy",)

    def __init__(self, model: MLP, cfg: TrainConfig, prep: Preprocess) -> None:
        self.model, self.cfg, self.prep = model, cfg, prep
        self.opt = make_optimizer(cfg, model)
        self.ce = SoftmaxCrossEntropy()
        self.loss_sum, self.correct = 0.0, 0

    @classmethod
    def create(cls, name: str, cfg: TrainConfig, prep: Preprocess) -> NumpyLearner:
        from cifarlab.registry import create_model

        return cls(create_model(name, seed=cfg.seed, **cfg.model_kwargs()), cfg, prep)

    def put(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x, y  # NumPy computes where the arrays already are

    @np.errstate(over="ignore", invalid="ignore")  # a diverging run is caught by the loop, in one line
    def step(self, data: tuple[np.ndarray, np.ndarray], batch: Batch, lr: float, epoch: float = 0.0) -> None:
        self.cfg.before_step(self.model, epoch)
        x, y = batch.gather(*data)
        self.opt.lr = lr
        logits = self.model.logits(features(x, self.prep, self.model.dtype))
        loss = self.ce.forward(logits, y)
        self.model.backward_logits(self.ce.backward())
        self.opt.step()
        self.loss_sum += float(loss) * len(y)
        self.correct += int((logits.argmax(1) == y).sum())

    def take_running(self) -> tuple[float, int]:
        out = self.loss_sum, self.correct
        self.loss_sum, self.correct = 0.0, 0
        return out

    @np.errstate(over="ignore", invalid="ignore")
    def evaluate(self, data: tuple[np.ndarray, np.ndarray], final: bool = True) -> dict[str, Any]:
        return evaluate(self.model, *data, self.prep, self.cfg.eval_batch_size)

    def lookahead(self, decay: float) -> None:
        raise NotImplementedError("--lookahead is a torch trainer setting (its config refuses it here)")

    def step_metrics(self) -> dict[str, Any]:
        return {
            "grad_norms": {k: float(np.linalg.norm(g)) for k, g in self.model.grads.items() if g.ndim >= 2}
        }

    def weights(self) -> dict[str, np.ndarray]:
        return self.model.state_dict()

    def trainer_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return self.opt.state_dict(), {}

    def load(self, weights: dict[str, np.ndarray], arrays: dict[str, np.ndarray], plain: dict) -> None:
        self.model.load_state_dict(weights)
        self.opt.load_state_dict(arrays)

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def runtime(self) -> dict[str, Any]:
        return {
            "device": "cpu",
            "precision": np.dtype(self.model.dtype).name,
            "world_size": 1,
            "backend": None,
        }

    def threads(self) -> int:
        import os

        return int(
            os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1
        )
