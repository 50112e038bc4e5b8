"""The one training loop, for the NumPy and the torch trainers alike, and ``cifarlab train``.

A *learner* (``cifarlab.train.TorchLearner``, ``cifarlab.numpy_nn.train.NumpyLearner``)
owns a model and its optimizer in one framework and knows how to take one step, evaluate,
and give/take its weights and optimizer state as NumPy arrays. Everything else lives here,
read top to bottom:

* ``TrainState``: the loop's counters, serialised into every checkpoint;
* ``fit``: the step loop. Every ``log_freq`` steps it appends a metrics record: the training
  loss and accuracy since the previous record (reading them is a host sync, so the steps in
  between never wait). Every ``eval_freq`` steps it also evaluates, adds the test metrics to
  that step's record, and checkpoints. SIGINT/SIGTERM checkpoint at the next step boundary;
  a NaN/inf loss stops the run, writes diverged.json and keeps the last good checkpoint;
  ``resume`` continues bitwise where the checkpoint left off; ``--tensorboard`` also writes the
  records as TensorBoard event files; the summary adds the final evaluation's per-class
  accuracy and confusion matrix;
* ``main``: what ``cifarlab train MODEL`` runs: flags -> validated config -> data -> learner
  -> run directory (locked) -> ``fit``. Nothing is written before everything is validated.

Under torchrun (``cifarlab.distributed``) every rank runs all of this; rank 0 alone creates,
writes and locks the run directory, and the ranks agree on when to stop.

No torch import here: ``cifarlab train mlp-numpy`` never loads it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np

from cifarlab import checkpoints
from cifarlab.config import (
    BOOKKEEPING,
    TrainConfig,
    add_config_args,
    add_data_args,
    add_device_arg,
    add_progress_arg,
    flag,
    given_flags,
    make_config,
)
from cifarlab.data import (
    CLASSES,
    Batch,
    Batches,
    Preprocess,
    dataset_fingerprint,
    load_cifar10,
    split_validation,
)
from cifarlab.distributed import Dist, any_rank, broadcast_text
from cifarlab.errors import CheckpointError, CifarlabError, TrainingDiverged, UsageError, reason
from cifarlab.recipes import Recipe
from cifarlab.runs import (
    RunDir,
    TensorBoardLog,
    atomic_write_json,
    evaluations,
    machine,
    print_result,
    require_tensorboard,
)
from cifarlab.schedules import lookahead_decay, lr_at

_IMPORTED = time.perf_counter()
Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
# settings a --resume may change: they alter neither the weights so far nor the batches
RESUMABLE_CHANGES = ("max_steps", *sorted(BOOKKEEPING))
STOP_CHECK_STEPS = 8  # under torchrun, the ranks agree on a stop request every this many steps
LOG_FILE_PROGRESS_SECONDS = 10  # a progress bar into a file (not a terminal) prints this seldom


@dataclass
class TrainState:
    """Where a run is: its step, its clocks, and the training loss/accuracy sums since the
    last metrics record (so a run stopped between records resumes to the same metrics)."""

    step: int = 0
    elapsed: float = 0.0  # wall seconds, over all sessions of the run
    train_seconds: float = 0.0  # of which in training steps
    eval_seconds: float = 0.0
    eval_images: int = 0
    loss_sum: float = 0.0  # Σ loss × batch size since the last metrics record
    correct: int = 0
    seen: int = 0
    setup_seconds: float = 0.0  # process start -> first step (data loading, model set-up)
    metrics_bytes: int = 0  # metrics.jsonl's length when this state was saved (0: not recorded)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        """The state saved by :meth:`to_json`; anything else is a CheckpointError."""
        try:
            state = cls(**json.loads(text))
        except (TypeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"damaged trainer state in the checkpoint ({e})") from None
        for f in dataclasses.fields(state):
            v = getattr(state, f.name)
            ok = isinstance(v, int) if f.type in ("int", int) else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or not np.isfinite(v) or (v < 0 and f.name != "loss_sum"):
                raise CheckpointError(f"damaged trainer state in the checkpoint ({f.name}={v!r})")
        return state


class Learner(Protocol):
    """A model + optimizer in one framework; all arrays that cross this boundary are NumPy."""

    libraries: tuple[str, ...]  # whose versions config.json records

    def put(self, x: np.ndarray, y: np.ndarray) -> Any:
        """uint8 NHWC images and their labels, moved where the learner computes (once)."""

    def step(self, data: Any, batch: Batch, lr: float, epoch: float = 0.0) -> None:
        """One optimizer step on ``batch`` of ``data`` (from :meth:`put`) at learning rate
        ``lr``, adding to the running loss and correct-count sums (no host sync needed);
        ``epoch`` (epochs done) goes to the config's ``before_step`` first."""

    def take_running(self) -> tuple[float, int]:
        """The loss sum and correct count since the last call (over all ranks), reset to 0."""

    def evaluate(self, data: Any, final: bool = True) -> dict[str, Any]:
        """{"loss", "acc", "confusion"} over all of ``data`` (evaluation mode, no gradients);
        confusion: (classes, classes) int array of counts, rows true class, columns predicted.
        Evaluations before the ``final`` one may be cheaper (e.g. fewer test-time views)."""

    def lookahead(self, decay: float) -> None:
        """Pull the weights to a slow average of themselves (torch only: ``--lookahead``)."""

    def step_metrics(self) -> dict[str, Any]:
        """Extra metrics of the step just taken, logged at evaluations (e.g. gradient norms)."""

    def weights(self) -> dict[str, np.ndarray]: ...

    def trainer_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Optimizer buffers and RNG state as arrays, and the rest as JSON-able values."""

    def load(self, weights: dict[str, np.ndarray], arrays: dict[str, np.ndarray], plain: dict) -> None: ...

    def num_parameters(self) -> int: ...

    def runtime(self) -> dict[str, Any]:
        """{"device", "precision", "world_size", "backend", ...}: recorded in config.json."""

    def threads(self) -> int: ...


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


def fit(
    learner: Learner,
    cfg: TrainConfig,
    run: RunDir,
    data: Data,
    meta: dict[str, Any],
    prep: Preprocess,
    state: TrainState | None = None,
    progress: bool = True,
    on_step: Callable[[TrainState], None] | None = None,
    dist: Dist | None = None,
    tensorboard: bool = False,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    setup_seconds: float = 0.0,
) -> dict[str, Any]:
    """Train from ``state`` (a fresh one, or :func:`restore`'s to resume) to ``cfg.max_steps``,
    logging every ``cfg.log_steps()`` and evaluating, logging and checkpointing every
    ``cfg.eval_freq``; returns the summary. ``meta`` ({"model", "model_kwargs"}) goes into the
    checkpoint so eval/predict can rebuild the model; ``on_step`` is called after every step;
    ``tensorboard`` also writes the records into ``<run>/tensorboard/``; ``setup_seconds`` (the
    time from the process's start to this call) is added to the evaluation times in the
    summary's ``time_to_accuracy``. Under torchrun
    (``dist``) only rank 0 writes, and the other ranks return an empty summary."""
    dist = dist or Dist()
    resumed = state is not None
    state = state or TrainState(setup_seconds=setup_seconds)
    s = _Session(learner, cfg, run, data, meta, prep, state, dist, val)
    if resumed and s.writer:
        run.truncate_metrics(state.step, state.metrics_bytes)
    board = TensorBoardLog(run.tensorboard_dir, state.step) if tensorboard and s.writer else None
    last_eval: dict[str, Any] | None = None
    t_train = time.perf_counter()
    with _StopRequested() as stop, s.open_bar(progress), board or contextlib.nullcontext():
        for step in range(state.step, cfg.max_steps):
            lr = lr_at(cfg, step)
            learner.step(s.train_data, s.batches.plan(step), lr, s.batches.epoch_of(step))
            state.step, state.seen = step + 1, state.seen + cfg.batch_size
            decay = lookahead_decay(cfg, state.step)
            if decay is not None:
                learner.lookahead(decay)
            s.bar.update(1)
            if on_step is not None:
                on_step(state)
            at_eval = state.step % cfg.eval_freq == 0 or state.step == cfg.max_steps
            at_record = at_eval or state.step % s.log_steps == 0
            stopping = stop.signum is not None
            if dist.active:  # every rank must stop at the same step: agree now and then
                stopping = (
                    any_rank(stopping, dist) if at_eval or state.step % STOP_CHECK_STEPS == 0 else False
                )
            if not (at_record or stopping):
                continue
            s.collect_running()  # waits for the steps so far: training time
            if at_eval or stopping:  # evaluating and checkpointing are not
                state.train_seconds += time.perf_counter() - t_train
            ev = s.evaluate() if at_eval else None
            if at_record:
                record = s.record(lr, ev)
                s.log(record, board)
                s.show(record)
            if at_eval or stopping:
                s.checkpoint()
            if stopping:
                raise KeyboardInterrupt(f"stopped at step {state.step}; resume with --resume {run.path}")
            if at_eval:
                last_eval, t_train = ev, time.perf_counter()
    if last_eval is None:  # resumed from a stop right after the final evaluation: evaluate again
        last_eval = learner.evaluate(s.test_data)  # (every rank: under torchrun it is a collective)
    return s.summary(last_eval, resumed) if s.writer else {}


class _Session:
    """One session of a run, from its state to ``cfg.max_steps``: the data where the learner
    computes, the clock, and what :func:`fit` does at a record, an evaluation, a checkpoint."""

    def __init__(self, learner: Learner, cfg: TrainConfig, run: RunDir, data: Data, meta: dict[str, Any],
                 prep: Preprocess, state: TrainState, dist: Dist, val: tuple[np.ndarray, np.ndarray] | None):  # fmt: skip
        self.learner, self.cfg, self.run, self.meta, self.prep, self.state = (
            learner,
            cfg,
            run,
            meta,
            prep,
            state,
        )
        self.writer, self.val = dist.is_main, val
        x_train, y_train, x_test, y_test = data
        if cfg.test_images:  # a quick look: the first N test images (the test set is in random order)
            x_test, y_test = x_test[: cfg.test_images], y_test[: cfg.test_images]
        self.test_images = len(x_test)
        self.batches = Batches(
            x_train, y_train, cfg.batch_size, seed=cfg.seed, augment=cfg.augment, crop_pad=cfg.crop_pad,
            flip=cfg.flip,
        )  # fmt: skip
        self.train_data, self.test_data = learner.put(x_train, y_train), learner.put(x_test, y_test)
        self.quick = {  # the test images of each quick check (cfg.quick_check_images), put once
            n: learner.put(x_test[:n], y_test[:n])
            for n in {cfg.quick_check_images(s) for s in range(cfg.eval_freq, cfg.max_steps, cfg.eval_freq)}
            - {0}
        }
        self.val_data = learner.put(*val) if val is not None else None  # held out of x_train by split_data
        # checkpoints name their run (a run directory made by hand, as in tests, may have no config)
        self.run_id = run.read_config().get("run_id") if self.writer and run.config_path.is_file() else None
        self.first_step, self.first_train_seconds = state.step, state.train_seconds
        self.log_steps = cfg.log_steps()
        self.t0 = time.perf_counter() - state.elapsed  # the run's clock, over all its sessions
        self.postfix: dict[str, str] = {}

    def open_bar(self, progress: bool) -> Any:
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.cfg.max_steps, initial=self.first_step, disable=not (progress and self.writer), unit="step",
            dynamic_ncols=True, desc=self.run.path.name, file=sys.stderr,
            mininterval=0.1 if sys.stderr.isatty() else LOG_FILE_PROGRESS_SECONDS,
        )  # fmt: skip
        return self.bar

    def checkpoint(self) -> None:
        state, run = self.state, self.run
        state.elapsed = time.perf_counter() - self.t0
        if not self.writer:
            return
        arrays, plain = self.learner.trainer_state()
        # the metrics this checkpoint goes with: a resume drops whatever was appended after
        state.metrics_bytes = run.metrics_path.stat().st_size if run.metrics_path.is_file() else 0
        plain = {**plain, "optimizer": self.cfg.optimizer, "run_id": self.run_id}
        extra = {"state": state.to_json(), "plain": json.dumps(plain)}
        checkpoints.save(run.checkpoint_dir, self.learner.weights(), self.meta, self.prep, arrays, extra)

    def collect_running(self) -> None:
        """Add the learner's running sums to the state: a host sync (under torchrun a
        collective), so the loop calls it only at metrics records and stops."""
        loss_sum, correct = self.learner.take_running()
        self.state.loss_sum += loss_sum
        self.state.correct += correct
        if not np.isfinite(self.state.loss_sum):
            self.diverged()

    def diverged(self) -> NoReturn:
        run, state = self.run, self.state
        kept = (
            f"The last good checkpoint is kept in {run.checkpoint_dir}."
            if run.checkpoint_dir.exists()
            else "No evaluation had passed: nothing was kept."
        )
        hint = "a lower --learning-rate" + (" or --grad-clip 1.0" if self.cfg.torch_trainer else "")
        message = f"loss became {state.loss_sum} before step {state.step}; stopped. {kept} Try {hint}"
        if self.writer:  # for `cifarlab runs`, which tells a diverged run from an interrupted one
            atomic_write_json(run.diverged_path, {"step": state.step, "message": message})
        raise TrainingDiverged(message)

    def evaluate(self) -> dict[str, Any]:
        state, learner = self.state, self.learner
        t_eval = time.perf_counter()
        final = state.step == self.cfg.max_steps  # a fast model may evaluate earlier ones more cheaply
        n_quick = self.cfg.quick_check_images(state.step)
        if n_quick:  # a quick look at the first test images, one view: no validation
            ev = {
                **learner.evaluate(self.quick[n_quick], final=False),
                "images": min(n_quick, self.test_images),
            }
        else:
            ev = learner.evaluate(self.test_data, final=final)
            if self.val_data is not None:
                ev["val"] = learner.evaluate(self.val_data, final=final)
        state.eval_seconds += time.perf_counter() - t_eval
        state.eval_images += ev.get("images") or self.test_images + (
            len(self.val[1]) if self.val is not None else 0
        )
        return ev

    def record(self, lr: float, ev: dict[str, Any] | None) -> dict[str, Any]:
        """The metrics record of this step: the training means since the previous record,
        and, at an evaluation, its test metrics (and the gradient norms if asked for)."""
        state = self.state
        record: dict[str, Any] = {
            "step": state.step,
            "epoch": round(self.batches.epoch_of(state.step), 4),
            "train_loss": state.loss_sum / state.seen,
            "train_acc": state.correct / state.seen,
        }
        if ev is not None and "val" in ev:
            record |= {"val_loss": ev["val"]["loss"], "val_acc": ev["val"]["acc"]}
        if ev is not None:
            record |= {"test_loss": ev["loss"], "test_acc": ev["acc"]}
            if "images" in ev:  # a quick check: on this many test images only
                record["test_images"] = ev["images"]
        record |= {"seconds": round(time.perf_counter() - self.t0, 3), "lr": lr}
        if ev is not None and self.cfg.log_grad_norms:
            record |= self.learner.step_metrics()
        return record

    def log(self, record: dict[str, Any], board: TensorBoardLog | None) -> None:
        if self.writer:
            self.run.log(record)
            if board is not None:
                board.add(record)
        self.state.loss_sum, self.state.correct, self.state.seen = 0.0, 0, 0  # the next record starts afresh

    def show(self, record: dict[str, Any]) -> None:
        self.postfix["loss"] = f"{record['train_loss']:.3f}"
        if "test_acc" in record:
            trained = max(self.state.train_seconds - self.first_train_seconds, 1e-9)
            self.postfix["test_acc"] = f"{record['test_acc']:.4f}"
            self.postfix["img_s"] = (
                f"{(self.state.step - self.first_step) * self.cfg.batch_size / trained:.0f}"
            )
        self.bar.set_postfix(
            self.postfix, refresh=False
        )  # shown at the bar's next print, not one line per record

    def summary(self, last_eval: dict[str, Any], resumed: bool) -> dict[str, Any]:
        """summary.json from metrics.jsonl (written by :meth:`RunDir.finish`, with the curves)."""
        cfg, state, run = self.cfg, self.state, self.run
        tests = evaluations(run.read_metrics())
        if not tests:
            raise CheckpointError(f"{run.metrics_path} holds no evaluation: the run cannot be summarised")
        summary = {
            "test_accuracy": tests[-1]["test_acc"],
            "test_loss": tests[-1]["test_loss"],
            **(
                {"val_accuracy": tests[-1]["val_acc"], "val_loss": tests[-1]["val_loss"]}
                if self.val is not None
                else {}
            ),
            "steps": cfg.max_steps,
            "epochs": round(self.batches.epoch_of(cfg.max_steps), 3),
            "wall_seconds": round(time.perf_counter() - self.t0, 2),
            "images_per_second": round(cfg.max_steps * cfg.batch_size / max(state.train_seconds, 1e-9), 1),
            "eval_images_per_second": round(state.eval_images / max(state.eval_seconds, 1e-9), 1),
            "resumed": resumed,
            "time_to_accuracy": time_to_accuracy(tests, state.setup_seconds),
            **per_class(last_eval["confusion"]),
        }
        return run.finish(summary, title=f"{self.meta.get('model', '')} {run.path.name}")


ACCURACY_MARKS = (0.90, 0.93, 0.94)


def time_to_accuracy(tests: list[dict[str, Any]], setup_seconds: float) -> dict[str, float | None]:
    """For each mark, the wall seconds from the process's start to the end of the first
    evaluation whose test accuracy reached it (evaluation time included), or None."""
    out: dict[str, float | None] = {}
    for mark in ACCURACY_MARKS:
        hit = next((r for r in tests if r["test_acc"] >= mark), None)
        out[f"{mark:.2f}"] = None if hit is None else round(setup_seconds + hit["seconds"], 2)
    return out


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere since cifarlab.loop
    was imported, which is before the data and torch are loaded)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED


def per_class(confusion: np.ndarray) -> dict[str, Any]:
    """The summary's view of a confusion matrix (rows: true class): each class's accuracy
    (None for a class without test images) and the matrix itself."""
    counts = confusion.sum(axis=1)
    return {
        "per_class_accuracy": {
            name: None if n == 0 else int(confusion[i, i]) / int(n)
            for i, (name, n) in enumerate(zip(CLASSES, counts))
        },
        "confusion": confusion.tolist(),
    }


# the optimizer state torch keeps per parameter, by --optimizer (a checkpoint of another
# optimizer would load without complaint and fail, or worse, at the first step)
OPTIMIZER_STATE = {
    "sgd": {"momentum_buffer"},
    "momentum": {"momentum_buffer"},
    "adam": {"step", "exp_avg", "exp_avg_sq"},
    "adamw": {"step", "exp_avg", "exp_avg_sq"},
}


def restore(
    learner: Learner, run: RunDir, meta: dict[str, Any], cfg: TrainConfig | None = None
) -> TrainState:
    """Load the run's last checkpoint into ``learner`` (it must be of ``meta``'s model, with
    the same arguments, of this run and of ``cfg``'s optimizer); returns the TrainState to
    give ``fit``. Nothing is written."""
    ckpt = checkpoints.load(run.checkpoint_dir)
    if (ckpt.model, ckpt.model_kwargs) != (meta["model"], meta["model_kwargs"]):
        raise CheckpointError(
            f"{run.checkpoint_dir} holds {ckpt.model} {ckpt.model_kwargs}, but the run's config.json says "
            f"{meta['model']} {meta['model_kwargs']}: one of them was changed; start a new run"
        )
    arrays, md = checkpoints.load_state(run.checkpoint_dir)
    if "state" not in md:
        raise CheckpointError(f"{run.checkpoint_dir}: no trainer state to resume from")
    state = TrainState.from_json(md["state"])
    try:
        plain = json.loads(md.get("plain", "{}"))
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{run.checkpoint_dir}: damaged trainer state (not JSON)") from None
    if not isinstance(plain, dict):
        raise CheckpointError(f"{run.checkpoint_dir}: damaged trainer state (not a JSON object)")
    own_id = run.read_config().get("run_id") if run.config_path.is_file() else None
    ckpt_id = plain.get("run_id")
    if own_id and ckpt_id and own_id != ckpt_id:
        raise CheckpointError(
            f"{run.checkpoint_dir} was saved by another run (run id {ckpt_id}, this run's is {own_id}); "
            "it was copied in: resume the run it belongs to, or start a new one"
        )
    if cfg is not None:
        saved = plain.get("optimizer")
        kinds = {key.split(".", 2)[2] for key in arrays if key.startswith("opt.")}
        if (saved is not None and saved != cfg.optimizer) or (
            saved is None and kinds and not kinds <= OPTIMIZER_STATE.get(cfg.optimizer, kinds)
        ):
            raise CheckpointError(
                f"{run.checkpoint_dir} holds the state of another optimizer ({saved or ', '.join(sorted(kinds))}) "
                f"than this run's --optimizer {cfg.optimizer}; it was not saved by this run"
            )
    try:
        learner.load(ckpt.weights, arrays, plain)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(
            f"{run.checkpoint_dir}: does not match this run's model ({reason(e)})"
        ) from None
    return state


# --------------------------------------------------------------------------- cifarlab train


def add_arguments(p: argparse.ArgumentParser, recipe: Recipe) -> None:
    """The flags of ``cifarlab train <recipe>``: data, run directory, device, and every setting."""
    add_data_args(p)
    p.add_argument(
        "--out",
        metavar="DIR",
        help="run directory (default: runs/<model>-<YYYYmmdd-HHMMSS>); must be new or empty",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help=f"continue an interrupted run from its last checkpoint; of the settings only "
        f"{', '.join(map(flag, RESUMABLE_CHANGES))} may change (a larger --max-steps extends a "
        "finished run, re-stretching the LR schedule over the new total)",
    )
    if recipe.framework == "torch":
        add_device_arg(p)
    add_progress_arg(p)
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the metrics as TensorBoard event files into RUN_DIR/tensorboard/ "
        "(needs pip install 'cifarlab[tensorboard]')",
    )
    add_config_args(p, recipe.defaults(), recipe.presets)


def make_learner(
    recipe: Recipe,
    cfg: TrainConfig,
    prep: Preprocess,
    device: str = "auto",
    dist: Dist | None = None,
    x_train: np.ndarray | None = None,
) -> Learner:
    """The recipe's model, freshly initialised from ``cfg.seed`` (and, for a model that sets
    itself up from data, ``x_train``), with its optimizer, on ``device``; under torchrun this
    joins the job."""
    if recipe.framework == "numpy":
        from cifarlab.numpy_nn.train import NumpyLearner

        return NumpyLearner.create(recipe.name, cfg, prep)
    from cifarlab.train import TorchLearner

    return TorchLearner.create(recipe.name, cfg, prep, device, dist, x_train)


def split_data(data: Data, cfg: TrainConfig) -> tuple[Data, tuple[np.ndarray, np.ndarray] | None]:
    """``--val-split N``: N training images held out (seeded by ``cfg.seed``, stratified), so
    that settings can be chosen on them and the test set looked at once; else no validation."""
    if not cfg.val_split:
        return data, None
    x_train, y_train, x_test, y_test = data
    x_tr, y_tr, x_val, y_val = split_validation(x_train, y_train, cfg.val_split, cfg.seed)
    return (x_tr, y_tr, x_test, y_test), (x_val, y_val)


def check_job(recipe: Recipe, cfg: TrainConfig, dist: Dist) -> None:
    """What a torchrun job needs: a torch model and a global batch the ranks split evenly."""
    if not dist.active:
        return
    if recipe.framework != "torch":
        raise UsageError(f"{recipe.name} trains in one process; torchrun is for the torch models")
    if cfg.batch_size % dist.world_size:
        raise UsageError(
            f"--batch-size {cfg.batch_size} is the global batch: it must be divisible by the "
            f"{dist.world_size} processes of the job"
        )


def saved_config(recipe: Recipe, run: RunDir) -> TrainConfig:
    """The config a run was trained with, from its config.json (settings an older version did
    not record take their defaults); a setting this version does not know is refused."""
    saved = run.read_config()
    train = saved.get("train")
    if not isinstance(train, dict):
        raise CheckpointError(f"{run.config_path}: no 'train' settings; was it written by another version?")
    unknown = sorted(set(train) - {f.name for f in dataclasses.fields(recipe.config)})
    if unknown:
        raise CheckpointError(
            f"{run.config_path}: unknown settings {unknown}; was it written by another version?"
        )
    try:
        return dataclasses.replace(recipe.config(), **train)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{run.config_path}: unreadable settings ({reason(e)})") from None


def resume_config(recipe: Recipe, args: argparse.Namespace, run: RunDir) -> TrainConfig:
    """The run's saved config, with the few changes a resume allows; anything else is refused."""
    saved = run.read_config()
    if saved.get("model") != recipe.name:
        raise UsageError(
            f"{run.path} is a run of {saved.get('model')!r}, not {recipe.name}; "
            f"resume it with `cifarlab train {saved.get('model')} --resume {run.path}`"
        )
    old = saved_config(recipe, run)
    if args.preset is not None and args.preset != saved.get("preset"):
        raise UsageError(f"--preset cannot change on --resume (the run used {saved.get('preset')!r})")
    changes = {k: v for k, v in given_flags(recipe.config, args).items() if v != getattr(old, k)}
    refused = sorted(set(changes) - set(RESUMABLE_CHANGES))
    if refused:
        name = refused[0]
        raise UsageError(
            f"{flag(name)} cannot change on --resume (the run used {getattr(old, name)!r}); only "
            f"{', '.join(map(flag, RESUMABLE_CHANGES))} may. Start a new run instead"
        )
    cfg = make_config(recipe.config, {}, {**dataclasses.asdict(old), **changes})  # validated again
    if run.summary_path.is_file() and cfg.max_steps <= old.max_steps:
        raise UsageError(
            f"{run.path} is a finished run ({old.max_steps} steps); pass a larger --max-steps to extend it"
        )
    return cfg


