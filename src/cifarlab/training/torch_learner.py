"""The torch side of the one training loop (``cifarlab.training.loop.fit``): ``TorchLearner``.

Every torch model of ``create_model`` trains through it, on any ``--device``, in any
``--precision``, in one process or as one rank of a torchrun job. The uint8 dataset is moved
to the device once (``put``); each step gathers its batch there from a few index arrays
(``cifarlab.data.Batch``), preprocesses it there, and runs
``forward -> cross-entropy -> backward -> (clip) -> optimizer step`` with the running loss and
accuracy kept as device tensors, so the step loop never waits for a host sync. ``evaluate``
runs the whole test set in large no-grad batches, split between the ranks of a job. Weights
and optimizer state leave as float32 NumPy arrays for ``cifarlab.training.checkpoints``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab.data import Batch, Preprocess, confusion_matrix
from cifarlab.ops import sync_batchnorm
from cifarlab.training import distributed
from cifarlab.training.config import TrainConfig
from cifarlab.training.devices import autocast, describe, resolve_device, resolve_precision
from cifarlab.training.distributed import Dist


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``cfg``; no weight decay on biases and norm scales (ndim <= 1), as
    nanoGPT and timm do, unless ``cfg.decay_biases``. Frozen parameters are left out. A model
    may ask for per-parameter learning-rate multipliers (``models.hooks.LearningRateScales``);
    each group keeps its factor as ``lr_scale``, and its decay is divided by it, so that under
    SGD a parameter shrinks by the same lr × decay each step whatever its rate."""
    from cifarlab.models import hooks

    lr, wd = cfg.learning_rate, cfg.weight_decay
    scales = hooks.lr_scales(model)
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decayed = p.ndim >= 2 or cfg.decay_biases
            groups.setdefault((decayed, float(scales.get(name, 1.0))), []).append(p)
    groups = [
        {"params": ps, "weight_decay": wd / scale if decayed else 0.0, "lr_scale": scale}
        for (decayed, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]
    # one fused kernel per step instead of a dozen per parameter list: on a 2-core CPU 4x faster
    # for the ConvNet's 11M parameters (38.6 -> 9.5 ms a step; docs/benchmarks.md)
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = {"fused": True} if devices <= {"cpu", "cuda"} else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, **fused)
    if cfg.optimizer == "momentum":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True, **fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, **fused)
    return torch.optim.AdamW(groups, lr=lr, **fused)


