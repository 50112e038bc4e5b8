"""Fixtures: tiny synthetic CIFAR-10 copies in both official formats, and the real copy."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cifarlab import data

REPO = Path(__file__).resolve().parents[1]
PER_BATCH = 20  # images per synthetic batch: 100 train, 20 test


def make_arrays(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """batch name -> (images NCHW uint8, labels) with every class present."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in (*data.TRAIN_BATCHES, data.TEST_BATCH):
        x = rng.integers(0, 256, size=(PER_BATCH, 3, 32, 32), dtype=np.uint8)
        y = (np.arange(PER_BATCH) + rng.integers(10)) % 10
        out[name] = (x, y.astype(np.int64))
    return out


def write_bin(folder: Path, arrays: dict) -> dict[str, str]:
    folder.mkdir(parents=True)
    for name, (x, y) in arrays.items():
        rec = np.concatenate([y.astype(np.uint8)[:, None], x.reshape(len(x), -1)], axis=1)
        (folder / f"{name}.bin").write_bytes(rec.tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(data.CLASSES) + "\n")
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def write_py(folder: Path, arrays: dict) -> dict[str, str]:
    folder.mkdir(parents=True)
    for name, (x, y) in arrays.items():
        d = {
            b"batch_label": name.encode(),
            b"labels": y.tolist(),
            b"data": x.reshape(len(x), -1),
            b"filenames": [b"f.png"] * len(y),
        }
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": list(data.CLASSES)}))
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """No test inherits what ``--device auto`` and ``--precision auto`` mean on the machine
    running it: auto is the CPU (also in the processes a test starts: no CUDA device is
    visible to them), and fp32 there (as on an AVX2-only CPU). Tests of low precision ask for
    it with --precision, and tests of auto itself patch the probe to the answer they need
    (both answers are covered). scripts/gpu_smoke.sh checks the GPU paths."""
    from cifarlab.training import devices

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(devices, "auto_device", lambda: "cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """A data root holding a synthetic binary-version copy whose md5s are the 'official' ones."""
    arrays = make_arrays()
    md5s = write_bin(tmp_path / "root" / data.BIN_DIR, arrays)
    monkeypatch.setitem(data.MD5, data.BIN_DIR, md5s)
    monkeypatch.delenv("CIFARLAB_DATA", raising=False)
    return tmp_path / "root", arrays


@pytest.fixture
def synthetic_py(tmp_path, monkeypatch):
    arrays = make_arrays()
    md5s = write_py(tmp_path / "root" / data.PY_DIR, arrays)
    monkeypatch.setitem(data.MD5, data.PY_DIR, md5s)
    return tmp_path / "root", arrays


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real CIFAR-10 copy (CIFARLAB_DATA or ../shared/cifar10); tests skip without it."""
    for cand in (os.environ.get("CIFARLAB_DATA"), REPO.parent / "shared" / "cifar10"):
        if cand and (Path(cand) / data.BIN_DIR).is_dir():
            return Path(cand)
    pytest.skip("real CIFAR-10 not found (set CIFARLAB_DATA)")
