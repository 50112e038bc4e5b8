"""CIFAR-10 on disk -> verified uint8 arrays -> seeded, preprocessed, augmented batches.

Layout of a data folder (``--data-dir`` > ``$CIFARLAB_DATA`` > ``~/.cache/cifarlab``)::

    <data dir>/cifar-10-batches-bin/   official binary version (preferred), or
    <data dir>/cifar-10-batches-py/    official python (pickle) version

Every file is checked against its official md5 before use. Python-version batches
are only unpickled after their md5 matched, and always with a restricted unpickler.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.choices import PREPROCESSINGS
from cifarlab.errors import DataError, UsageError
from cifarlab.files import check_writable_dir

CLASSES: tuple[str, ...] = tuple("airplane automobile bird cat deer dog frog horse ship truck".split())

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
TARBALL = "cifar-10-binary.tar.gz"
TARBALL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"

BIN_DIR = "cifar-10-batches-bin"
PY_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"

# Official md5 of every member, per format. Tests swap these for synthetic data.
MD5: dict[str, dict[str, str]] = {
    BIN_DIR: {
        "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
        "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
        "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
        "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
        "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
        "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
        "batches.meta.txt": "40a0b180e208fe03a63ecc891b2555ad",
    },
    PY_DIR: {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
}

RECORD = 1 + 32 * 32 * 3  # one label byte + 3072 channel-major pixel bytes


# --------------------------------------------------------------------------- locate


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` > ``$CIFARLAB_DATA`` > ``~/.cache/cifarlab``; a file there is refused."""
    if data_dir is not None:
        root, what = Path(data_dir).expanduser(), "--data-dir"
    elif os.environ.get("CIFARLAB_DATA"):
        root, what = Path(os.environ["CIFARLAB_DATA"]).expanduser(), "$CIFARLAB_DATA"
    else:
        root, what = Path.home() / ".cache" / "cifarlab", "the data folder"
    check_writable_dir(root, what, DataError)
    return root