def _open_on_main(dist: Dist, open_run: Callable[[], RunDir]) -> RunDir:
    """Rank 0 runs ``open_run`` (creating or locking the run directory) and tells the other
    ranks where it is; if it fails, they stop too."""
    if dist.is_main:
        try:
            run = open_run()
        except BaseException:
            if dist.active:
                broadcast_text(None, dist, "waiting for the run directory")
            raise
        broadcast_text(str(run.path), dist, "waiting for the run directory")
        return run
    path = broadcast_text(None, dist, "waiting for the run directory")
    if path is None:
        raise CifarlabError(f"rank {dist.rank}: rank 0 could not start the run (its error says why)")
    return RunDir(path)


def _shutdown(dist: Dist) -> None:
    if dist.active:
        from cifarlab import distributed

        distributed.shutdown()


def train_command(argv: list[str]) -> int:
    """``cifarlab train MODEL [flags]``: MODEL's own parser, then :func:`main` (what the CLI and
    an in-process sweep run both call)."""
    from cifarlab.config import ArgumentParser
    from cifarlab.recipes import RECIPES

    if not argv or argv[0] not in RECIPES:
        raise UsageError(f"unknown train target {argv[:1]}; choose one of: {', '.join(RECIPES)}")
    recipe = RECIPES[argv[0]]
    p = ArgumentParser(prog=f"cifarlab train {recipe.name}", description=recipe.description)
    add_arguments(p, recipe)
    return main(recipe, p.parse_args(argv[1:]))


