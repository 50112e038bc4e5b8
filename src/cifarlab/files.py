"""Files cifarlab writes and reads, at the bottom of the package (no cifarlab import but the
errors): atomic writes (a reader sees the old file or the new one, never half) and the one
hardened reader of JSON files that may come from anywhere (regular files only, a size limit, a
nesting limit, finite numbers)."""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from cifarlab.errors import CheckpointError, CifarlabError, UsageError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=jsonable) + "\n").encode())


def jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy scalars and arrays
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_writable_dir(path: Path, what: str, error: type[CifarlabError] = UsageError) -> None:
    """Refuse a directory path that is a file or lies under a file, before anything is written."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is" if p == path else f"lies under {p}, which is"
                raise error(f"{what} {path} {where} a file, not a directory")
            return


MAX_FILE_BYTES = 256 << 20  # no file of a run directory is near this; a larger one is refused


MAX_JSON_DEPTH = 32  # cifarlab writes 3 levels; deeper nesting is not a file of ours


def read_bytes(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of a run directory: a FIFO, a device or a link to one is
    refused (it could hang or never end), as is a file over ``limit`` bytes."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist (is this a run directory?)") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: damaged, not a regular file")
    if st.st_size > limit:
        raise CheckpointError(
            f"{path}: damaged, {st.st_size:,} bytes (over the {limit:,} a run's file may have)"
        )
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{path}: damaged, over {limit:,} bytes")
    return data


def _not_finite(token: str) -> float:
    raise ValueError(f"{token} is not a finite number")


def _depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: deep input cannot recurse here)."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        value, d = todo.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_JSON_DEPTH:
                todo += [(v, d + 1) for v in (value.values() if isinstance(value, dict) else value)]
    return deepest


def parse_json(text: str | bytes, where: str, finite: bool = True) -> Any:
    """One JSON value from a file of a run directory: at most ``MAX_JSON_DEPTH`` levels, and
    finite numbers only unless ``finite`` is False (metrics records: a diverging run logs an
    inf or NaN loss); anything else is a one-line CheckpointError naming ``where``."""
    try:
        obj = (
            json.loads(text, parse_constant=_not_finite, parse_float=_finite_float)
            if finite
            else json.loads(text)
        )
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{where}: damaged, not valid JSON") from None
    except RecursionError:
        raise CheckpointError(f"{where}: damaged, JSON nested too deep") from None
    if _depth(obj) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{where}: damaged, JSON nested over {MAX_JSON_DEPTH} levels deep")
    return obj


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"{token} is not a finite number")
    return value
