"""The torch side of the one training loop (``cifarlab.loop.fit``): ``TorchLearner``.

Every torch model of ``create_model`` trains through it: one optimizer step is
``forward -> cross-entropy -> backward -> (clip) -> optimizer step``, with the running loss and
accuracy kept as tensors so the step loop never waits for a host sync. ``evaluate`` runs the
whole test set in large no-grad batches. Weights and optimizer state leave as NumPy arrays for
``cifarlab.checkpoints``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab.config import TrainConfig
from cifarlab.data import Preprocess


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``cfg``; no weight decay on biases and norm scales (ndim <= 1), as
    nanoGPT and timm do. Frozen parameters are left out."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr, wd = cfg.learning_rate, cfg.weight_decay
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": wd},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if cfg.optimizer == "momentum":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def to_tensor(x: np.ndarray, prep: Preprocess, channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW tensor; channels_last keeps the NHWC memory (no copy)."""
    t = torch.from_numpy(prep.nhwc(x)).permute(0, 3, 1, 2)
    return t if channels_last else t.contiguous()


@torch.inference_mode()
def logits_in_batches(
    model: torch.nn.Module,
    x: np.ndarray,
    prep: Preprocess,
    batch_size: int = 1000,
    channels_last: bool = False,
) -> torch.Tensor:
    """The model's logits (N, C) for uint8 NHWC images, in no-grad batches, in whatever mode
    (train/eval) the model is in."""
    return torch.cat(
        [model(to_tensor(x[i : i + batch_size], prep, channels_last)) for i in range(0, len(x), batch_size)]
    )


def evaluate(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    prep: Preprocess,
    batch_size: int = 1000,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Loss, accuracy and predictions over the whole of ``x``, in evaluation mode."""
    was_training = model.training
    model.eval()
    logits = logits_in_batches(model, x, prep, batch_size, channels_last)
    model.train(was_training)
    loss = F.cross_entropy(logits, torch.from_numpy(y)).item()
    pred = logits.argmax(1).numpy()
    return {"loss": loss, "acc": float((pred == y).mean()), "pred": pred}


def grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradient of every weight matrix/kernel (biases and norms skipped)."""
    return {
        n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None and p.ndim >= 2
    }


class TorchLearner:
    """A torch model and its optimizer, driven by ``cifarlab.loop.fit``."""

    libraries = ("numpy", "torch")

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, prep: Preprocess) -> None:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)  # else torch's default: OMP_NUM_THREADS or the cores
        self.cfg, self.prep = cfg, prep
        self.model = model.to(memory_format=torch.channels_last) if cfg.channels_last else model
        self.opt = make_optimizer(cfg, self.model)
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.correct = torch.zeros((), dtype=torch.int64)
        self.model.train()

    @classmethod
    def create(cls, name: str, cfg: TrainConfig, prep: Preprocess) -> TorchLearner:
        """``create_model(name, **cfg.model_kwargs())``, initialised from ``cfg.seed``."""
        from cifarlab.models import create_model

        torch.manual_seed(cfg.seed)
        return cls(create_model(name, **cfg.model_kwargs()), cfg, prep)

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr
        target = torch.from_numpy(y)
        logits = self.model(to_tensor(x, self.prep, self.cfg.channels_last))
        loss = F.cross_entropy(logits, target, label_smoothing=self.cfg.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():
            self.loss_sum += loss.detach() * len(y)
            self.correct += (logits.argmax(1) == target).sum()

    def take_running(self) -> tuple[float, int]:
        out = float(self.loss_sum), int(self.correct)
        self.loss_sum.zero_()
        self.correct.zero_()
        return out

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        ev = evaluate(self.model, x, y, self.prep, self.cfg.eval_batch_size, self.cfg.channels_last)
        return {"loss": ev["loss"], "acc": ev["acc"]}

    def step_metrics(self) -> dict[str, Any]:
        return {"grad_norms": grad_norms(self.model)}  # the gradients of the step just taken

    def weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().contiguous().numpy() for k, v in self.model.state_dict().items()}

    def trainer_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, plain = {}, {}
        sd = self.opt.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    arrays[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous().numpy()
                else:
                    plain.setdefault(str(pid), {})[k] = v
        arrays["rng.torch"] = torch.get_rng_state().numpy()
        return arrays, {"param_groups": sd["param_groups"], "plain_state": plain}

    def load(self, weights: dict[str, np.ndarray], arrays: dict[str, np.ndarray], plain: dict) -> None:
        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        state: dict[int, dict] = {}
        for key, v in arrays.items():
            if key.startswith("opt."):
                _, pid, k = key.split(".", 2)
                state.setdefault(int(pid), {})[k] = torch.from_numpy(v)
        for pid, st in plain["plain_state"].items():
            state.setdefault(int(pid), {}).update(st)
        self.opt.load_state_dict({"state": state, "param_groups": plain["param_groups"]})
        torch.set_rng_state(torch.from_numpy(arrays["rng.torch"]))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def threads(self) -> int:
        return torch.get_num_threads()
