"""``cifarlab train MODEL``: its flags, and the policy of starting or resuming a run: flags ->
validated config -> data -> learner -> run directory (locked) -> ``cifarlab.training.loop.fit``. Nothing
is written before everything is validated; a resume checks the run, its checkpoint and what
the flags may change first.

Under torchrun (``cifarlab.training.distributed``) every rank runs all of this; rank 0 alone creates,
writes and locks the run directory. No torch import here: ``cifarlab train mlp-numpy`` never
loads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from cifarlab.data import (
    Preprocess,
    dataset_fingerprint,
    load_cifar10,
    split_validation,
)
from cifarlab.errors import CheckpointError, CifarlabError, UsageError, reason
from cifarlab.files import atomic_write_json
from cifarlab.training import checkpoints
from cifarlab.training.config import (
    TrainConfig,
    add_config_args,
    add_data_args,
    add_device_arg,
    add_progress_arg,
    bookkeeping,
    flag,
    given_flags,
    make_config,
)
from cifarlab.training.distributed import Dist, broadcast_text
from cifarlab.training.loop import Data, Learner, fit, process_age, restore
from cifarlab.training.recipes import Recipe
from cifarlab.training.runs import (
    RunDir,
    machine,
    print_result,
    require_tensorboard,
)


def resumable_changes(cls: type[TrainConfig]) -> tuple[str, ...]:
    """The settings a --resume may change: they alter neither the weights so far nor the
    batches (and a larger --max-steps extends the run)."""
    return ("max_steps", *sorted(bookkeeping(cls)))


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
        f"{', '.join(map(flag, resumable_changes(recipe.config)))} may change (a larger --max-steps extends a "
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
    from cifarlab.training.torch_learner import TorchLearner

    return TorchLearner.create(recipe.name, cfg, prep, device, dist, x_train)


def prepare(
    recipe: Recipe, cfg: TrainConfig, args: argparse.Namespace, dist: Dist, init_from_data: bool
) -> tuple[Data, tuple[np.ndarray, np.ndarray] | None, Preprocess, Learner, dict[str, Any]]:
    """What a run trains on and with, the same for a new and a resumed run: the training data
    and its validation split, the preprocessing fitted on the training images only, the
    learner, and the metadata its checkpoints carry. ``init_from_data``: a new run's model
    may set itself up from the training images; a resumed one's weights come from its
    checkpoint."""
    data, val = split_data(load_cifar10(args.data_dir, verify=args.verify), cfg)
    prep = Preprocess.fit(cfg.preprocess, data[0])
    device = getattr(args, "device", "cpu")
    learner = make_learner(recipe, cfg, prep, device, dist, x_train=data[0] if init_from_data else None)
    return data, val, prep, learner, {"model": recipe.name, "model_kwargs": cfg.model_kwargs()}


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
    allowed = resumable_changes(recipe.config)
    refused = sorted(set(changes) - set(allowed))
    if refused:
        name = refused[0]
        raise UsageError(
            f"{flag(name)} cannot change on --resume (the run used {getattr(old, name)!r}); only "
            f"{', '.join(map(flag, allowed))} may. Start a new run instead"
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


def _shutdown(dist: Dist, clean: bool) -> None:
    if dist.active:
        from cifarlab.training import distributed

        distributed.shutdown(clean)


def parser(model: str) -> argparse.ArgumentParser:
    """The parser of ``cifarlab train MODEL`` (an unknown MODEL: one-line UsageError)."""
    from cifarlab.training.config import ArgumentParser
    from cifarlab.training.recipes import RECIPES

    if model not in RECIPES:
        raise UsageError(f"unknown train target {model!r}; choose one of: {', '.join(RECIPES)}")
    recipe = RECIPES[model]
    p = ArgumentParser(prog=f"cifarlab train {recipe.name}", description=recipe.description)
    add_arguments(p, recipe)
    return p


def run_argv(argv: list[str]) -> int:
    """``cifarlab train MODEL [flags]``: MODEL's own parser, then :func:`main` (what the CLI and
    an in-process sweep run both call)."""
    from cifarlab.training.recipes import RECIPES

    if not argv:
        raise UsageError(f"give a train target; choose one of: {', '.join(RECIPES)}")
    args = parser(argv[0]).parse_args(argv[1:])  # first: an unknown model is its one-line error
    return main(RECIPES[argv[0]], args)


def parse_overrides(model: str, flags: list[str]) -> tuple[str | None, dict[str, Any]]:
    """``cifarlab train MODEL *flags`` read as (its --preset, the settings its flags give): for
    flags a user typed (a sweep's ``--extra``). Bad flags are refused, as ``train`` would."""
    from cifarlab.training.recipes import RECIPES

    args = parser(model).parse_args(flags)
    return args.preset, given_flags(RECIPES[model].config, args)


def main(recipe: Recipe, args: argparse.Namespace) -> int:
    """``cifarlab train <recipe>``: everything is validated and loaded before the run directory
    is created (or, to resume, changed); then it is locked and trained."""
    if args.tensorboard:
        require_tensorboard()
    dist = Dist.from_env()
    try:
        code = _resume(recipe, args, dist) if args.resume is not None else _start(recipe, args, dist)
    except BaseException:
        _shutdown(dist, clean=False)
        raise
    _shutdown(dist, clean=True)
    return code


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
    data, val, prep, learner, meta = prepare(recipe, cfg, args, dist, init_from_data=True)

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
        # the weights come from the checkpoint (under torchrun: after rank 0's recover)
        data, val, prep, learner, meta = prepare(recipe, cfg, args, dist, init_from_data=False)
        if not (run.checkpoint_dir / checkpoints.STATE_FILE).is_file():
            raise CheckpointError(
                f"{run.path} has no checkpoint to resume (it stopped before its first evaluation); start a new run"
            )
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
