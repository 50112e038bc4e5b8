"""Where a torch model runs (``--device``) and in which precision it computes (``--precision``).

``--device auto`` takes CUDA, else Apple's MPS, else the CPU; under torchrun every rank takes
``cuda:LOCAL_RANK``. ``--precision`` is ``torch.autocast``'s: the weights, the optimizer and
the checkpoints stay float32, only the matrix products and convolutions run in bf16/fp16
(fp16 with a GradScaler, so small gradients do not underflow). ``auto`` picks bf16 where it
is fast and safe: CUDA devices that support it, and CPUs with native bf16 instructions
(AVX512-BF16 or AMX), for the models it speeds up there. On a CPU without them bf16 is
emulated and slower than fp32 (docs/benchmarks.md, "Precision"), so auto stays fp32 there, as
it does on MPS; and where a model trains slower in bf16 even on a native-bf16 CPU (the
EfficientNets: depthwise convolutions), its config says ``cpu_bf16 = False`` and auto stays fp32.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from cifarlab.errors import UsageError
from cifarlab.training.config import DEVICE_PATTERN
from cifarlab.training.distributed import Dist

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    from cifarlab.training.runs import machine

    isa = machine().get("isa", {})
    return bool(isa.get("avx512_bf16") or isa.get("amx"))


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def auto_device() -> str:
    """What ``--device auto`` picks on this machine: CUDA, else Apple's MPS, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"


def resolve_device(name: str = "auto", dist: Dist | None = None) -> torch.device:
    """The torch.device ``--device name`` means here; a device that is not there is a UsageError."""
    dist = dist or Dist()
    if not DEVICE_PATTERN.fullmatch(name):
        raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps; got {name!r}")
    if name == "auto":
        name = auto_device()
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = (
                "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            )
            raise UsageError(
                f"--device {name}: no CUDA device is available (torch {torch.__version__}, {build}); "
                "use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU"
            )
        if dist.active and name != "cuda":
            raise UsageError(
                f"--device {name}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda"
            )
        index = dist.local_rank if name == "cuda" else int(name.split(":")[1])
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"cuda:{index} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if name == "mps":
        if not _mps_available():
            raise UsageError("--device mps: Apple's MPS is not available here; use --device cpu")
        if dist.active:
            raise UsageError(
                "torchrun with --device mps is not supported (no MPS backend for torch.distributed)"
            )
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device, cpu_bf16: bool = True) -> str:
    """``auto`` made concrete for ``device`` (fp32, bf16 or fp16); an impossible one is refused.
    ``cpu_bf16``: whether bf16 pays for this model on a CPU with native bf16 (a recipe's
    ``TrainConfig.cpu_bf16``, from benchmarks/bench_precision.py); where it does not, auto
    stays fp32 on every CPU."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if device.type == "cpu":
            return "bf16" if cpu_bf16 and cpu_has_native_bf16() else "fp32"
        return "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or fp32"
        )
    return precision


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context of a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def describe(device: torch.device) -> str:
    """The device in words, for config.json: e.g. 'cuda:0 (NVIDIA H200)'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
