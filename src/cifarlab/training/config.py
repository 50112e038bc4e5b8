"""Training settings as one dataclass, and the command-line flags made from it (nanoGPT style).

``TrainConfig`` holds every knob of the training loop, shared by the NumPy and the torch
trainers; a model's config subclasses it to add the model's own fields (``cifarlab.training.recipes``).
Field metadata carries the flag's help, its choices and its valid range, so one ``validate``
checks every config. No torch import: ``cifarlab train mlp-numpy`` must never load torch.

``add_config_args`` turns every field into a flag, spelled both ``--max-steps`` and
``--max_steps`` (the course's spelling); ``given_flags`` returns only the flags the user gave,
which a preset's config then takes with ``dataclasses.replace``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cifarlab.choices import (  # noqa: F401 (the flags' choices, re-exported)
    ACTIVATIONS,
    LAYERNORMS,
    NORMS,
    NUMPY_ACTIVATIONS,
    OPTIMIZERS,
    PRECISIONS,
    PREPROCESSINGS,
)
from cifarlab.errors import UsageError
from cifarlab.schedules import SCHEDULES

FIRST_SEED = 42  # the default seed; sweeps and the study run FIRST_SEED, FIRST_SEED + 1, ...
MAX_PARAMETER_BYTES = 4 << 30  # a model over 4 GiB of float32 parameters is refused

C = TypeVar("C", bound="TrainConfig")


def bookkeeping(cls: type[TrainConfig]) -> frozenset[str]:
    """The settings of ``cls`` that change neither the weights nor the batches of a run: a
    resumed run may change them, and runs that differ only in them are the same experiment."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("bookkeeping"))


