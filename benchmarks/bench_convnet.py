"""Throughput of a conv model on CPU (the ConvNet by default): contiguous vs channels_last.

Measures
  * train images/s: Adam (lr 1e-4), forward + cross-entropy + backward + step, per batch;
  * eval images/s: forward under ``torch.inference_mode()`` with large batches;
for each memory format, and prints a markdown table of medians.

In channels_last mode both the model and each input batch are converted (the batch conversion is
part of the timed step, as it would be in a training loop fed contiguous tensors). The formats are
timed alternately, step by step, so drifting background load on a shared machine hits both alike.

    python benchmarks/bench_convnet.py --steps 10 --eval-steps 3
    python benchmarks/bench_convnet.py --model efficientnet_lite0 --model-arg image_size=64 \
        --batch-size 64 --eval-batch 250 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from cifarlab.models import create_model

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed train steps per format")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps/batches")
    p.add_argument("--batch-size", type=int, default=32, help="train batch size")
    p.add_argument("--eval-batch", type=int, default=1000, help="eval batch size")
    p.add_argument("--eval-steps", type=int, default=3, help="timed eval batches per format")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--model", default="convnet")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument of create_model (int or float values), repeatable",
    )
    p.add_argument("--formats", default="contiguous,channels_last", help="comma-separated")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _round_robin(fns: dict[str, Callable[[], None]], n: int, warmup: int) -> dict[str, list]:
    """Time each function ``n`` times, alternating between them every call.

    Interleaving keeps the comparison fair on a shared machine where the background load drifts.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def make_train_step(model: nn.Module, fmt, batch: int, lr: float) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        model.train()
        xb = x.contiguous(memory_format=fmt)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(xb), y)
        loss.backward()
        opt.step()

    return step


def make_eval_step(model: nn.Module, fmt, batch: int) -> Callable[[], None]:
    x = torch.randn(batch, 3, 32, 32)

    def step() -> None:
        model.eval()
        with torch.inference_mode():
            model(x.contiguous(memory_format=fmt)).argmax(1)

    return step


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    kwargs = {}
    for item in args.model_arg:
        key, _, value = item.partition("=")
        kwargs[key] = float(value) if "." in value else int(value)
    models = {}
    for name in formats:
        torch.manual_seed(args.seed)
        models[name] = create_model(args.model, **kwargs).to(memory_format=FORMATS[name])

    train = _round_robin(
        {n: make_train_step(m, FORMATS[n], args.batch_size, args.lr) for n, m in models.items()},
        args.steps,
        args.warmup,
    )
    print(f"# train done: { {n: round(statistics.median(t), 3) for n, t in train.items()} } s")
    evals = _round_robin(
        {n: make_eval_step(m, FORMATS[n], args.eval_batch) for n, m in models.items()},
        args.eval_steps,
        min(args.warmup, 1),
    )

    rows = []
    for name in formats:
        tr, ev = statistics.median(train[name]), statistics.median(evals[name])
        rows.append((name, args.batch_size / tr, tr, args.eval_batch / ev, ev))

    print()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {args.model} {kwargs}, "
        f"train batch {args.batch_size} x {args.steps} steps, "
        f"eval batch {args.eval_batch} x {args.eval_steps}; medians, formats interleaved"
    )
    print()
    print("| memory format | train img/s | train ms/step | eval img/s | eval s/batch |")
    print("|---|---:|---:|---:|---:|")
    for name, tr_ips, tr, ev_ips, ev in rows:
        print(f"| {name} | {tr_ips:.1f} | {tr * 1e3:.0f} | {ev_ips:.1f} | {ev:.2f} |")
    if len(rows) == 2:
        (_, a_tr, _, a_ev, _), (_, b_tr, _, b_ev, _) = rows
        print(f"| speed-up {rows[1][0]}/{rows[0][0]} | {b_tr / a_tr:.2f}x | | {b_ev / a_ev:.2f}x | |")


if __name__ == "__main__":
    main()
