"""Every error cifarlab expects is a ``CifarlabError``: :func:`run_command` (what ``cli.main``
and an in-process sweep run call) prints its message as one line on stderr and returns exit
status 2 (``--debug`` shows the traceback instead)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable


class CifarlabError(Exception):
    """A request that cannot be done as asked; the message says what was wrong and how to fix it."""


class UsageError(CifarlabError):
    """A flag, path or combination of options is invalid."""


class DataError(CifarlabError):
    """A CIFAR-10 file is missing, truncated, corrupted or malformed (the message names it)."""


class CheckpointError(CifarlabError):
    """A checkpoint or run directory is missing, damaged or not one of cifarlab's."""


class WeightsError(CifarlabError):
    """Pretrained weights are missing or do not match the model."""


class TrainingDiverged(CifarlabError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class RunLocked(CifarlabError):
    """Another live process is writing the same run directory."""


class DistributedError(CifarlabError):
    """Another process of a torchrun job stopped, died or could not be reached."""


def reason(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (for the end of a one-line error)."""
    return " ".join(str(e).split())[:limit] or type(e).__name__


def public_name(e: BaseException) -> str:
    """The name of the first public class of ``e`` (``_DtypeMismatchError`` -> ``ValueError``):
    a user reads what kind of error it was, never a private class of ours."""
    return next(c.__name__ for c in type(e).__mro__ if not c.__name__.startswith("_"))


def unexpected(e: BaseException, limit: int = 300) -> str:
    """One line for an error cifarlab did not expect (a bug, or a library's own failure)."""
    return f"{public_name(e)}: {reason(e, limit)}"


def json_safe(obj):
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None, so that ``json.dumps(...,
    allow_nan=False)`` prints valid JSON: a diverged run's loss is ``null``, not ``NaN``."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def run_command(command: Callable[[], int | None], debug: bool = False) -> int:
    """Run one cifarlab command and return its exit status: 0 (or what it returns); 2 with one
    line on stderr for an expected error or an OSError (disk full, permissions...); 1 with one
    line for an error nobody expected (a bug); 130 on Ctrl-C. ``debug`` re-raises instead."""
    try:
        return command() or 0
    except (CifarlabError, OSError) as e:
        if debug:
            raise
        print(f"cifarlab: {_rank()}error: {_printable(reason(e, 2000))}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(
            f"cifarlab: {_rank()}error: {unexpected(e, 2000)} (an unexpected error: rerun with --debug for the "
            "traceback, and report it)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as e:
        why = re.sub(r"^(cifarlab: )?(rank \d+ )?interrupted:? ?", "", str(e))  # a run's own line, once
        print(f"cifarlab: {_rank()}interrupted{': ' + why if why else ''}", file=sys.stderr)
        return 130


def _printable(text: str) -> str:
    """An error line with no control characters (a hostile path could hold escape sequences)."""
    return "".join("?" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in text)


def _rank() -> str:
    """'rank N ' under torchrun (whose ranks all print), else ''."""
    return (
        f"rank {os.environ.get('RANK', '?')} " if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else ""
    )
