"""The one trainer for every torch model: step loop, evaluation, checkpoints, resume.

Read top to bottom: ``TrainConfig`` (every knob, seed defaults), ``lr_at`` (schedules),
``evaluate`` (full test set, big no-grad batches), ``fit`` (the loop), and ``run_recipe``
(what ``cifarlab train <model>`` calls: config -> run directory -> data -> model -> fit).
The trainer never imports a specific model: recipes hand it ``create_model``'s name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cifarlab.data import PREPROCESSINGS, Batches, Preprocess, dataset_fingerprint, load_cifar10
from cifarlab.errors import UsageError
from cifarlab.runs import RunDir, print_result, training_summary
from cifarlab.schedules import SCHEDULES, lr_at

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


@dataclass
class TrainConfig:
    """Training settings shared by every torch recipe. Defaults are the seed's MLP protocol."""

    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    max_steps: int = field(default=1400, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=200, metadata={"help": "training batch size"})
    eval_freq: int = field(default=100, metadata={"help": "evaluate on the whole test set every N steps"})
    optimizer: str = field(default="sgd", metadata={"help": "optimizer", "choices": OPTIMIZERS})
    momentum: float = field(default=0.9, metadata={"help": "momentum of 'momentum' (Nesterov)"})
    weight_decay: float = field(default=0.0, metadata={"help": "L2 (sgd/adam) or decoupled (adamw)"})
    schedule: str = field(default="constant", metadata={"help": "LR schedule", "choices": SCHEDULES})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the loss"})
    grad_clip: float = field(default=0.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    augment: bool = field(default=False, metadata={"help": "random crop (pad 4) + horizontal flip"})
    preprocess: str = field(
        default="seed", metadata={"help": "input preprocessing", "choices": PREPROCESSINGS}
    )
    seed: int = field(default=42, metadata={"help": "seed of init, batches and augmentation"})
    eval_batch_size: int = field(default=1000, metadata={"help": "no-grad evaluation batch"})
    channels_last: bool = field(default=False, metadata={"help": "NHWC memory format (faster convs on CPU)"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: $OMP_NUM_THREADS, else all cores)"})
    log_grad_norms: bool = field(
        default=False, metadata={"help": "log each weight's gradient norm per evaluation"}
    )

    def validate(self) -> None:
        for name in ("learning_rate", "max_steps", "batch_size", "eval_freq", "eval_batch_size"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise UsageError(f"--warmup-steps must be in 0..{self.max_steps}, got {self.warmup_steps}")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")

    def model_kwargs(self) -> dict[str, Any]:
        """Arguments for ``create_model``; recipes override."""
        return {}


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # no weight decay on biases and norm scales (ndim <= 1), as nanoGPT and timm do
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr, wd = cfg.learning_rate, cfg.weight_decay
    params = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": wd},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
    ]
    params = [g for g in params if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if cfg.optimizer == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=wd)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def to_tensor(x: np.ndarray, prep: Preprocess, channels_last: bool) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW tensor; channels_last keeps the NHWC memory (no copy)."""
    t = torch.from_numpy(prep.nhwc(x)).permute(0, 3, 1, 2)
    return t if channels_last else t.contiguous()


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    prep: Preprocess,
    batch_size: int = 1000,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Loss, accuracy and predictions over the whole of ``x`` in large no-grad batches."""
    was_training = model.training
    model.eval()
    loss_sum, preds = 0.0, []
    for i in range(0, len(x), batch_size):
        logits = model(to_tensor(x[i : i + batch_size], prep, channels_last))
        target = torch.from_numpy(y[i : i + batch_size])
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        preds.append(logits.argmax(1).numpy())
    model.train(was_training)
    pred = np.concatenate(preds)
    return {"loss": loss_sum / len(x), "acc": float((pred == y).mean()), "pred": pred}


def grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradient of every weight matrix/kernel (biases and norms skipped)."""
    return {
        n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None and p.ndim >= 2
    }


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    run: RunDir,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    meta: dict[str, Any],
    prep: Preprocess,
) -> None:
    """Weights (+ preprocessing stats) and trainer state as two safetensors files, swapped in
    as one directory so a crash leaves the previous checkpoint or the new one, never a mix."""
    tmp = run.path / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    weights["__preprocess__.shift"] = torch.from_numpy(np.ascontiguousarray(prep.shift))
    weights["__preprocess__.scale"] = torch.from_numpy(np.ascontiguousarray(prep.scale))
    save_file(
        weights,
        tmp / "model.safetensors",
        metadata={"cifarlab": json.dumps({**meta, "preprocess": prep.name})},
    )
    tensors, plain = _flatten_optimizer(opt.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(
        tensors,
        tmp / "state.safetensors",
        metadata={"state": json.dumps(state), "optimizer": json.dumps(plain)},
    )
    final, old = run.checkpoint_dir, run.path / "checkpoint.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain_state = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.contiguous()
            else:
                plain_state.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "plain_state": plain_state}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for pid, st in plain["plain_state"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": plain["param_groups"]}


def find_checkpoint(path: Path) -> Path:
    """The checkpoint directory of a run directory (or the directory/file given)."""
    path = Path(path)
    if path.is_file():
        return path.parent
    for cand in (path / "checkpoint", path / "checkpoint.old", path):
        if (cand / "model.safetensors").is_file():
            return cand
    raise UsageError(f"no checkpoint in {path} (expected checkpoint/model.safetensors)")


def read_safetensors(f: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of one safetensors file, opened once (no code can run)."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as st:
            return {k: st.get_tensor(k) for k in st.keys()}, st.metadata() or {}
    except Exception as e:  # corrupted or not a safetensors file
        raise UsageError(f"{f}: not a readable cifarlab checkpoint ({e})") from None


def load_weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Preprocess]:
    """Weights, metadata and preprocessing of a checkpoint."""
    weights, md = read_safetensors(Path(ckpt) / "model.safetensors")
    meta = json.loads(md.get("cifarlab", "{}"))
    prep = Preprocess(
        meta.get("preprocess", "seed"),
        weights.pop("__preprocess__.shift").numpy(),
        weights.pop("__preprocess__.scale").numpy(),
    )
    return weights, meta, prep


# --------------------------------------------------------------------------- the loop


class _StopRequested:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopRequested:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class TrainingDiverged(UsageError):
    """Loss became NaN/inf; the last good checkpoint is kept."""


def fit(
    model: torch.nn.Module,
    cfg: TrainConfig,
    run: RunDir,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    meta: dict[str, Any],
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``cfg.max_steps`` steps, evaluating every ``cfg.eval_freq``.

    ``meta`` ({"model": name, "model_kwargs": ...}) goes into the checkpoint so eval/predict
    can rebuild the model. ``stop_after`` (tests) simulates an interruption after that step.
    """
    from tqdm import tqdm

    x_train, y_train, x_test, y_test = data
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # else torch's default: OMP_NUM_THREADS or the cores
    prep = Preprocess.fit(cfg.preprocess, x_train)
    batches = Batches(x_train, y_train, cfg.batch_size, seed=cfg.seed, augment=cfg.augment)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model)

    # running sums since the last evaluation, kept as tensors: no host sync inside the loop
    state = {
        "step": 0, "elapsed": 0.0, "train_seconds": 0.0, "loss_sum": 0.0, "correct": 0, "seen": 0,
        "eval_seconds": 0.0, "eval_images": 0,
    }  # fmt: skip
    if resume:
        ckpt = find_checkpoint(run.path)
        weights, _, _ = load_weights(ckpt)
        model.load_state_dict(weights)
        tensors, md = read_safetensors(ckpt / "state.safetensors")
        opt.load_state_dict(_unflatten_optimizer(tensors, json.loads(md["optimizer"])))
        torch.set_rng_state(tensors["rng.torch"])
        state.update(json.loads(md["state"]))
        run.truncate_metrics(state["step"])
    loss_sum = torch.tensor(state["loss_sum"], dtype=torch.float64)
    correct = torch.tensor(state["correct"], dtype=torch.int64)

    def checkpoint(step: int) -> None:
        st = {**state, "step": step, "loss_sum": float(loss_sum), "correct": int(correct)}
        save_checkpoint(run, model, opt, st, meta, prep)

    start_step = state["step"]
    t0 = time.perf_counter() - state["elapsed"]
    bar = tqdm(
        total=cfg.max_steps,
        initial=start_step,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
        desc=run.path.name,
    )
    model.train()
    t_train = time.perf_counter()
    with _StopRequested() as stop, bar:
        for step in range(start_step, cfg.max_steps):
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            xb, yb = batches.batch(step)
            x = to_tensor(xb, prep, cfg.channels_last)
            y = torch.from_numpy(yb)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                loss_sum += loss.detach() * len(yb)
                correct += (logits.argmax(1) == y).sum()
            state["seen"] += len(yb)
            bar.update(1)
            done = step + 1
            if done % cfg.eval_freq == 0 or done == cfg.max_steps:
                state["train_seconds"] += time.perf_counter() - t_train
                train_loss = float(loss_sum) / state["seen"]
                if not math.isfinite(train_loss):
                    raise TrainingDiverged(
                        f"loss became {train_loss} before step {done}; stopped. The last good "
                        f"checkpoint is kept in {run.checkpoint_dir}. Try a lower --learning-rate "
                        "or --grad-clip 1.0"
                    )
                t_eval = time.perf_counter()
                ev = evaluate(model, x_test, y_test, prep, cfg.eval_batch_size, cfg.channels_last)
                state["eval_seconds"] += time.perf_counter() - t_eval
                state["eval_images"] += len(x_test)
                record = {
                    "step": done,
                    "epoch": round(batches.epoch_of(done), 4),
                    "train_loss": train_loss,
                    "train_acc": int(correct) / state["seen"],
                    "test_loss": ev["loss"],
                    "test_acc": ev["acc"],
                    "seconds": round(time.perf_counter() - t0, 3),
                    "lr": lr,
                }
                if cfg.log_grad_norms:  # gradients of the step just taken are still in .grad
                    record["grad_norms"] = grad_norms(model)
                run.log(record)
                loss_sum.zero_()
                correct.zero_()
                state["seen"] = 0
                state["elapsed"] = time.perf_counter() - t0
                checkpoint(done)
                bar.set_postfix(
                    loss=f"{train_loss:.3f}",
                    test_acc=f"{ev['acc']:.4f}",
                    img_s=f"{done * cfg.batch_size / max(state['elapsed'], 1e-9):.0f}",
                )
                t_train = time.perf_counter()
            if stop.signum is not None or (stop_after is not None and done == stop_after):
                state["train_seconds"] += time.perf_counter() - t_train
                state["elapsed"] = time.perf_counter() - t0
                checkpoint(done)
                if stop.signum is not None:
                    raise KeyboardInterrupt(f"stopped at step {done}; resume with --resume {run.path}")
                return {"stopped_at": done}
    summary = training_summary(
        run,
        cfg.max_steps,
        cfg.batch_size,
        batches.epoch_of(cfg.max_steps),
        time.perf_counter() - t0,
        state["train_seconds"],
        cfg.max_steps - start_step,
    )
    summary["eval_images_per_second"] = round(state["eval_images"] / max(state["eval_seconds"], 1e-9), 1)
    summary["resumed"] = resume
    return run.finish(summary, title=f"{meta.get('model', '')} {run.path.name}")


# --------------------------------------------------------------------------- recipes


def run_recipe(args: Any, cfg_cls: type[TrainConfig], presets: dict[str, dict], model: str) -> int:
    """``cifarlab train <model>``: config from flags (or the run being resumed), run
    directory, data, model, fit; prints the result."""
    from cifarlab.config import config_from_args
    from cifarlab.models import create_model

    if args.resume:
        if args.out and Path(args.out) != Path(args.resume):
            raise UsageError("give either --out or --resume (a resumed run continues in its own directory)")
        run = RunDir.create(model, out=args.resume, resume=True)
        if run.summary_path.is_file():
            raise UsageError(f"{run.path} is a finished run (it has summary.json); nothing to resume")
        saved = run.read_config()
        names = {f.name for f in dataclasses.fields(cfg_cls)}
        cfg = cfg_cls(**{k: v for k, v in saved["train"].items() if k in names})
        find_checkpoint(run.path)  # fail early, before loading data
    else:
        cfg = config_from_args(cfg_cls, args, presets)
        run = RunDir.create(model, out=args.out)
    data = load_cifar10(args.data_dir, verify=args.verify)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    kwargs = cfg.model_kwargs()
    net = create_model(model, **kwargs)
    meta = {"model": model, "model_kwargs": kwargs}
    if not args.resume:
        run.write_config(
            {
                "command": "cifarlab train " + model,
                "preset": args.preset,
                **meta,
                "train": dataclasses.asdict(cfg),
                "data": dataset_fingerprint(args.data_dir),
                "parameters": sum(p.numel() for p in net.parameters()),
            }
        )
    summary = fit(net, cfg, run, data, meta, resume=bool(args.resume), progress=args.progress)
    print_result(run, summary)
    return 0