def flag(name: str) -> str:
    """The command-line spelling of a setting: ``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    torch_only: bool = False,
    bookkeeping: bool = False,
) -> Any:
    """A config field: its default, flag help, choices and valid range [lo, hi] (open ends
    with ``lo_open``/``hi_open``; for a list, the range of each element). ``torch_only``
    fields are not flags of the NumPy trainer, which refuses other values than the default.
    ``bookkeeping`` fields change neither the weights nor the batches of a run (how often it
    evaluates or logs, threads): see :func:`bookkeeping`."""
    meta = {
        "help": help,
        "choices": choices,
        "range": (lo, hi, lo_open, hi_open),
        "torch_only": torch_only,
        "bookkeeping": bookkeeping,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of the training loop. Defaults are the seed's MLP protocol; a recipe's
    presets (``cifarlab.training.recipes``) change them with ``dataclasses.replace``."""

    learning_rate: float = setting(1e-3, "peak learning rate", lo=0, lo_open=True)
    max_steps: int = setting(1400, "optimizer steps", lo=1, hi=10**9)
    batch_size: int = setting(200, "training batch size", lo=1, hi=50_000)
    eval_freq: int = setting(100, "evaluate on the whole test set every N steps", lo=1, bookkeeping=True)
    log_freq: int = setting(
        0,
        "a metrics record (training loss/accuracy since the last) every N steps; 0: max_steps // 100",
        lo=0,
        bookkeeping=True,
    )
    optimizer: str = setting("sgd", "optimizer", choices=OPTIMIZERS)
    momentum: float = setting(0.9, "momentum of 'momentum' (Nesterov)", lo=0, hi=1, hi_open=True)
    weight_decay: float = setting(
        0.0, "L2 (sgd/adam) or decoupled (adamw); not on biases/norms unless --decay-biases", lo=0
    )
    decay_biases: bool = setting(
        False, "weight decay on biases and norm parameters too (divided by their learning-rate factor)",
        torch_only=True,
    )  # fmt: skip
    schedule: str = setting("constant", "LR schedule", choices=SCHEDULES)
    warmup_steps: int = setting(0, "linear warm-up steps", lo=0)
    lr_start: float = setting(
        0.0, "onecycle: the rate its rise starts from, as a fraction of the peak", lo=0, hi=1
    )
    lr_end: float = setting(
        0.0, "onecycle: the rate its fall heads for, as a fraction of the peak", lo=0, hi=1
    )
    lr_peak: float = setting(
        0.25, "onecycle: the fraction of the steps its rise takes (the peak's place)", lo=0, hi=1,
        lo_open=True, hi_open=True,
    )  # fmt: skip
    lookahead: int = setting(
        0, "every N steps pull the weights to a slow average of themselves (Lookahead/EMA, rising over the "
        "run; the final weights are the average); 0: off", lo=0, hi=10**6, torch_only=True,
    )  # fmt: skip
    label_smoothing: float = setting(
        0.0, "label smoothing of the loss", lo=0, hi=1, hi_open=True, torch_only=True
    )
    grad_clip: float = setting(0.0, "clip the gradient norm to this (0: off)", lo=0, torch_only=True)
    augment: bool = setting(False, "random crop (reflect-pad --crop-pad, crop 32x32) + horizontal flip")
    crop_pad: int = setting(
        4, "with --augment: pad by this many pixels before the random 32x32 crop", lo=0, hi=16
    )
    flip: str = setting(
        "random", "with --augment: flip each image at random, or alternate its flip from epoch to epoch",
        choices=("random", "alternate"),
    )  # fmt: skip
    preprocess: str = setting("seed", "input preprocessing", choices=PREPROCESSINGS)
    seed: int = setting(FIRST_SEED, "seed of init, batches and augmentation", lo=0, hi=2**32 - 1)
    eval_batch_size: int = setting(
        250,
        "no-grad evaluation batch (250: 1.5x faster than 1000 for the ConvNet on a 2-core CPU)",
        lo=1,
        hi=50_000,
        bookkeeping=True,
    )
    val_split: int = setting(
        0, "hold out N training images (seeded, stratified by class) as a validation set, evaluated with the "
        "test set; 0: none", lo=0, hi=25_000,
    )  # fmt: skip
    test_images: int = setting(
        0,
        "evaluate on the first N test images only (0: all 10,000); for quick looks, not results",
        lo=0,
        hi=10_000,
    )
    channels_last: bool = setting(False, "NHWC memory format (faster convs on CPU)", torch_only=True)
    threads: int = setting(
        0,
        "torch threads (0: $OMP_NUM_THREADS, else all cores)",
        lo=0,
        hi=1024,
        torch_only=True,
        bookkeeping=True,
    )
    log_grad_norms: bool = setting(False, "log each weight's gradient norm per evaluation", torch_only=True)
    precision: str = setting(
        "auto",
        "autocast precision (weights stay fp32); auto: bf16 on CUDA with bf16 and, for the models it "
        "speeds up there, on CPUs with native bf16 (AVX512-BF16/AMX); else fp32",
        choices=PRECISIONS,
        torch_only=True,
    )
    sync_bn: bool = setting(
        False, "under torchrun: BatchNorm statistics over the global batch, not each rank's", torch_only=True
    )

    def validate(self) -> None:
        """Refuse any value outside its field's choices or range, as a one-line UsageError."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            tp = _base_type(hints[f.name])
            if not _has_type(value, tp):
                name = "a list of integers" if typing.get_origin(tp) is list else f"of type {tp.__name__}"
                raise UsageError(f"{flag(f.name)} must be {name}, got {value!r}")
            if meta.get("choices") and value not in meta["choices"]:
                raise UsageError(f"{flag(f.name)} must be one of {', '.join(meta['choices'])}; got {value!r}")
            if f.name == "precision" and not self.torch_trainer and value not in ("auto", "fp32"):
                raise UsageError(
                    f"--precision {value}: the NumPy MLP has no autocast; it computes in --dtype "
                    "(float32 or float64). bf16/fp16 are for the torch models (e.g. cifarlab train mlp)"
                )
            lo, hi, lo_open, hi_open = meta.get("range", (None, None, False, False))
            if lo is None and hi is None:
                continue
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, float) and not math.isfinite(v):
                    raise UsageError(f"{flag(f.name)} must be a finite number, got {v}")
                if (lo is not None and (v < lo or (lo_open and v == lo))) or (
                    hi is not None and (v > hi or (hi_open and v == hi))
                ):
                    raise UsageError(
                        f"{flag(f.name)} must be in {_interval(lo, hi, lo_open, hi_open)}, got {v}"
                    )
            if (
                f.metadata.get("torch_only")
                and not self.torch_trainer
                and value != f.default
                and f.name != "precision"
            ):
                raise UsageError(f"{flag(f.name)} is a torch trainer setting; the NumPy trainer has none")
        if self.schedule != "onecycle" and (self.lr_start or self.lr_end or self.lr_peak != 0.25):
            raise UsageError(
                f"--lr-start, --lr-end and --lr-peak shape --schedule onecycle, not {self.schedule}"
            )
        if not self.augment and (self.crop_pad != 4 or self.flip != "random"):
            raise UsageError(
                "--crop-pad and --flip shape --augment's crops and flips: add --augment, or drop them"
            )
        if self.schedule == "onecycle" and self.warmup_steps:
            raise UsageError("--schedule onecycle has its own warm-up (its first 25%): drop --warmup-steps")
        if self.warmup_steps > self.max_steps:
            raise UsageError(
                f"--warmup-steps must be at most --max-steps ({self.max_steps}), got {self.warmup_steps}"
            )
        if self.threads > 4 * (os.cpu_count() or 1):
            raise UsageError(f"--threads {self.threads} is over 4x this machine's {os.cpu_count()} cores")
        n = self.parameter_count()
        if n is not None and n * self.parameter_size > MAX_PARAMETER_BYTES:
            raise UsageError(
                f"the model would have {n:,} parameters ({n * self.parameter_size / 2**30:.1f} GiB), over the "
                f"{MAX_PARAMETER_BYTES >> 30} GiB limit for the parameters alone; choose smaller layers"
            )

    torch_trainer = True  # False for configs of the NumPy trainer (no torch-only settings)
    parameter_size = 4  # bytes per parameter (float32)
    # does bf16 autocast train this model faster on a CPU with native bf16? --precision auto
    # picks bf16 there only if so (measured: benchmarks/bench_precision.py, docs/benchmarks.md)
    cpu_bf16 = True

    def log_steps(self) -> int:
        """Steps between two metrics records: ``log_freq``, or for 0 about 100 records per run."""
        return self.log_freq or max(1, self.max_steps // 100)

    def model_kwargs(self) -> dict[str, Any]:
        """Arguments of ``create_model`` for this config's model (recipes override)."""
        return {}

    def parameter_count(self) -> int | None:
        """The model's parameter count when it follows from the config alone (else None)."""
        return None

    def before_step(self, model: Any, epoch: float) -> None:
        """Called before every training step with the epochs done so far (a fraction); recipes
        override it to change what trains as the run goes on (a function of the epoch alone,
        so a resumed run does the same)."""

    def changes_trainable(self) -> bool:
        """Does ``before_step`` freeze parameters during the run? (DDP must then look for
        parameters that stopped taking part.)"""
        return False

    def quick_check_images(self, step: int) -> int:
        """How many test images the evaluation after ``step`` looks at, as a quick one-view
        check; 0: a full evaluation (the default: every evaluation is full)."""
        return 0

    def evaluating(self, model: Any, final: bool) -> contextlib.AbstractContextManager:
        """The context the trainer evaluates ``model`` in; ``final`` marks a run's last
        evaluation. Recipes override it to make the evaluations before the last cheaper."""
        return contextlib.nullcontext()