def main(recipe: Recipe, args: argparse.Namespace) -> int:
    """``cifarlab train <recipe>``: everything is validated and loaded before the run directory
    is created (or, to resume, changed); then it is locked and trained."""
    if args.tensorboard:
        require_tensorboard()
    dist = Dist.from_env()
    try:
        if args.resume is not None:
            return _resume(recipe, args, dist)
        return _start(recipe, args, dist)
    finally:
        _shutdown(dist)


_started_before = False  # a sweep or `reproduce` may run several trainings in one process


def _command_started() -> float:
    """perf_counter() at which this training's command started: the process's start for the
    first training of a process, the call itself for the next ones."""
    global _started_before
    age = 0.0 if _started_before else process_age()
    _started_before = True
    return time.perf_counter() - age


def _fit_options(args: argparse.Namespace, dist: Dist, val: tuple | None) -> dict[str, Any]:
    """``fit``'s keyword arguments that come from the command line (a new run and a resume)."""
    return {"progress": args.progress, "dist": dist, "tensorboard": args.tensorboard, "val": val}


def _start(recipe: Recipe, args: argparse.Namespace, dist: Dist) -> int:
    started = _command_started()
    cfg = recipe.make_config(args.preset, **given_flags(recipe.config, args))
    check_job(recipe, cfg, dist)
    if args.out is not None and dist.is_main:  # refuse a bad --out before the (slow) data and model
        RunDir.check_new(args.out)
    data, val = split_data(load_cifar10(args.data_dir, verify=args.verify), cfg)
    prep = Preprocess.fit(cfg.preprocess, data[0])  # on the training images only
    learner = make_learner(recipe, cfg, prep, getattr(args, "device", "cpu"), dist, x_train=data[0])
    meta = {"model": recipe.name, "model_kwargs": cfg.model_kwargs()}

    def create() -> RunDir:
        run = RunDir.create(recipe.name, out=args.out)
        try:
            run.lock()
            run.write_config(
                {
                    "command": "cifarlab train " + recipe.name,
                    "run_id": uuid.uuid4().hex,  # its checkpoints carry it: a copied-in one is refused
                    "preset": args.preset or next(iter(recipe.presets)),
                    **meta,
                    "train": dataclasses.asdict(cfg),
                    "data": dataset_fingerprint(args.data_dir, verified=args.verify),
                    "parameters": learner.num_parameters(),
                    "distributed": learner.runtime(),
                    "machine": machine(learner.threads()),
                },
                libraries=learner.libraries,
            )
        except BaseException:
            if run.locked:
                run.remove_if_unstarted()
            run.unlock()
            raise
        return run

    run = _open_on_main(dist, create)
    try:
        summary = fit(
            learner, cfg, run, data, meta, prep, **_fit_options(args, dist, val),
            setup_seconds=time.perf_counter() - started,
        )  # fmt: skip
    except BaseException:
        if run.locked:
            run.remove_if_unstarted()  # a failed start leaves nothing behind
        raise
    finally:
        run.unlock()
    if dist.is_main:
        print_result(run, summary)
    return 0


