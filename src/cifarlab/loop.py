"""The one training loop, for the NumPy and the torch trainers alike, and ``cifarlab train``.

A *learner* (``cifarlab.train.TorchLearner``, ``cifarlab.numpy_nn.train.NumpyLearner``)
owns a model and its optimizer in one framework and knows how to take one step, evaluate,
and give/take its weights and optimizer state as NumPy arrays. Everything else lives here,
read top to bottom:

* ``TrainState``: the loop's counters, serialised into every checkpoint;
* ``fit``: the step loop, with one ``evaluate_log_checkpoint`` at every ``eval_freq`` steps;
  SIGINT/SIGTERM checkpoint at the next step boundary; a NaN/inf loss stops the run and keeps
  the last good checkpoint; ``resume`` continues bitwise where the checkpoint left off;
* ``main``: what ``cifarlab train MODEL`` runs: flags -> validated config -> data -> learner
  -> run directory (locked) -> ``fit``. Nothing is written before everything is validated.

No torch import here: ``cifarlab train mlp-numpy`` never loads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cifarlab import checkpoints
from cifarlab.config import TrainConfig, add_config_args, add_data_args, given_flags, make_config
from cifarlab.data import Batches, Preprocess, dataset_fingerprint, load_cifar10
from cifarlab.errors import CheckpointError, TrainingDiverged, UsageError
from cifarlab.recipes import Recipe
from cifarlab.runs import RunDir, machine, print_result, training_summary
from cifarlab.schedules import lr_at

Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
# settings a --resume may change: they alter neither the weights so far nor the batches
RESUMABLE_CHANGES = ("max_steps", "eval_freq", "threads")


@dataclass
class TrainState:
    """Where a run is: its step, its clocks, and the training loss/accuracy sums since the
    last evaluation (so a run stopped between evaluations resumes to the same metrics)."""

    step: int = 0
    elapsed: float = 0.0  # wall seconds, over all sessions of the run
    train_seconds: float = 0.0  # of which in training steps
    eval_seconds: float = 0.0
    eval_images: int = 0
    loss_sum: float = 0.0  # Σ loss × batch size since the last evaluation
    correct: int = 0
    seen: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"damaged trainer state in the checkpoint ({e})") from None


class Learner(Protocol):
    """A model + optimizer in one framework; all arrays that cross this boundary are NumPy."""

    libraries: tuple[str, ...]  # whose versions config.json records

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> None:
        """One optimizer step on uint8 NHWC images ``x`` and labels ``y`` at learning rate
        ``lr``, adding to the running loss and correct-count sums (no host sync needed)."""

    def take_running(self) -> tuple[float, int]:
        """The loss sum and correct count since the last call, reset to 0."""

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """{"loss", "acc"} over all of ``x`` (evaluation mode, no gradients)."""

    def step_metrics(self) -> dict[str, Any]:
        """Extra metrics of the step just taken, logged at evaluations (e.g. gradient norms)."""

    def weights(self) -> dict[str, np.ndarray]: ...

    def trainer_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Optimizer buffers and RNG state as arrays, and the rest as JSON-able values."""

    def load(self, weights: dict[str, np.ndarray], arrays: dict[str, np.ndarray], plain: dict) -> None: ...

    def num_parameters(self) -> int: ...

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
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[TrainState], None] | None = None,
) -> dict[str, Any]:
    """Train for ``cfg.max_steps`` steps, evaluating, logging and checkpointing every
    ``cfg.eval_freq``; returns the summary. ``meta`` ({"model", "model_kwargs"}) goes into the
    checkpoint so eval/predict can rebuild the model; ``on_step`` is called after every step."""
    from tqdm import tqdm

    x_train, y_train, x_test, y_test = data
    batches = Batches(x_train, y_train, cfg.batch_size, seed=cfg.seed, augment=cfg.augment)
    state = TrainState()
    if resume:
        state = _restore(learner, run)
        run.truncate_metrics(state.step)
    first_step = state.step

    def checkpoint() -> None:
        arrays, plain = learner.trainer_state()
        extra = {"state": state.to_json(), "plain": json.dumps(plain)}
        checkpoints.save(run.checkpoint_dir, learner.weights(), meta, prep, arrays, extra)

    def collect_running() -> None:
        loss_sum, correct = learner.take_running()
        state.loss_sum += loss_sum
        state.correct += correct
        if not np.isfinite(state.loss_sum):
            raise TrainingDiverged(
                f"loss became {state.loss_sum} before step {state.step}; stopped. The last good "
                f"checkpoint is kept in {run.checkpoint_dir}. Try a lower --learning-rate or --grad-clip 1.0"
            )

    def evaluate_log_checkpoint(lr: float) -> None:
        collect_running()
        t_eval = time.perf_counter()
        ev = learner.evaluate(x_test, y_test)
        state.eval_seconds += time.perf_counter() - t_eval
        state.eval_images += len(x_test)
        record = {
            "step": state.step,
            "epoch": round(batches.epoch_of(state.step), 4),
            "train_loss": state.loss_sum / state.seen,
            "train_acc": state.correct / state.seen,
            "test_loss": ev["loss"],
            "test_acc": ev["acc"],
            "seconds": round(time.perf_counter() - t0, 3),
            "lr": lr,
            **(learner.step_metrics() if cfg.log_grad_norms else {}),
        }
        run.log(record)
        state.loss_sum, state.correct, state.seen = 0.0, 0, 0
        state.elapsed = time.perf_counter() - t0
        checkpoint()
        bar.set_postfix(
            loss=f"{record['train_loss']:.3f}",
            test_acc=f"{ev['acc']:.4f}",
            img_s=f"{(state.step - first_step) * cfg.batch_size / max(state.train_seconds, 1e-9):.0f}",
        )

    t0 = time.perf_counter() - state.elapsed
    bar = tqdm(
        total=cfg.max_steps, initial=first_step, disable=not progress, unit="step", dynamic_ncols=True,
        desc=run.path.name, file=sys.stderr,
    )  # fmt: skip
    t_train = time.perf_counter()
    with _StopRequested() as stop, bar:
        for step in range(first_step, cfg.max_steps):
            lr = lr_at(cfg, step)
            learner.step(*batches.batch(step), lr)
            state.step, state.seen = step + 1, state.seen + cfg.batch_size
            bar.update(1)
            if on_step is not None:
                on_step(state)
            at_eval = state.step % cfg.eval_freq == 0 or state.step == cfg.max_steps
            if at_eval or stop.signum is not None:
                state.train_seconds += time.perf_counter() - t_train
                if at_eval:
                    evaluate_log_checkpoint(lr)
                if stop.signum is not None:
                    if not at_eval:
                        collect_running()
                        state.elapsed = time.perf_counter() - t0
                        checkpoint()
                    raise KeyboardInterrupt(f"stopped at step {state.step}; resume with --resume {run.path}")
                t_train = time.perf_counter()
    summary = training_summary(
        run,
        cfg.max_steps,
        cfg.batch_size,
        batches.epoch_of(cfg.max_steps),
        time.perf_counter() - t0,
        state.train_seconds,
    )
    summary["eval_images_per_second"] = round(state.eval_images / max(state.eval_seconds, 1e-9), 1)
    summary["resumed"] = resume
    return run.finish(summary, title=f"{meta.get('model', '')} {run.path.name}")


