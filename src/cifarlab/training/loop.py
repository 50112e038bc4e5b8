"""The one training loop, for the NumPy and the torch trainers alike.

A *learner* (``cifarlab.training.torch_learner.TorchLearner``, ``cifarlab.numpy_nn.train.NumpyLearner``)
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
* ``restore``: a run's last checkpoint back into a learner, checked against the run.

``cifarlab train MODEL`` itself (flags, starting or resuming a run) is ``cifarlab.training.train_command``.

Under torchrun (``cifarlab.training.distributed``) every rank runs all of this; rank 0 alone creates,
writes and locks the run directory, and the ranks agree on when to stop.

No torch import here: ``cifarlab train mlp-numpy`` never loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np

from cifarlab.data import (
    CLASSES,
    Batch,
    Batches,
    Preprocess,
)
from cifarlab.errors import CheckpointError, TrainingDiverged, reason
from cifarlab.files import atomic_write_json
from cifarlab.schedules import lookahead_decay, lr_at
from cifarlab.training import checkpoints
from cifarlab.training.config import (
    TrainConfig,
)
from cifarlab.training.distributed import Dist, any_rank
from cifarlab.training.runs import (
    RunDir,
    TensorBoardLog,
    evaluations,
)

_IMPORTED = time.perf_counter()
Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
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
    bar = s.open_bar(progress)  # before the training clock starts (tqdm's import is not training)
    board = TensorBoardLog(run.tensorboard_dir, state.step) if tensorboard and s.writer else None
    last_eval: dict[str, Any] | None = None
    t_train = time.perf_counter()
    with _StopRequested() as stop, bar, board or contextlib.nullcontext():
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
    """Seconds since this process started (Linux: from /proc; elsewhere since cifarlab.training.loop
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