def _has_type(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(_has_type(v, int) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    def fmt(v: float | None, inf: str) -> str:
        return inf if v is None else str(int(v)) if float(v).is_integer() else f"{v:g}"

    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    return f"{left}{fmt(lo, '-inf')}, {fmt(hi, 'inf')}{right}"


# --------------------------------------------------------------------------- flags


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting: every usage error is one line, exit 2.
    Every command lists ``--debug`` (``cifarlab.cli.main`` takes it anywhere on the line)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.add_help:
            self.add_argument(
                "--debug",
                action="store_true",
                help="show the full traceback of an error (anywhere on the line)",
            )

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def parse_int_list(text: str) -> list[int]:
    """ "500,300" -> [500, 300]; "" -> [] (no hidden layer)."""
    text = text.strip()
    if not text:
        return []
    try:
        out = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in out):
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return out


def _base_type(tp: Any) -> Any:
    """Strip ``X | None`` to X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def add_config_args(parser: argparse.ArgumentParser, defaults: TrainConfig, presets: dict[str, dict]) -> None:
    """One flag per field of ``defaults``' class; help shows ``defaults`` (the first preset)."""
    first = next(iter(presets))
    parser.add_argument(
        "--preset", choices=list(presets), help=f"starting recipe; flags given override it (default: {first})"
    )
    group = parser.add_argument_group(f"settings (defaults shown are the {first} preset's)")
    hints = typing.get_type_hints(type(defaults))
    for f in dataclasses.fields(defaults):
        if f.metadata.get("torch_only") and not defaults.torch_trainer and f.name != "precision":
            continue  # (--precision stays, so that asking the NumPy MLP for bf16 is refused by name)
        tp = _base_type(hints[f.name])
        flags = [flag(f.name)] + ([f"--{f.name}"] if "_" in f.name else [])
        value = getattr(defaults, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        kw: dict[str, Any] = {
            "dest": f.name,
            "default": None,
            "help": f"{f.metadata['help']} ({first}: {shown})",
        }
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            kw["type"], kw["metavar"] = parse_int_list, "N,N,..."
        else:
            kw["type"] = tp
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
        group.add_argument(*flags, **kw)


def to_flags(settings: dict[str, Any]) -> list[str]:
    """The flags that give ``settings``: the inverse of :func:`add_config_args` and
    :func:`given_flags` (``{"augment": True, "dnn_hidden_units": [500, 300]}`` ->
    ``["--augment", "--dnn-hidden-units", "500,300"]``)."""
    out = []
    for name, value in settings.items():
        if isinstance(value, bool):
            out.append(flag(name) if value else "--no-" + flag(name)[2:])
            continue
        if isinstance(value, list):
            text = ",".join(map(str, value))
        elif isinstance(value, float):
            text = repr(value).removesuffix(".0")  # 0.001, 1e+30, 3 (not 3.0)
        else:
            text = str(value)
        out += [flag(name), text]
    return out


def given_flags(cls: type[TrainConfig], args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave on the command line (flags left out are None)."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }


def make_config(cls: type[C], base: dict[str, Any], overrides: dict[str, Any]) -> C:
    """``cls()`` with a preset's values, then ``overrides``, applied by ``dataclasses.replace``;
    validated. An int given for a float setting becomes that float, as its flag would."""
    hints = typing.get_type_hints(cls)
    overrides = {
        k: float(v) if _base_type(hints.get(k)) is float and type(v) is int else v
        for k, v in overrides.items()
    }
    try:
        cfg = dataclasses.replace(dataclasses.replace(cls(), **base), **overrides)
    except TypeError as e:  # an unknown field name
        raise UsageError(f"unknown setting for {cls.__name__}: {e}") from None
    cfg.validate()
    return cfg


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(text: str) -> str:
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device``: where a torch model runs (checked for existence when the model is built)."""
    p.add_argument(
        "--device",
        type=_device,
        default="auto",
        help="auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps (default: auto)",
    )


def add_progress_arg(p: argparse.ArgumentParser, what: str = "no progress bar") -> None:
    """--no-progress (args.progress False), for every command with a progress bar."""
    p.add_argument("--no-progress", dest="progress", action="store_false", help=what)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """--data-dir and --no-verify, for every command that reads CIFAR-10."""
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder holding cifar-10-batches-bin/ or cifar-10-batches-py/ "
        "(default: $CIFARLAB_DATA, else ~/.cache/cifarlab; downloaded if absent)",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the md5 check of the data files (for a re-packed copy)",
    )