def _restore(learner: Learner, run: RunDir) -> TrainState:
    """Load the run's last checkpoint into ``learner``; returns its TrainState."""
    checkpoints.recover(run.checkpoint_dir)
    ckpt = checkpoints.load(run.checkpoint_dir)
    arrays, md = checkpoints.load_state(run.checkpoint_dir)
    if "state" not in md:
        raise CheckpointError(f"{run.checkpoint_dir}: no trainer state to resume from")
    try:
        plain = json.loads(md.get("plain", "{}"))
        learner.load(ckpt.weights, arrays, plain)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(f"{run.checkpoint_dir}: does not match this run's model ({reason})") from None
    return TrainState.from_json(md["state"])


# --------------------------------------------------------------------------- cifarlab train


def add_arguments(p: argparse.ArgumentParser, recipe: Recipe) -> None:
    """The flags of ``cifarlab train <recipe>``: data, run directory, and every setting."""
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
        f"{', '.join('--' + n.replace('_', '-') for n in RESUMABLE_CHANGES)} may change "
        "(a larger --max-steps extends a finished run)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_config_args(p, recipe.defaults(), recipe.presets, numpy=recipe.framework == "numpy")


def make_learner(recipe: Recipe, cfg: TrainConfig, prep: Preprocess) -> Learner:
    """The recipe's model, freshly initialised from ``cfg.seed``, with its optimizer."""
    if recipe.framework == "numpy":
        from cifarlab.numpy_nn.train import NumpyLearner

        return NumpyLearner.create(recipe.name, cfg, prep)
    from cifarlab.train import TorchLearner

    return TorchLearner.create(recipe.name, cfg, prep)


