"""Data-layer speed: load_cifar10 (read + md5 + decode) and augmentation throughput.

    python benchmarks/bench_data.py --data-dir ../shared/cifar10 [--repeats 5]

Prints medians: seconds to load the whole set (with and without md5 verification) and
images/s of random_crop_flip on uint8 batches, plus the whole Batches.batch path.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np

from cifarlab.data import Batches, Preprocess, disk, load_cifar10, random_crop_flip


def fresh_load(data_dir: str | None, verify: bool = True) -> None:
    """A first load in a process: read, md5-check and decode (the in-process copy dropped)."""
    disk._last_load = None
    load_cifar10(data_dir, verify=verify)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()

    x, y, _, _ = load_cifar10(args.data_dir)  # warm the page cache
    t_verify = median_time(lambda: fresh_load(args.data_dir), args.repeats)
    load_cifar10(args.data_dir)
    t_again = median_time(lambda: load_cifar10(args.data_dir), args.repeats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_noverify = median_time(lambda: fresh_load(args.data_dir, verify=False), args.repeats)

    rng = np.random.default_rng(0)
    n_batches = 50
    xb = x[: args.batch_size]
    t_aug = median_time(lambda: [random_crop_flip(xb, rng) for _ in range(n_batches)], args.repeats)
    batches = Batches(x, y, args.batch_size, seed=0, augment=True)
    t_batch = median_time(lambda: [batches.batch(s) for s in range(n_batches)], args.repeats)
    prep = Preprocess.fit("standard", x)
    t_prep = median_time(lambda: [prep(batches.batch(s)[0]) for s in range(n_batches)], args.repeats)
    imgs = n_batches * args.batch_size
    print(f"| measurement (median of {args.repeats}) | value |")
    print("|---|---|")
    print(f"| load_cifar10, md5-verified (60,000 images) | {t_verify:.3f} s |")
    print(f"| load_cifar10, verify=False | {t_noverify:.3f} s |")
    print(f"| load_cifar10 again in the same process (files unchanged: a copy) | {t_again:.3f} s |")
    print(f"| random_crop_flip, batch {args.batch_size} | {imgs / t_aug:,.0f} images/s |")
    print(
        f"| Batches.batch (gather + crop + flip), batch {args.batch_size} | {imgs / t_batch:,.0f} images/s |"
    )
    print(f"| ... + standard preprocessing to float32 NCHW | {imgs / t_prep:,.0f} images/s |")


if __name__ == "__main__":
    main()