def find_dataset(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The dataset folder inside the data root (binary version first), or None."""
    root = data_root(data_dir)
    for name in (BIN_DIR, PY_DIR):
        if (root / name).is_dir():
            return root / name
    return None


def md5_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _member_name(batch: str, folder: Path) -> str:
    return f"{batch}.bin" if folder.name == BIN_DIR else batch


def verify_dataset(folder: Path) -> list[tuple[str, str | None]]:
    """Check every official file of ``folder``: a list of (file name, fault or None)."""
    if folder.name not in MD5:
        raise DataError(f"{folder}: not a CIFAR-10 folder (expected {BIN_DIR} or {PY_DIR})")
    report = []
    for name, expected in MD5[folder.name].items():
        path = folder / name
        if not path.is_file():
            report.append((name, "missing"))
            continue
        got = md5_file(path)
        report.append((name, None if got == expected else f"md5 mismatch: {got} != {expected}"))
    return report


def _check_md5(path: Path, folder_name: str) -> bytes:
    """Read ``path`` and return its bytes only if its md5 is the official one."""
    if not path.is_file():
        raise DataError(f"{path}: missing")
    data = path.read_bytes()
    expected = MD5[folder_name][path.name]
    got = hashlib.md5(data).hexdigest()
    if got != expected:
        raise DataError(
            f"{path}: md5 mismatch ({got}, expected {expected}); the file is corrupted: "
            "delete it and run `cifarlab data download`, or pass --no-verify for a re-packed copy"
        )
    return data


# --------------------------------------------------------------------------- read


def _parse_bin(path: Path, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    if len(data) % RECORD or not data:
        raise DataError(
            f"{path}: truncated to {len(data)} bytes (a batch is whole {RECORD}-byte records, "
            f"officially {10000 * RECORD} bytes)"
        )
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD)
    labels = rec[:, 0].astype(np.int64)
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels  # channel-major R,G,B planes: NCHW


class _SafeUnpickler(pickle.Unpickler):
    """Allows only the numpy array reconstruction a CIFAR batch needs; no code runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


_PY_KEYS = {b"batch_label", b"labels", b"data", b"filenames"}


def _parse_py(path: Path, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any unpickling fault is a data fault
        raise DataError(f"{path}: not a CIFAR-10 pickle ({e})") from None
    if not isinstance(d, dict) or not {b"data", b"labels"} <= set(d) or set(d) - _PY_KEYS:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{path}: unexpected pickle keys {keys}; expected data and labels")
    x = np.asarray(d[b"data"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(f"{path}: data is {x.dtype}{x.shape}, expected uint8 (N, 3072)")
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if labels.shape != (x.shape[0],):
        raise DataError(f"{path}: {labels.shape[0]} labels for {x.shape[0]} images")
    return x.reshape(-1, 3, 32, 32), labels


def _read_batch(folder: Path, batch: str, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    path = folder / _member_name(batch, folder)
    if verify:
        data = _check_md5(path, folder.name)
    elif path.is_file():
        data = path.read_bytes()
    else:
        raise DataError(f"{path}: missing")
    parse = _parse_bin if folder.name == BIN_DIR else _parse_py
    images, labels = parse(path, data)
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        bad = int(labels[(labels < 0) | (labels >= len(CLASSES))][0])
        raise DataError(f"{path}: label out of range: {bad} (expected 0..{len(CLASSES) - 1})")
    return images, labels


def load_cifar10(
    data_dir: str | os.PathLike | None = None, verify: bool = True, download: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load CIFAR-10 as ``(x_train, y_train, x_test, y_test)``.

    Images are uint8 (N, 32, 32, 3), labels int64 (N,). Downloads the official binary
    tarball into the data root when no dataset is there (``download=False`` raises instead).
    """
    folder = find_dataset(data_dir)
    if folder is None:
        if not download:
            raise DataError(f"no CIFAR-10 in {data_root(data_dir)}: run `cifarlab data download`")
        folder = download_cifar10(data_dir)
    if not verify:
        warnings.warn(f"skipping md5 verification of {folder}", stacklevel=2)
    global _last_load
    key = _files_key(folder, verify)
    if key is None or _last_load is None or _last_load[0] != key:
        parts = [_read_batch(folder, b, verify) for b in TRAIN_BATCHES]
        x_test, y_test = _read_batch(folder, TEST_BATCH, verify)
        x_train = _nhwc(np.concatenate([p[0] for p in parts]))
        y_train = np.concatenate([p[1] for p in parts])
        loaded = (x_train, y_train, _nhwc(x_test), y_test)
        _last_load = None if key is None else (key, loaded)
        if key is None:
            return loaded
    x_train, y_train, x_test, y_test = (a.copy() for a in _last_load[1])  # the cache stays unchanged
    return x_train, y_train, x_test, y_test


# The last dataset loaded, kept for the next load in this process (a sweep or `reproduce` trains
# many runs in one process): reading, md5-checking and transposing it costs about a second.
_last_load: tuple[tuple | None, tuple[np.ndarray, ...]] | None = None


RACY_SECONDS = 3  # a file changed this recently may change again within its clock tick: not cached


def _files_key(folder: Path, verify: bool) -> tuple | None:
    """What must be unchanged for a loaded copy to stand for the files: their identity, size and
    modification time, and the md5 table they were checked against. None (no caching) if one is
    missing or was modified in the last few seconds: a rewrite within the file system's
    timestamp resolution would leave the key unchanged (git's "racily clean" problem)."""
    stats = []
    now = time.time_ns()
    for batch in (*TRAIN_BATCHES, TEST_BATCH):
        try:
            st = (folder / _member_name(batch, folder)).stat()
        except OSError:
            return None
        if now - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_SECONDS * 10**9:
            return None
        stats.append((batch, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    md5s = tuple(sorted(MD5.get(folder.name, {}).items())) if verify else ()
    return str(folder.resolve()), verify, tuple(stats), md5s


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def dataset_fingerprint(data_dir: str | os.PathLike | None = None, verified: bool = True) -> dict[str, Any]:
    """Which files a run used, for config.json: the folder and the md5 table they were
    verified against (``verified: false`` and no md5s under --no-verify)."""
    folder = find_dataset(data_dir)
    if not verified:
        return {"folder": str(folder), "verified": False}
    return {"folder": str(folder), **(MD5[folder.name] if folder else {})}


# --------------------------------------------------------------------------- download


def download_cifar10(
    data_dir: str | os.PathLike | None = None,
    url: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Download and safely extract the official binary version; returns its folder.

    The tarball streams into ``<name>.part``, renamed only after its md5 matched, so an
    interrupted download is never mistaken for a complete one.
    """
    from cifarlab.downloads import DownloadFailed, check_url, stream

    root = data_root(data_dir)
    url = url or os.environ.get("CIFARLAB_URL") or URL
    md5 = (md5 or os.environ.get("CIFARLAB_TARBALL_MD5") or TARBALL_MD5).lower()
    try:
        check_url(url)
    except ValueError as e:
        raise DataError(str(e)) from None
    if len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5):
        raise DataError(f"--md5 {md5!r} is not an md5 (32 hexadecimal digits)")
    root.mkdir(parents=True, exist_ok=True)
    tarball = root / TARBALL
    if not (tarball.is_file() and md5_file(tarball) == md5):
        part = tarball.with_name(TARBALL + ".part")
        try:
            got = stream(url, part, "md5", progress, desc=f"downloading {TARBALL}")
        except DownloadFailed as e:
            raise DataError(
                f"download of {url} failed ({e}); without network, fetch that file by hand into {root} "
                f"and run `cifarlab data download --data-dir {root}`"
            ) from None
        if got != md5:
            raise DataError(
                f"{part}: md5 mismatch after download ({got}, expected {md5}); "
                "the download is incomplete or corrupted: run `cifarlab data download` again"
            )
        part.replace(tarball)
    return extract_tarball(tarball, root)


def extract_tarball(tarball: Path, root: Path) -> Path:
    """Extract the CIFAR-10 members of ``tarball`` into ``root``, refusing unsafe members.

    Members are never handed to tarfile's extractor: each regular file is read and
    written by us under ``root``, after its name was checked; links, devices, absolute
    names and ``..`` are refused. Every member is md5-checked before the folder appears.
    """
    root = Path(root)
    try:
        tar = tarfile.open(tarball, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{tarball}: not a readable tar archive ({e})") from None
    with tar:
        members = tar.getmembers()
        for m in members:
            parts = Path(m.name).parts
            if m.name.startswith(("/", "\\")) or Path(m.name).is_absolute() or ".." in parts:
                raise DataError(f"{tarball}: refusing member {m.name!r}: it would land outside {root}")
            if not (m.isfile() or m.isdir()):
                raise DataError(f"{tarball}: refusing member {m.name!r}: links and devices are not allowed")
        folders = {Path(m.name).parts[0] for m in members if m.isfile()}
        if len(folders) != 1 or next(iter(folders)) not in MD5:
            raise DataError(f"{tarball}: not a CIFAR-10 archive (top-level folders {sorted(folders)})")
        name = folders.pop()
        tmp = root / f".{name}.extracting"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for m in members:
            if not m.isfile():
                continue
            rel = Path(*Path(m.name).parts[1:])
            if str(rel) not in MD5[name]:
                continue  # e.g. readme.html: not part of the data
            data = tar.extractfile(m).read()
            if hashlib.md5(data).hexdigest() != MD5[name][str(rel)]:
                shutil.rmtree(tmp, ignore_errors=True)
                raise DataError(f"{tarball}: member {m.name} md5 mismatch")
            (tmp / rel).write_bytes(data)
    missing = sorted(set(MD5[name]) - {p.name for p in tmp.iterdir()})
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{tarball}: members missing: {', '.join(missing)}")
    final = root / name
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{final} already exists; remove it to extract again")
    tmp.rename(final)
    return final


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


# --------------------------------------------------------------------------- validation split


def split_validation(
    x: np.ndarray, y: np.ndarray, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out ``n`` images of (x, y), stratified: each class gives its share of ``n``
    (largest remainders round it), drawn with ``default_rng([seed, 2])``. Returns
    (x_train, y_train, x_val, y_val); both keep the original order."""
    if not 0 < n < len(y):
        raise UsageError(f"--val-split {n} must be between 1 and {len(y) - 1} (the training images)")
    counts = np.bincount(y, minlength=len(CLASSES))
    exact = n * counts / counts.sum()
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take), kind="stable")[: n - take.sum()]] += 1
    rng = np.random.default_rng([seed, 2])
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

    Epoch ``e`` visits the images in ``default_rng([seed, e]).permutation(n)`` order and
    drops the incomplete last batch; augmentation of step ``s`` draws from
    ``default_rng([seed, 1, s])``. No hidden state, so a resumed run sees the same batches.
    (Step 0's stream [seed, 1, 0] is epoch 1's [seed, 1]: its crops share a stream with the
    order, which is harmless and kept so that recorded runs stay reproducible.)

    With ``augment``, each image is cropped after reflect-padding by ``crop_pad`` and flipped:
    at random (``flip="random"``), or (``"alternate"``) at random in the first epoch and then
    the other way round from one epoch to the next, so every image is seen both ways in any
    two consecutive epochs (airbench's alternating flip); the first epoch's flips draw from
    ``default_rng([seed, 2, 1])``, a stream of their own (numpy's seeds [a, b] and [a, b, 0]
    are the same stream, and [seed, 2] is epoch 2's order and the validation split's).
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
        self.first_flips = (
            np.random.default_rng([seed, 2, 1]).random(len(x)) < 0.5 if flip == "alternate" else None
        )
        self.steps_per_epoch = len(x) // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.x))
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]

    def plan(self, step: int) -> Batch:
        """The :class:`Batch` of training step ``step``."""
        idx = np.sort(self.indices(step))  # sorted gather is cache-friendlier; order is irrelevant
        if not self.augment:
            return Batch(idx)
        flip = None
        if self.flip == "alternate":
            flip = self.first_flips[idx] ^ bool((step // self.steps_per_epoch) % 2)
        rng = np.random.default_rng([self.seed, 1, step])
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
