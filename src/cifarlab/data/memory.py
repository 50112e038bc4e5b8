"""CIFAR-10 in memory: statistics, preprocessing, augmentation, the validation split and
batches fixed by seed and step (uint8 NHWC arrays in, float32 batches out)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from cifarlab.choices import PREPROCESSINGS
from cifarlab.data.disk import CLASSES
from cifarlab.errors import UsageError

# --------------------------------------------------------------------------- statistics


def class_counts(labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels, minlength=len(CLASSES))


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(C, C) int64 counts, rows the true class and columns the predicted one; its trace over
    its sum is the accuracy. The one place every evaluation counts its hits."""
    c = len(CLASSES)
    pairs = np.asarray(labels, dtype=np.int64) * c + np.asarray(predicted, dtype=np.int64)
    return np.bincount(pairs, minlength=c * c).reshape(c, c)


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 NHWC images, in 0..255 units (float64). From each
    channel's histogram of the 256 values: Σv and Σv² are then exact integers, and this is 3x
    faster than summing the pixels as floats (a second per run on a 2-core CPU)."""
    flat = x.reshape(-1, 3)
    counts = np.zeros((3, 256), np.int64)
    for i in range(0, len(flat), 1 << 22):  # bincount widens to int64: a chunk at a time (32 MB)
        for c in range(3):
            counts[c] += np.bincount(flat[i : i + (1 << 22), c], minlength=256)
    v = np.arange(256, dtype=np.float64)
    mean = counts @ v / len(flat)
    return mean, np.sqrt(np.maximum(counts @ (v * v) / len(flat) - mean**2, 0))  # >= 0 despite rounding


# --------------------------------------------------------------------------- preprocessing

# What ImageNet-pretrained weights were trained on: RGB in 0..1, minus this mean, over this std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """uint8 NHWC -> float32 NCHW, with statistics fitted on the training set only.

    ``seed``: pixels 0..255 minus the per-pixel mean image (the seed's; no scaling).
    ``standard``: (pixel/255 - channel mean) / channel std.
    ``imagenet``: (pixel/255 - ImageNet mean) / ImageNet std, fixed (torchvision-style weights).
    ``tf``: (pixel - 127) / 128, i.e. [-1, 1], fixed (TensorFlow-trained weights such as
    EfficientNet-Lite's).
    """

    name: str
    shift: np.ndarray  # broadcastable to NHWC float32
    scale: np.ndarray

    @classmethod
    def fit(cls, name: str, x_train: np.ndarray) -> Preprocess:
        if name == "seed":
            mean = x_train.mean(axis=0, dtype=np.float64).astype(np.float32)  # (32, 32, 3)
            return cls(name, mean, np.ones(1, np.float32))
        if name == "standard":
            mean, std = channel_stats(x_train)
            return cls(name, mean.astype(np.float32), (1.0 / std).astype(np.float32))
        if name == "imagenet":
            mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
            return cls(name, mean.astype(np.float32), (1.0 / std).astype(np.float32))
        if name == "tf":
            return cls(name, np.full(3, 127.0, np.float32), np.full(3, 1 / 128, np.float32))
        raise ValueError(f"unknown preprocessing {name!r}; choose one of {PREPROCESSINGS}")

    def nhwc(self, x: np.ndarray) -> np.ndarray:
        """uint8 (N, 32, 32, 3) -> preprocessed float32 (N, 32, 32, 3)."""
        out = x.astype(np.float32)
        out -= self.shift
        if self.name != "seed":
            out *= self.scale
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """uint8 (N, 32, 32, 3) -> preprocessed float32 (N, 3, 32, 32), C-contiguous."""
        return np.ascontiguousarray(self.nhwc(x).transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------- augmentation

_AR = np.arange(32)


def crop_flip_indices(
    n: int, rng: np.random.Generator, pad: int = 4, flip: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices (N, 32) each of a random crop of each image after reflect-padding
    by ``pad``, and of a horizontal flip (random, or where the boolean (N,) ``flip`` says):
    image i of the result is ``x[i][rows[i][:, None], cols[i][None, :]]``. The padding is never
    materialised: out-of-range rows/cols are reflected indices instead, so one gather does the
    whole batch (on the host or on the device)."""
    oy = rng.integers(-pad, pad + 1, size=n)
    ox = rng.integers(-pad, pad + 1, size=n)
    if flip is None:
        flip = rng.random(n) < 0.5
    rows = oy[:, None] + _AR  # (N, 32)
    cols = ox[:, None] + np.where(flip[:, None], _AR[::-1], _AR)
    rows = np.abs(rows)  # reflect below 0 ...
    rows = np.where(rows > 31, 62 - rows, rows)  # ... and above 31 (reflect, edge not repeated)
    cols = np.abs(cols)
    cols = np.where(cols > 31, 62 - cols, cols)
    return rows, cols


def random_crop_flip(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Random crop (reflect padding ``pad``) and horizontal flip: uint8 (N, 32, 32, 3) -> same."""
    rows, cols = crop_flip_indices(x.shape[0], rng, pad)
    return x[np.arange(x.shape[0])[:, None, None], rows[:, :, None], cols[:, None, :]]


# --------------------------------------------------------------------------- random streams
# Every random draw of the data layer comes from a numpy stream named here, seeded by the run's
# seed and a fixed purpose (numpy's SeedSequence entropy). They are as first recorded, so that
# every recorded run reproduces. Two pairs coincide, both harmless and tested as the only ones:
# numpy gives [a, b] and [a, b, 0] the same stream, so step 0's crops share epoch 1's order
# stream, and the validation split shares epoch 2's order stream (the split picks per class
# from each class's own index list; epoch 2 permutes the rest of the images).


def order_stream(seed: int, epoch: int) -> np.random.Generator:
    """The order in which epoch ``epoch`` visits the training images."""
    return np.random.default_rng([seed, epoch])


def augment_stream(seed: int, step: int) -> np.random.Generator:
    """The crops (and random flips) of training step ``step``."""
    return np.random.default_rng([seed, 1, step])


def first_flips_stream(seed: int) -> np.random.Generator:
    """``--flip alternate``: each image's flip in the first epoch."""
    return np.random.default_rng([seed, 2, 1])


def split_stream(seed: int) -> np.random.Generator:
    """``--val-split``: which training images are held out."""
    return np.random.default_rng([seed, 2])


# --------------------------------------------------------------------------- validation split


def split_validation(
    x: np.ndarray, y: np.ndarray, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out ``n`` images of (x, y), stratified: each class gives its share of ``n``
    (largest remainders round it), drawn from :func:`split_stream`. Returns
    (x_train, y_train, x_val, y_val); both keep the original order."""
    if not 0 < n < len(y):
        raise UsageError(f"--val-split {n} must be between 1 and {len(y) - 1} (the training images)")
    counts = np.bincount(y, minlength=len(CLASSES))
    exact = n * counts / counts.sum()
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take), kind="stable")[: n - take.sum()]] += 1
    rng = split_stream(seed)
    val = np.zeros(len(y), bool)
    for c, k in enumerate(take):
        val[rng.permutation(np.flatnonzero(y == c))[:k]] = True
    return x[~val], y[~val], x[val], y[val]


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """Which training images make one step, and how they are cropped and flipped: indices
    only, so the images can be gathered wherever the dataset lives (host or device).

    idx: int64 (B,) image indices; rows, cols: (B, 32) crop/flip indices, or None (no
    augmentation); the batch's images are ``x[idx[:, None, None], rows[:, :, None],
    cols[:, None, :]]``.
    """

    idx: np.ndarray
    rows: np.ndarray | None = None
    cols: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.idx)

    def shard(self, rank: int, world_size: int) -> Batch:
        """Rank ``rank``'s contiguous 1/world_size of the batch (data-parallel training)."""
        if world_size == 1:
            return self
        n = len(self.idx) // world_size
        part = slice(rank * n, (rank + 1) * n)
        aug = (None, None) if self.rows is None else (self.rows[part], self.cols[part])
        return Batch(self.idx[part], *aug)

    def gather(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (B, 32, 32, 3) and labels (B,) of this batch, from NumPy arrays."""
        if self.rows is None:
            return x[self.idx], y[self.idx]
        return x[self.idx[:, None, None], self.rows[:, :, None], self.cols[:, None, :]], y[self.idx]


class Batches:
    """Seeded mini-batches of a training set, in memory, fully determined by (seed, step).

    Epoch ``e`` visits the images in ``order_stream(seed, e).permutation(n)`` order and
    drops the incomplete last batch; augmentation of step ``s`` draws from
    ``augment_stream(seed, s)``. No hidden state, so a resumed run sees the same batches.

    With ``augment``, each image is cropped after reflect-padding by ``crop_pad`` and flipped:
    at random (``flip="random"``), or (``"alternate"``) at random in the first epoch and then
    the other way round from one epoch to the next, so every image is seen both ways in any
    two consecutive epochs (airbench's alternating flip); the first epoch's flips draw from
    ``first_flips_stream(seed)``.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        seed: int = 0,
        augment: bool = False,
        crop_pad: int = 4,
        flip: str = "random",
    ) -> None:
        if not 0 < batch_size <= len(x):
            raise UsageError(f"--batch-size {batch_size} must be between 1 and the {len(x)} training images")
        self.x, self.y, self.batch_size, self.seed, self.augment = x, y, batch_size, seed, augment
        self.crop_pad, self.flip = crop_pad, flip
        self.first_flips = first_flips_stream(seed).random(len(x)) < 0.5 if flip == "alternate" else None
        self.steps_per_epoch = len(x) // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = order_stream(self.seed, epoch).permutation(len(self.x))
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]

    def plan(self, step: int) -> Batch:
        """The :class:`Batch` of training step ``step``."""
        idx = np.sort(self.indices(step))  # sorted gather is cache-friendlier; order is irrelevant
        if not self.augment:
            return Batch(idx)
        flip = None
        if self.flip == "alternate":
            flip = self.first_flips[idx] ^ bool((step // self.steps_per_epoch) % 2)
        rng = augment_stream(self.seed, step)
        return Batch(idx, *crop_flip_indices(len(idx), rng, self.crop_pad, flip))

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (B, 32, 32, 3) and int64 labels (B,) of training step ``step``."""
        return self.plan(step).gather(self.x, self.y)

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1
