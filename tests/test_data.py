"""The data layer: formats, verification, faults, safe extraction, download, batches."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from cifarlab import data
from cifarlab.data import disk
from cifarlab.errors import DataError, UsageError

# --------------------------------------------------------------------------- reading


def _expected(arrays):
    xs = [arrays[b][0] for b in data.TRAIN_BATCHES]
    ys = [arrays[b][1] for b in data.TRAIN_BATCHES]
    return (
        np.concatenate(xs).transpose(0, 2, 3, 1),
        np.concatenate(ys),
        arrays["test_batch"][0].transpose(0, 2, 3, 1),
        arrays["test_batch"][1],
    )


def test_binary_format_loads_nhwc(synthetic):
    root, arrays = synthetic
    got = data.load_cifar10(root)
    for g, e in zip(got, _expected(arrays)):
        np.testing.assert_array_equal(g, e)
    x_train, y_train, _, _ = got
    assert x_train.dtype == np.uint8 and x_train.shape == (100, 32, 32, 3)
    assert y_train.dtype == np.int64 and x_train.flags.c_contiguous


def test_python_format_equals_binary(synthetic_py):
    root, arrays = synthetic_py
    for g, e in zip(data.load_cifar10(root), _expected(arrays)):
        np.testing.assert_array_equal(g, e)


def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "env"))
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data.data_root() == tmp_path / "env"
    monkeypatch.delenv("CIFARLAB_DATA")
    assert data.data_root() == Path.home() / ".cache" / "cifarlab"


def test_missing_file_is_named(synthetic):
    root, _ = synthetic
    (root / data.BIN_DIR / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match=r"data_batch_3\.bin: missing"):
        data.load_cifar10(root)


def test_truncated_file_is_named_with_its_size(synthetic):
    root, _ = synthetic
    f = root / data.BIN_DIR / "test_batch.bin"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"test_batch\.bin: md5 mismatch"):
        data.load_cifar10(root)
    with (
        pytest.raises(DataError, match=r"test_batch\.bin: truncated to 5000 bytes"),
        pytest.warns(UserWarning),
    ):
        data.load_cifar10(root, verify=False)


def test_one_changed_byte_fails_md5(synthetic):
    root, _ = synthetic
    f = root / data.BIN_DIR / "data_batch_2.bin"
    b = bytearray(f.read_bytes())
    b[1234] ^= 1
    f.write_bytes(bytes(b))
    with pytest.raises(DataError, match=r"data_batch_2\.bin: md5 mismatch"):
        data.load_cifar10(root)
    faults = dict(data.verify_dataset(root / data.BIN_DIR))
    assert faults["data_batch_2.bin"].startswith("md5 mismatch")
    assert all(v is None for k, v in faults.items() if k != "data_batch_2.bin")


def test_a_second_load_reuses_the_checked_copy_until_a_file_changes(synthetic, monkeypatch):
    root, _ = synthetic
    first = data.load_cifar10(root)
    assert disk._last_load is None  # files written just now are not trusted to stay: not cached
    clock = disk.time.time_ns
    monkeypatch.setattr(disk.time, "time_ns", lambda: clock() + 3600 * 10**9)  # an hour later
    first = data.load_cifar10(root)
    assert disk._last_load is not None
    reads = []
    real_read = disk._read_batch
    monkeypatch.setattr(disk, "_read_batch", lambda *a: reads.append(a[1]) or real_read(*a))
    second = data.load_cifar10(root)
    assert reads == [] and all(np.array_equal(a, b) for a, b in zip(first, second))
    second[0][0] = 7  # each load is a copy of its own: changing one changes neither the cache nor others
    assert np.array_equal(data.load_cifar10(root)[0], first[0])
    path = root / data.BIN_DIR / "data_batch_2.bin"
    raw = bytearray(path.read_bytes())
    raw[200] ^= 1
    path.write_bytes(bytes(raw))  # a changed file is read (and md5-checked) again
    with pytest.raises(DataError, match="md5 mismatch"):
        data.load_cifar10(root)
    assert "data_batch_1" in reads


def test_label_out_of_range(synthetic):
    root, _ = synthetic
    f = root / data.BIN_DIR / "data_batch_1.bin"
    b = bytearray(f.read_bytes())
    b[data.RECORD * 3] = 10  # label byte of the 4th record
    f.write_bytes(bytes(b))
    with (
        pytest.raises(DataError, match=r"data_batch_1\.bin: label out of range: 10"),
        pytest.warns(UserWarning),
    ):
        data.load_cifar10(root, verify=False)


def test_pickle_with_unexpected_keys(synthetic_py):
    root, _ = synthetic_py
    f = root / data.PY_DIR / "data_batch_1"
    f.write_bytes(pickle.dumps({b"pixels": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"data_batch_1: unexpected pickle keys"), pytest.warns(UserWarning):
        data.load_cifar10(root, verify=False)


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/cifarlab-pwned"),))


def test_malicious_pickle_never_runs(synthetic_py, monkeypatch):
    root, _ = synthetic_py
    Path("/tmp/cifarlab-pwned").unlink(missing_ok=True)
    f = root / data.PY_DIR / "data_batch_1"
    f.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DataError, match="md5 mismatch"):  # the md5 gate comes first ...
        data.load_cifar10(root)
    monkeypatch.setitem(data.MD5[data.PY_DIR], "data_batch_1", hashlib.md5(f.read_bytes()).hexdigest())
    with pytest.raises(DataError, match="refusing to load global"):  # ... and the unpickler is restricted
        data.load_cifar10(root)
    assert not Path("/tmp/cifarlab-pwned").exists()


# --------------------------------------------------------------------------- tarballs


def _tarball(path: Path, members: dict[str, bytes], extra=None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        if extra:
            tar.addfile(extra)
    return path


def _members(folder: Path) -> dict[str, bytes]:
    return {f"{data.BIN_DIR}/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())}


def test_extract_good_tarball(synthetic, tmp_path):
    root, arrays = synthetic
    tb = _tarball(tmp_path / "c.tar.gz", _members(root / data.BIN_DIR))
    folder = data.extract_tarball(tb, tmp_path / "new")
    assert folder == tmp_path / "new" / data.BIN_DIR
    np.testing.assert_array_equal(data.load_cifar10(tmp_path / "new")[0], _expected(arrays)[0])


@pytest.mark.parametrize("bad", ["../evil.bin", "/tmp/evil.bin", f"{data.BIN_DIR}/../../evil.bin"])
def test_tarball_member_outside_target_is_refused(synthetic, tmp_path, bad):
    root, _ = synthetic
    members = {**_members(root / data.BIN_DIR), bad: b"x"}
    tb = _tarball(tmp_path / "c.tar.gz", members)
    with pytest.raises(DataError, match="refusing member"):
        data.extract_tarball(tb, tmp_path / "t")
    assert not (tmp_path / "evil.bin").exists() and not Path("/tmp/evil.bin").exists()
    assert not (tmp_path / "t" / data.BIN_DIR).exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tarball_link_member_is_refused(synthetic, tmp_path, kind):
    root, _ = synthetic
    link = tarfile.TarInfo(f"{data.BIN_DIR}/data_batch_1.bin")
    link.type, link.linkname = kind, "/etc/passwd"
    members = _members(root / data.BIN_DIR)
    members.pop(f"{data.BIN_DIR}/data_batch_1.bin")
    tb = _tarball(tmp_path / "c.tar.gz", members, extra=link)
    with pytest.raises(DataError, match="links and devices are not allowed"):
        data.extract_tarball(tb, tmp_path / "t")
    assert not (tmp_path / "t" / data.BIN_DIR).exists()


def test_tarball_member_with_wrong_md5_is_refused(synthetic, tmp_path):
    root, _ = synthetic
    members = _members(root / data.BIN_DIR)
    members[f"{data.BIN_DIR}/test_batch.bin"] = b"\0" * data.RECORD
    with pytest.raises(DataError, match="test_batch.bin md5 mismatch"):
        data.extract_tarball(_tarball(tmp_path / "c.tar.gz", members), tmp_path / "t")
    assert not (tmp_path / "t" / data.BIN_DIR).exists()


# --------------------------------------------------------------------------- download


class _Server:
    """Serves one payload on 127.0.0.1; ``truncate`` sends only that many bytes of it
    while announcing the full Content-Length (an interrupted download)."""

    def __init__(self, payload: bytes, truncate: int | None = None):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[: outer.truncate] if outer.truncate else payload)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *a):
                pass

        self.truncate = truncate
        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cifar-10-binary.tar.gz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served_tarball(synthetic, tmp_path):
    root, arrays = synthetic
    tb = _tarball(tmp_path / "src.tar.gz", _members(root / data.BIN_DIR)).read_bytes()
    return tb, hashlib.md5(tb).hexdigest(), arrays


def test_download_verifies_and_extracts(served_tarball, tmp_path):
    payload, md5, arrays = served_tarball
    srv = _Server(payload)
    try:
        target = tmp_path / "dl"
        data.download_cifar10(target, url=srv.url, md5=md5, progress=False)
        np.testing.assert_array_equal(data.load_cifar10(target, download=False)[2], _expected(arrays)[2])
        assert not (target / (data.TARBALL + ".part")).exists()
    finally:
        srv.close()


def test_interrupted_download_is_not_mistaken_for_complete(served_tarball, tmp_path):
    payload, md5, _ = served_tarball
    srv = _Server(payload, truncate=len(payload) // 2)
    target = tmp_path / "dl"
    try:
        with pytest.raises(DataError, match="incomplete"):
            data.download_cifar10(target, url=srv.url, md5=md5, progress=False)
    finally:
        srv.close()
    assert not (target / data.TARBALL).exists()  # never renamed from .part
    assert data.find_dataset(target) is None
    # a second, complete download then succeeds over the stale .part
    srv = _Server(payload)
    try:
        data.download_cifar10(target, url=srv.url, md5=md5, progress=False)
        assert data.find_dataset(target) == target / data.BIN_DIR
    finally:
        srv.close()


def test_download_with_wrong_md5_is_refused(served_tarball, tmp_path):
    payload, _, _ = served_tarball
    srv = _Server(payload)
    try:
        with pytest.raises(DataError, match="md5 mismatch after download"):
            data.download_cifar10(tmp_path / "dl", url=srv.url, md5="0" * 32, progress=False)
    finally:
        srv.close()
    assert not (tmp_path / "dl" / data.TARBALL).exists()


# ------------------------------------------------------------- preprocessing, augmentation, batches


def test_seed_preprocessing_subtracts_the_mean_image(synthetic):
    x = data.load_cifar10(synthetic[0])[0]
    prep = data.Preprocess.fit("seed", x)
    out = prep(x)
    assert out.shape == (100, 3, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-3)  # per pixel, no scaling
    np.testing.assert_allclose(out[5, 1, 2, 3], x[5, 2, 3, 1] - x[:, 2, 3, 1].mean(), rtol=1e-5)


def test_standard_preprocessing_per_channel(synthetic):
    x = data.load_cifar10(synthetic[0])[0]
    out = data.Preprocess.fit("standard", x)(x)
    np.testing.assert_allclose(out.mean((0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(out.std((0, 2, 3)), 1, atol=1e-3)
    with pytest.raises(ValueError, match="unknown preprocessing"):
        data.Preprocess.fit("zca", x)


def test_a_recently_touched_file_is_not_cached_even_with_an_old_mtime(synthetic):
    root, _ = synthetic
    for f in (root / data.BIN_DIR).iterdir():  # mtime set back an hour; the change time is now
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns - 3600 * 10**9))
    data.load_cifar10(root)
    assert disk._last_load is None


def test_channel_stats_of_a_constant_channel_is_zero_not_nan():
    x = np.full((2, 32, 32, 3), 200, np.uint8)
    mean, std = data.channel_stats(x)
    assert mean.tolist() == [200.0] * 3 and std.tolist() == [0.0] * 3


def test_channel_stats_equal_numpys_float_statistics():
    # 4500 images: 4.6M pixels, over the 4M-pixel chunk the histograms are counted in
    x = np.random.default_rng(0).integers(0, 256, size=(4500, 32, 32, 3), dtype=np.uint8)
    x[..., 2] //= 3  # channels of different spread
    mean, std = data.channel_stats(x)
    flat = x.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-10)


def test_random_crop_flip_equals_padded_reference():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    out = data.random_crop_flip(x, np.random.default_rng(7))
    draws = np.random.default_rng(7)  # same draws, same order as the implementation
    oy, ox = draws.integers(-4, 5, size=64), draws.integers(-4, 5, size=64)
    flip = draws.random(64) < 0.5
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    for i in range(64):
        ref = padded[i, 4 + oy[i] : 36 + oy[i], 4 + ox[i] : 36 + ox[i]]
        np.testing.assert_array_equal(out[i], ref[:, ::-1] if flip[i] else ref)
    assert out.dtype == np.uint8 and flip.any() and not flip.all()


def test_batches_are_seeded_and_stateless(synthetic):
    x, y = data.load_cifar10(synthetic[0])[:2]
    a = data.Batches(x, y, 32, seed=1, augment=True)
    b = data.Batches(x, y, 32, seed=1, augment=True)
    later = [a.batch(s) for s in (5, 0, 3)]  # call order must not matter
    for s, (xb, yb) in zip((5, 0, 3), later):
        xb2, yb2 = b.batch(s)
        np.testing.assert_array_equal(xb, xb2)
        np.testing.assert_array_equal(yb, yb2)
    epoch = np.concatenate([a.indices(s) for s in range(a.steps_per_epoch)])
    assert len(np.unique(epoch)) == len(epoch) == a.steps_per_epoch * 32
    assert not np.array_equal(data.Batches(x, y, 32, seed=2).indices(0), a.indices(0))


def test_batch_size_larger_than_set_is_refused(synthetic):
    x, y = data.load_cifar10(synthetic[0])[:2]
    with pytest.raises(UsageError, match="batch-size 1000 must be between 1 and the 100"):
        data.Batches(x, y, 1000)


# --------------------------------------------------------------------------- the real copy


@pytest.mark.slow
def test_real_copy_matches_official_md5s_and_counts(real_data_dir):
    folder = data.find_dataset(real_data_dir)
    assert folder.name == data.BIN_DIR
    assert [f for f, fault in data.verify_dataset(folder) if fault] == []
    x_train, y_train, x_test, y_test = data.load_cifar10(real_data_dir)
    assert x_train.shape == (50000, 32, 32, 3) and x_test.shape == (10000, 32, 32, 3)
    assert (data.class_counts(y_train) == 5000).all() and (data.class_counts(y_test) == 1000).all()
    mean, _ = data.channel_stats(x_train)
    np.testing.assert_allclose(mean, [125.3, 122.95, 113.87], atol=0.05)  # published CIFAR-10 means


def test_the_data_streams_coincide_only_where_documented():
    """Every random stream of the data layer is named in one place (data.memory); the two
    coincidences its comment documents are the only ones among them."""
    from cifarlab.data import memory

    seed, first = 7, {}
    for e in range(4):
        first[f"order {e}"] = memory.order_stream(seed, e).integers(2**62)
        first[f"augment {e}"] = memory.augment_stream(seed, e).integers(2**62)
    first["first flips"] = memory.first_flips_stream(seed).integers(2**62)
    first["split"] = memory.split_stream(seed).integers(2**62)
    groups = {frozenset(k for k, v in first.items() if v == value) for value in first.values()}
    assert {g for g in groups if len(g) > 1} == {
        frozenset({"order 1", "augment 0"}),
        frozenset({"order 2", "split"}),
    }
