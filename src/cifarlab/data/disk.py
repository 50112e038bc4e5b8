"""CIFAR-10 on disk: find it, md5-verify every file, read it into uint8 arrays; download and
extract it (verified) when it is missing.

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
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.errors import DataError
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
    from cifarlab.data.downloads import DownloadFailed, check_url, stream

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