def _resume_config(recipe: Recipe, args: argparse.Namespace, run: RunDir) -> TrainConfig:
    """The run's saved config, with the few changes a resume allows; anything else is refused."""
    saved = run.read_config()
    if saved.get("model") != recipe.name:
        raise UsageError(
            f"{run.path} is a run of {saved.get('model')!r}, not {recipe.name}; "
            f"resume it with `cifarlab train {saved.get('model')} --resume {run.path}`"
        )
    names = {f.name for f in dataclasses.fields(recipe.config)}
    unknown = sorted(set(saved["train"]) - names)
    if unknown:
        raise CheckpointError(
            f"{run.config_path}: unknown settings {unknown}; was it written by another version?"
        )
    try:
        old = recipe.config(**saved["train"])
    except TypeError as e:
        raise CheckpointError(f"{run.config_path}: damaged settings ({e})") from None
    old.validate()
    if args.preset is not None and args.preset != saved.get("preset"):
        raise UsageError(f"--preset cannot change on --resume (the run used {saved.get('preset')!r})")
    changes = {k: v for k, v in given_flags(recipe.config, args).items() if v != getattr(old, k)}
    refused = sorted(set(changes) - set(RESUMABLE_CHANGES))
    if refused:
        name = refused[0]
        raise UsageError(
            f"--{name.replace('_', '-')} cannot change on --resume (the run used {getattr(old, name)!r}); "
            f"only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE_CHANGES)} may. Start a new run instead"
        )
    cfg = make_config(recipe.config, {}, {**dataclasses.asdict(old), **changes})
    if run.summary_path.is_file() and cfg.max_steps <= old.max_steps:
        raise UsageError(
            f"{run.path} is a finished run ({old.max_steps} steps); pass a larger --max-steps to extend it"
        )
    return cfg


def main(recipe: Recipe, args: argparse.Namespace) -> int:
    """``cifarlab train <recipe>``: validate, load, then create/lock the run and fit."""
    resume = args.resume is not None
    if resume:
        if args.out and args.out != args.resume:
            raise UsageError("give either --out or --resume (a resumed run continues in its own directory)")
        run = RunDir.open(args.resume)
        run.lock()
    try:
        if resume:
            cfg = _resume_config(recipe, args, run)
            checkpoints.recover(run.checkpoint_dir)
            if not (run.checkpoint_dir / checkpoints.STATE_FILE).is_file():
                raise CheckpointError(
                    f"{run.path} has no checkpoint to resume (it stopped before its first evaluation); start a new run"
                )
        else:
            cfg = recipe.make_config(args.preset, **given_flags(recipe.config, args))
            if args.out is not None:  # refuse a bad --out before the (slow) data and model
                RunDir.check_new(args.out)
        data = load_cifar10(args.data_dir, verify=args.verify)
        prep = Preprocess.fit(cfg.preprocess, data[0])
        learner = make_learner(recipe, cfg, prep)
        meta = {"model": recipe.name, "model_kwargs": cfg.model_kwargs()}
        if not resume:
            run = RunDir.create(recipe.name, out=args.out)
            run.lock()
            run.write_config(
                {
                    "command": "cifarlab train " + recipe.name,
                    "preset": args.preset or next(iter(recipe.presets)),
                    **meta,
                    "train": dataclasses.asdict(cfg),
                    "data": dataset_fingerprint(args.data_dir),
                    "parameters": learner.num_parameters(),
                    "machine": machine(learner.threads()),
                },
                libraries=learner.libraries,
            )
        elif cfg != recipe.config(**run.read_config()["train"]):
            _update_config(run, cfg)
        summary = fit(learner, cfg, run, data, meta, prep, resume=resume, progress=args.progress)
    except BaseException:
        if not resume and "run" in locals():
            run.remove_if_unstarted()
        raise
    finally:
        if "run" in locals():
            run.unlock()
    print_result(run, summary)
    return 0


def _update_config(run: RunDir, cfg: TrainConfig) -> None:
    """Record the settings a resume changed, and when, in config.json."""
    from cifarlab.runs import atomic_write_json

    config = run.read_config()
    config.setdefault("resumed_with", []).append(
        {k: v for k, v in dataclasses.asdict(cfg).items() if config["train"].get(k) != v}
    )
    config["train"] = dataclasses.asdict(cfg)
    atomic_write_json(run.config_path, config)