def _resume(recipe: Recipe, args: argparse.Namespace, dist: Dist) -> int:
    """``--resume RUN``: lock, check config and checkpoint, and only then change anything.
    Under torchrun every rank reads the checkpoint: the run directory must be on a file
    system they share."""
    if args.out and args.out != args.resume:
        raise UsageError("give either --out or --resume (a resumed run continues in its own directory)")
    run = RunDir.open(args.resume)
    if dist.is_main:
        run.lock()
    try:
        cfg = resume_config(recipe, args, run)
        check_job(recipe, cfg, dist)
        if dist.is_main:
            checkpoints.recover(run.checkpoint_dir)
        data, val = split_data(load_cifar10(args.data_dir, verify=args.verify), cfg)
        prep = Preprocess.fit(cfg.preprocess, data[0])
        learner = make_learner(
            recipe, cfg, prep, getattr(args, "device", "cpu"), dist
        )  # under torchrun: after rank 0's recover
        if not (run.checkpoint_dir / checkpoints.STATE_FILE).is_file():
            raise CheckpointError(
                f"{run.path} has no checkpoint to resume (it stopped before its first evaluation); start a new run"
            )
        meta = {"model": recipe.name, "model_kwargs": cfg.model_kwargs()}
        saved = run.read_config()
        now = learner.runtime()
        was = saved.get("distributed") or {
            "precision": now["precision"] if recipe.framework == "numpy" else "fp32"
        }
        if was.get("precision") != now["precision"]:
            raise UsageError(
                f"{run.path} computed in {was.get('precision')} and would now compute in {now['precision']} "
                "(--precision auto resolves by device and CPU); resume it where it computes as before"
            )
        state = restore(learner, run, meta, cfg)
        if cfg.max_steps < state.step:
            raise UsageError(f"--max-steps {cfg.max_steps} is below the step the run reached ({state.step})")
        if dist.is_main:  # everything the resume will touch is checked before a byte changes
            run.check_metrics(state.step, state.metrics_bytes)
            if args.tensorboard and run.tensorboard_dir.exists() and not run.tensorboard_dir.is_dir():
                raise UsageError(
                    f"{run.tensorboard_dir} is not a folder; move it away to resume with --tensorboard"
                )
            if not os.access(run.path, os.W_OK):
                raise UsageError(f"{run.path} is not writable: the resume could not save its checkpoints")
        # all checked: now the run may change
        changed = {k: v for k, v in dataclasses.asdict(cfg).items() if saved["train"].get(k) != v}
        changed.update({k: v for k, v in now.items() if k in was and was[k] != v})  # e.g. device, world_size
        if changed and dist.is_main:
            saved.setdefault("resumed_with", []).append({"at_step": state.step, **changed})
            saved["train"], saved["distributed"] = dataclasses.asdict(cfg), now
            atomic_write_json(run.config_path, saved)
        if dist.is_main:
            run.summary_path.unlink(missing_ok=True)  # an extended run is unfinished until it ends again
            run.diverged_path.unlink(missing_ok=True)  # it is running again from its last good checkpoint
        summary = fit(learner, cfg, run, data, meta, prep, state=state, **_fit_options(args, dist, val))
    finally:
        run.unlock()
    if dist.is_main:
        print_result(run, summary)
    return 0
