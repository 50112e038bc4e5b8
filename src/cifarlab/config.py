"""Config dataclasses <-> command-line flags, nanoGPT style.

A trainer declares ``@dataclass class XConfig`` (defaults = the seed's) and a dict of
presets (``{"seed": {}, "best": {...overrides}}``). ``add_config_args`` turns every field
into a flag, spelled both ``--max-steps`` and ``--max_steps`` (the course's spelling);
``config_from_args`` starts from the chosen preset and applies only the flags the user gave.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

from cifarlab.errors import UsageError

T = TypeVar("T")


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
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_config_args(parser: argparse.ArgumentParser, cls: type, presets: dict[str, dict]) -> None:
    hints = typing.get_type_hints(cls)
    parser.add_argument(
        "--preset",
        choices=sorted(presets),
        default=next(iter(presets)),
        help="starting recipe; flags given override it (default: %(default)s)",
    )
    first = next(iter(presets))  # the dataclass defaults are the first preset's
    group = parser.add_argument_group(f"settings (defaults are the {first} preset's)")
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp = _base_type(hints[f.name])
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            flags.append(f"--{f.name}")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        helptext = f.metadata.get("help", "")
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": f"{helptext} ({first}: {shown})"}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            kw["type"], kw["metavar"] = parse_int_list, "N,N,..."
        else:
            kw["type"] = tp
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        group.add_argument(*flags, **kw)


def config_from_args(cls: type[T], args: argparse.Namespace, presets: dict[str, dict]) -> T:
    """The preset's config with every flag the user actually gave applied on top."""
    values = dict(presets[args.preset])
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    try:
        cfg = cls(**values)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    validate = getattr(cfg, "validate", None)
    if validate:
        validate()
    return cfg


def positive(name: str, value: float) -> None:
    if not value > 0:
        raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