def to_tensor(
    x: np.ndarray, prep: Preprocess, channels_last: bool = False, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW tensor on ``device``; channels_last keeps the NHWC memory."""
    t = torch.from_numpy(prep.nhwc(x)).to(device).permute(0, 3, 1, 2)
    return t if channels_last else t.contiguous()


@torch.inference_mode()
def logits_in_batches(
    model: torch.nn.Module,
    x: np.ndarray,
    prep: Preprocess,
    batch_size: int = 1000,
    channels_last: bool = False,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> torch.Tensor:
    """The model's float32 logits (N, C) on the CPU for uint8 NHWC images, in no-grad batches
    on ``device``, in whatever mode (train/eval) the model is in."""
    device = torch.device(device)
    with autocast(device, precision):
        return torch.cat(
            [
                model(to_tensor(x[i : i + batch_size], prep, channels_last, device)).float().cpu()
                for i in range(0, len(x), batch_size)
            ]
        )


def grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradient of every weight matrix/kernel (biases and norms skipped)."""
    return {
        n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None and p.ndim >= 2
    }


class DeviceData:
    """A dataset on the learner's device: uint8 NHWC images and int64 labels, moved once."""

    def __init__(self, x: np.ndarray, y: np.ndarray, device: torch.device) -> None:
        self.x = torch.from_numpy(x).to(device)  # no copy on the CPU
        self.y = torch.from_numpy(y.astype(np.int64, copy=False)).to(device)

    def __len__(self) -> int:
        return len(self.y)


class TorchLearner:
    """A torch model and its optimizer on one device, driven by ``cifarlab.training.loop.fit``; under
    torchrun, one rank of a data-parallel job (``cifarlab.training.distributed``)."""

    libraries = ("numpy", "torch")

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        prep: Preprocess,
        device: torch.device | None = None,
        dist: Dist | None = None,
    ) -> None:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)  # else torch's default: OMP_NUM_THREADS or the cores
        self.cfg, self.prep, self.dist = cfg, prep, dist or Dist()
        self.device = device or torch.device("cpu")
        self.precision = resolve_precision(cfg.precision, self.device, cfg.cpu_bf16)
        self.backend = distributed.init(self.dist, self.device.type) if self.dist.active else None
        if self.dist.active and cfg.sync_bn:
            model = sync_batchnorm.convert(model, self.device.type)
        model = model.to(self.device)
        self.model = model.to(memory_format=torch.channels_last) if cfg.channels_last else model
        self.net = self.model  # what the training step calls: the model, or its DDP wrapper
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            with distributed.collective("sharing the initial weights"):  # DDP broadcasts rank 0's
                self.net = DistributedDataParallel(
                    self.model,
                    device_ids=[self.device] if self.device.type == "cuda" else None,
                    find_unused_parameters=cfg.changes_trainable(),  # a frozen one takes no part
                )
            torch.manual_seed(cfg.seed + 7919 * self.dist.rank)  # each rank its own dropout masks
        self.opt = make_optimizer(cfg, self.model)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.shift = torch.from_numpy(prep.shift).to(self.device)
        self.scale = torch.from_numpy(prep.scale).to(self.device)
        acc = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        self.loss_sum = torch.zeros((), dtype=acc, device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.slow: dict[str, torch.Tensor] | None = None  # Lookahead's slow weights (cfg.lookahead)
        self.model.train()

    @classmethod
    def create(
        cls,
        name: str,
        cfg: TrainConfig,
        prep: Preprocess,
        device: str = "auto",
        dist: Dist | None = None,
        x_train: np.ndarray | None = None,
    ) -> TorchLearner:
        """``create_model(name, **cfg.model_kwargs())`` on ``device``, initialised from ``cfg.seed``;
        a model that sets itself up from data (``models.hooks.InitFromData``, e.g. ``fast``'s
        whitening) also sees the first 5000 training images ``x_train`` (uint8 NHWC), preprocessed."""
        from cifarlab.models import create_model, hooks

        dist = dist or Dist()
        dev = resolve_device(device, dist)
        torch.manual_seed(cfg.seed)
        model = create_model(name, **cfg.model_kwargs())
        if x_train is not None and isinstance(model, hooks.InitFromData):
            hooks.init_from_data(model, to_tensor(x_train[:5000], prep))
        return cls(model, cfg, prep, dev, dist)

    def put(self, x: np.ndarray, y: np.ndarray) -> DeviceData:
        return DeviceData(x, y, self.device)

    def inputs(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 32, 32, 3) on the device -> preprocessed float32 (B, 3, 32, 32) there
        (the same arithmetic as ``Preprocess.nhwc``)."""
        x = xb.float()
        x -= self.shift
        if self.prep.name != "seed":
            x *= self.scale
        x = x.permute(0, 3, 1, 2)
        return x if self.cfg.channels_last else x.contiguous()

    def step(self, data: DeviceData, batch: Batch, lr: float, epoch: float = 0.0) -> None:
        self.cfg.before_step(self.model, epoch)
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        b = batch.shard(self.dist.rank, self.dist.world_size)
        idx = torch.from_numpy(b.idx).to(self.device, non_blocking=True)
        if b.rows is None:
            xb = data.x[idx]
        else:
            rows = torch.from_numpy(b.rows).to(self.device, non_blocking=True)
            cols = torch.from_numpy(b.cols).to(self.device, non_blocking=True)
            xb = data.x[idx[:, None, None], rows[:, :, None], cols[:, None, :]]
        target = data.y[idx]
        with distributed.collective("training a step"):
            with autocast(self.device, self.precision):
                logits = self.net(self.inputs(xb))
                loss = F.cross_entropy(logits.float(), target, label_smoothing=self.cfg.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.opt)  # clip (and step) the true gradients
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            if self.scaler is None:
                self.opt.step()
            else:
                self.scaler.step(self.opt)  # skipped when the scaled gradients overflowed
                self.scaler.update()
        with torch.no_grad():
            self.loss_sum += loss.detach() * len(target)
            self.correct += (logits.argmax(1) == target).sum()

    @torch.no_grad()
    def lookahead(self, decay: float) -> None:
        """Lookahead (Zhang et al., 2019) with an EMA for its slow weights, over every float
        parameter and buffer (BatchNorm statistics too): slow <- decay·slow + (1 - decay)·fast,
        then fast <- slow. The first call starts the slow weights from the fast ones; decay 1
        just returns the weights to the slow ones (the end of a run)."""
        fast = {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}
        if self.slow is None:
            self.slow = {k: v.detach().clone() for k, v in fast.items()}
        for k, v in fast.items():
            self.slow[k].lerp_(v, 1 - decay)
            v.copy_(self.slow[k])

    def take_running(self) -> tuple[float, int]:
        """The running sums since the last call, over all ranks (a host sync: logging time)."""
        both = torch.stack([self.loss_sum.double(), self.correct.double()]).cpu()
        distributed.all_reduce_sum(both, self.dist, "summing the training loss")
        self.loss_sum.zero_()
        self.correct.zero_()
        return float(both[0]), int(both[1])

    def evaluate(self, data: DeviceData, final: bool = True) -> dict[str, Any]:
        """Loss, accuracy and confusion matrix (rows: true class, columns: predicted) over all
        of ``data`` in evaluation mode, inside the config's ``evaluating`` context (``final``:
        the run's last evaluation). Under torchrun rank r takes evaluation batches r,
        r + world_size, ...; the per-image losses and predictions are summed over the ranks
        (other ranks' entries are 0) and the losses then summed in image order, so every rank
        gets exactly the numbers one process would."""
        n, bs = len(data), self.cfg.eval_batch_size
        if self.dist.active:
            with distributed.collective("sharing BatchNorm statistics"):
                for buf in self.model.buffers():  # each rank's running statistics -> rank 0's
                    torch.distributed.broadcast(buf, 0)
        per_image = torch.zeros(2, n, device=self.device)  # loss, predicted class (exact in float32)
        self.model.eval()
        try:
            with (
                self.cfg.evaluating(self.model, final),
                torch.no_grad(),
                autocast(self.device, self.precision),
            ):
                for k, i in enumerate(range(0, n, bs)):
                    if k % self.dist.world_size != self.dist.rank:
                        continue
                    logits = self.model(self.inputs(data.x[i : i + bs])).float()
                    target = data.y[i : i + bs]
                    per_image[0, i : i + bs] = F.cross_entropy(logits, target, reduction="none")
                    per_image[1, i : i + bs] = logits.argmax(1)
        finally:
            self.model.train()
        per_image = per_image.cpu()
        distributed.all_reduce_sum(per_image, self.dist, "evaluating")
        confusion = confusion_matrix(data.y.cpu().numpy(), per_image[1].long().numpy())
        return {
            "loss": float(per_image[0].double().sum()) / n,
            "acc": int(np.trace(confusion)) / n,
            "confusion": confusion,
        }

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
        for k, v in (self.slow or {}).items():
            arrays[f"lookahead.{k}"] = v.cpu().contiguous().numpy()
        arrays["rng.torch"] = torch.get_rng_state().numpy()
        if self.device.type == "cuda":
            arrays["rng.cuda"] = torch.cuda.get_rng_state(self.device).numpy()
        extra = {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}
        return arrays, {"param_groups": sd["param_groups"], "plain_state": plain, **extra}

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
        for param, st in self.opt.state.items():  # buffers come back contiguous: give them the
            for k, v in st.items():  # parameter's layout, which fused steps assume (else wrong math)
                if torch.is_tensor(v) and v.shape == param.shape and v.stride() != param.stride():
                    st[k] = torch.empty_strided(
                        param.shape, param.stride(), dtype=v.dtype, device=v.device
                    ).copy_(v)
        slow = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("lookahead.")}
        fast = self.model.state_dict()
        if slow and {k: v.shape for k, v in slow.items()} != {
            k: tuple(v.shape) for k, v in fast.items() if v.is_floating_point()
        }:
            raise ValueError("the checkpoint's Lookahead weights do not match the model's")
        # in the model's own memory layout (channels_last), as an uninterrupted run has them
        self.slow = {k: torch.empty_like(fast[k]).copy_(torch.from_numpy(v)) for k, v in slow.items()} or None
        if self.scaler is not None and "scaler" in plain:
            self.scaler.load_state_dict(plain["scaler"])
        torch.set_rng_state(torch.from_numpy(arrays["rng.torch"]))
        if self.device.type == "cuda" and "rng.cuda" in arrays:
            torch.cuda.set_rng_state(torch.from_numpy(arrays["rng.cuda"]), self.device)
        if self.dist.rank > 0:  # rank 0's saved generator, moved on by the rank
            torch.manual_seed(int(torch.randint(2**62, ())) + self.dist.rank)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def runtime(self) -> dict[str, Any]:
        """Where and how this run computes, for config.json."""
        out = {
            "device": describe(self.device),
            "precision": self.precision,
            "world_size": self.dist.world_size,
            "backend": self.backend,
            "sync_bn": bool(self.cfg.sync_bn and self.dist.active),
        }
        from cifarlab.ops.layernorm import LayerNormManual, active_backend

        if any(isinstance(m, LayerNormManual) for m in self.model.modules()):
            out["layernorm_backend"] = active_backend()  # the C kernel or eager ops (CIFARLAB_LAYERNORM)
        return out

    def threads(self) -> int:
        return torch.get_num_threads()
