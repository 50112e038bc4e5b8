"""Small C kernels, compiled on first use with the system C compiler and loaded with ctypes.

Nothing here is required: :func:`load` returns None when a kernel cannot be built (no compiler,
a compile error, ``CIFARLAB_KERNELS=0``), and callers fall back to their eager PyTorch code.

A kernel is built once per (source, compiler, CPU) into ``$CIFARLAB_CACHE/kernels`` (default
``~/.cache/cifarlab/kernels``) with ``-O3 -march=native -fopenmp``; the file name carries a hash
of all three, so an edited source, another compiler or a machine with other CPU features gets
its own build, and a half-written file is never loaded (it is renamed into place when done).
Load after ``import torch``: the kernel's OpenMP regions then run on torch's own libgomp, so the
two share one thread pool and ``torch.set_num_threads`` applies to both.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

__all__ = ["cache_dir", "load"]

_SOURCES = Path(__file__).resolve().parent
_FLAG_SETS = (  # tried in order; the second one for compilers without OpenMP
    ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"],
    ["-O3", "-march=native", "-fPIC", "-shared"],
)


def cache_dir() -> Path:
    root = (
        os.environ.get("CIFARLAB_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifarlab"
    )
    return Path(root) / "kernels"


def _cpu_fingerprint() -> str:
    """CPU model and feature flags (what -march=native compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """Build (once) and load ``kernels/<name>.c``; None if that is not possible."""
    if os.environ.get("CIFARLAB_KERNELS", "1") == "0":
        return None
    source = _SOURCES / f"{name}.c"
    cc = os.environ.get("CC", "cc")
    if not source.is_file() or shutil.which(cc) is None:
        return None
    identity = [source.read_text(), cc, _compiler_version(cc), _cpu_fingerprint()]
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256("\0".join([*identity, " ".join(flags)]).encode()).hexdigest()[:16]
        target = cache_dir() / f"{name}-{key}.so"
        try:
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so.part", dir=target.parent)
                os.close(fd)
                try:
                    proc = subprocess.run(
                        [cc, *flags, "-o", tmp, str(source), "-lm"],
                        capture_output=True,
                        text=True,
                        timeout=120,
                    )
                    if proc.returncode != 0:
                        errors.append(proc.stderr.strip().splitlines()[-1:] or ["compile failed"])
                        continue
                    os.replace(tmp, target)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            return ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append([str(exc)])
    warnings.warn(
        f"cifarlab: could not build the {name} C kernel with {cc!r} ({errors[-1][0] if errors else 'unknown'}); "
        "using the eager PyTorch path",
        RuntimeWarning,
        stacklevel=2,
    )
    return None
