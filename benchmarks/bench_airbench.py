"""Whole-process time of airbench94's own training code against ``cifarlab train fast``, on
this CPU, side by side in one run.

airbench94 (Keller Jordan's, installed from PyPI: ``pip install airbench==0.1.8``; never copied
here) is written for one CUDA GPU in fp16. It is adapted at run time, in its own process, for
the CPU: ``.cuda()`` is a no-op, its fp16 tensors and weights are fp32 (fp16 arithmetic on a
CPU is emulated and slow; bf16 weights lose accuracy), its CUDA timers are wall clocks, and the
two torchvision calls it makes (a dataset download and ``Normalize``) are replaced by the
CIFAR-10 that cifarlab loads (md5-checked) and a three-line normalisation. Its network, data
order, optimizer, schedule, Lookahead, whitening and test-time augmentation are untouched.

Each tool runs as its own process, timed from its start to its exit (start-up, data, every
evaluation it makes, the final TTA): first one epoch each (48 steps of 1024), then a whole run
each, alternating. cifarlab runs at ``--precision`` (default: auto, what a user gets).

    pip install airbench==0.1.8
    CIFARLAB_DATA=../shared/cifar10 python benchmarks/bench_airbench.py | tee results/bench/airbench-<cpu>.txt
    python benchmarks/bench_airbench.py --modes epoch      # only the one-epoch pair (~9 min here)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST_EPOCH = 48  # steps of 1024 in one epoch of the 50 000 training images


def _adapt_airbench_for_cpu() -> None:
    """Make airbench94's CUDA/fp16 code run on the CPU in fp32 (in the child process only)."""
    import types

    import torch
    from torch import nn

    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")  # type: ignore[attr-defined]

    class Normalize:  # the one transform airbench uses
        def __init__(self, mean, std):
            self.mean, self.std = torch.as_tensor(mean), torch.as_tensor(std)

        def __call__(self, x):
            return (x - self.mean.view(-1, 1, 1).to(x.dtype)) / self.std.view(-1, 1, 1).to(x.dtype)

    tv.transforms.Normalize = Normalize  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tv.transforms  # type: ignore[attr-defined]

    nn.Module.cuda = lambda self, device=None: self  # type: ignore[method-assign]
    nn.Module.half = lambda self: self.float()  # type: ignore[method-assign]
    torch.Tensor.half = lambda self, *a, **k: self.float()  # type: ignore[method-assign]

    class Event:  # torch.cuda.Event(enable_timing=True) as a wall clock
        def __init__(self, **_):
            self.t = 0.0

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return 1e3 * (end.t - self.t)

    torch.cuda.Event = Event  # type: ignore[misc,assignment]
    torch.cuda.synchronize = lambda *a, **k: None


def child_airbench(epochs: float) -> None:
    """Runs in the data folder made by :func:`airbench_data` (airbench reads ./cifar10/*.pt)."""
    _adapt_airbench_for_cpu()
    import airbench
    from airbench import utils

    defaults = list(utils.CifarLoader.__init__.__defaults__)
    defaults[-1] = "cpu"  # gpu=0 -> load the tensors to the CPU
    utils.CifarLoader.__init__.__defaults__ = tuple(defaults)
    seen: list[float] = []
    evaluate = utils.evaluate

    def recorded(model, loader, tta_level=0):
        seen.append(evaluate(model, loader, tta_level))
        return seen[-1]

    utils.evaluate = recorded
    airbench.train94(epochs=epochs)
    print(f"RESULT test_accuracy={seen[-1]:.4f}", flush=True)


def airbench_data(root: Path) -> None:
    """cifar10/train.pt and test.pt as airbench saves them (uint8 NHWC images, labels)."""
    import torch

    from cifarlab.data import CLASSES, load_cifar10

    x_tr, y_tr, x_te, y_te = load_cifar10()
    (root / "cifar10").mkdir(parents=True, exist_ok=True)
    for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        torch.save(
            {"images": torch.from_numpy(x), "labels": torch.from_numpy(y), "classes": list(CLASSES)},
            root / "cifar10" / f"{name}.pt",
        )


def timed(cmd: list[str], cwd: Path | None = None) -> tuple[float, str]:
    """(whole-process seconds, its output); exits with the output if the process fails."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return seconds, p.stdout + p.stderr


def run_airbench(root: Path, epochs: float) -> tuple[float, float]:
    seconds, out = timed(
        [sys.executable, str(Path(__file__).resolve()), "--child-airbench", str(epochs)], root
    )
    m = re.search(r"RESULT test_accuracy=([0-9.]+)", out)
    assert m, out[-2000:]
    return seconds, float(m.group(1))


def run_fast(root: Path, name: str, precision: str, steps: int | None) -> tuple[float, float, dict]:
    out = root / "runs" / name
    cmd = [sys.executable, "-m", "cifarlab", "train", "fast", "--no-progress", "--precision", precision,
           "--out", str(out)]  # fmt: skip
    if steps:
        cmd += ["--max-steps", str(steps)]
    seconds, _ = timed(cmd)
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    return seconds, summary["test_accuracy"], config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="epoch,whole", help="comma-separated: epoch (one epoch each), whole")
    p.add_argument("--precision", default="auto", help="cifarlab's --precision (airbench: fp32)")
    p.add_argument("--child-airbench", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_airbench is not None:
        return child_airbench(args.child_airbench)

    from importlib.metadata import version

    import torch

    from cifarlab.training.runs import machine

    m = machine(torch.get_num_threads())
    print(
        "command: python benchmarks/bench_airbench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    print(f"CPU: {m['cpu']}, {m['cores']} cores, torch threads {m['threads']}, isa {m.get('isa')}")
    print(f"torch {torch.__version__}, airbench {version('airbench')} (airbench94 in fp32)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        airbench_data(root)
        for mode in [s for s in args.modes.split(",") if s]:
            epochs, steps = (1.0, FAST_EPOCH) if mode == "epoch" else (9.9, None)
            a_s, a_acc = run_airbench(root, epochs)
            print(
                f"[{mode}] airbench94 fp32 ({epochs} epochs): {a_s:.1f} s, test accuracy {a_acc:.4f}",
                flush=True,
            )
            f_s, f_acc, cfg = run_fast(root, mode, args.precision, steps)
            print(
                f"[{mode}] cifarlab train fast ({cfg['distributed']['precision']}, {cfg['train']['max_steps']} steps): "
                f"{f_s:.1f} s, test accuracy {f_acc:.4f}",
                flush=True,
            )
            print(f"[{mode}] whole-process time, cifarlab / airbench94: {f_s / a_s:.2f}x", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
