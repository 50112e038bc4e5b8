"""Bad inputs: each is one line on stderr, exit status 2, no traceback, nothing already written
changed and no half-made run directory. docs/robustness.md lists them with their messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

from cifarlab import data
from cifarlab.cli import main
from cifarlab.errors import CheckpointError, DataError
from cifarlab.study import inference
from cifarlab.training import checkpoints

TINY = ["--no-progress", "--max-steps", "4", "--eval-freq", "2", "--batch-size", "20"]


def fails(argv: list[str], capsys, match: str) -> str:
    """Run the CLI; assert the one-line error contract; returns the message."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("cifarlab: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and match in err, err
    assert "cifarlab: error: cifarlab" not in err  # the prefix is not repeated
    if os.environ.get("CIFARLAB_ROBUSTNESS_LOG"):  # scripts/robustness_table.py builds the docs table
        with open(os.environ["CIFARLAB_ROBUSTNESS_LOG"], "a") as log:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
            log.write(json.dumps({"test": test, "argv": argv, "err": err.strip()}) + "\n")
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny_run(synthetic, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "mlp", "--data-dir", str(synthetic[0]), "--out", str(out), *TINY]) == 0
    return out


# ----------------------------------------------------------------------------- numeric flags


@pytest.mark.parametrize(
    "model, flags, match",
    [
        ("mlp", ["--threads", "-1"], "--threads must be in [0, 1024]"),
        ("mlp", ["--threads", "1000"], "--threads 1000 is over 4x"),
        ("mlp", ["--dropout", "1"], "--dropout must be in [0, 1)"),
        ("mlp", ["--dropout", "-0.1"], "--dropout must be in [0, 1)"),
        ("mlp", ["--seed", "-1"], "--seed must be in [0, 4294967295]"),
        ("mlp", ["--seed", str(2**32)], "--seed must be in"),
        ("mlp", ["--momentum", "1.5"], "--momentum must be in [0, 1)"),
        ("mlp", ["--weight-decay", "-0.1"], "--weight-decay must be in [0, inf)"),
        ("mlp", ["--weight-decay", "nan"], "--weight-decay must be a finite number"),
        ("mlp", ["--learning-rate", "inf"], "--learning-rate must be a finite number"),
        ("mlp", ["--learning-rate", "0"], "--learning-rate must be in (0, inf)"),
        ("mlp", ["--learning-rate", "nan"], "--learning-rate must be a finite number"),
        ("mlp", ["--max-steps", "0"], "--max-steps must be in [1, 1000000000]"),
        ("mlp", ["--max-steps", "ten"], "invalid int value: 'ten'"),
        ("mlp", ["--batch-size", "0"], "--batch-size must be in [1, 50000]"),
        ("mlp", ["--eval-freq", "0"], "--eval-freq must be in [1, inf)"),
        ("mlp", ["--eval-batch-size", "0"], "--eval-batch-size must be in [1, 50000]"),
        ("mlp", ["--max-steps", "10", "--warmup-steps", "50"], "--warmup-steps must be at most --max-steps"),
        ("mlp", ["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
        ("mlp", ["--grad-clip", "-1"], "--grad-clip must be in [0, inf)"),
        ("mlp", ["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
        ("mlp", ["--dnn-hidden-units", "0"], "layer sizes must be positive"),
        ("mlp", ["--dnn-hidden-units", "10,x"], "expected comma-separated integers"),
        ("mlp", ["--dnn-hidden-units", "100000,100000"], "(38.4 GiB), over the 4 GiB limit"),
        ("mlp-numpy", ["--dnn-hidden-units", "40000,40000"], "over the 4 GiB limit"),
        ("mlp-numpy", ["--label-smoothing", "0.1"], "unrecognized arguments: --label-smoothing"),
        ("mlp-numpy", ["--activation", "gelu"], "invalid choice: 'gelu'"),
        ("efficientnet_lite0", ["--image-size", "8"], "--image-size must be in [32, 512]"),
        ("efficientnet_lite0", ["--image-size", "100000"], "--image-size must be in [32, 512]"),
        ("convnet", ["--preset", "fastest"], "invalid choice: 'fastest'"),
        ("mlp", ["--device", "gpu"], "--device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("mlp", ["--device", "cuda:x"], "--device: must be auto, cpu, cuda, cuda:N or mps"),
        ("mlp", ["--precision", "fp8"], "invalid choice: 'fp8'"),
        ("mlp", ["--val-split", "-1"], "--val-split must be in [0, 25000]"),
        (
            "vgg13",
            ["--weights", "/nonexistent/vgg13-19584684.pth"],
            "--weights /nonexistent/vgg13-19584684.pth: no such file",
        ),
        ("mlp-numpy", ["--device", "cpu"], "unrecognized arguments: --device"),
        ("mlp-numpy", ["--precision", "bf16"], "--precision bf16: the NumPy MLP has no autocast"),
        ("fast", ["--tta", "3"], "--tta must be in [0, 2]"),
        ("fast", ["--widths", "64,0,256"], "layer sizes must be positive"),
        ("fast", ["--widths", "64,5000,256"], "--widths must be in [1, 4096]"),
        ("fast", ["--widths", "64,x"], "expected comma-separated integers"),
        ("mlp", ["--crop-pad", "17"], "--crop-pad must be in [0, 16]"),
        ("mlp", ["--flip", "sideways"], "invalid choice: 'sideways'"),
        ("efficientnet_lite0", ["--freeze-stages", "8"], "--freeze-stages must be in [0, 7]"),
        ("efficientnet_lite1", ["--image-size", "8"], "--image-size must be in [32, 512]"),
        ("fast", ["--lookahead", "-1"], "--lookahead must be in [0, 1000000]"),
        ("fast", ["--lr-start", "1.5"], "--lr-start must be in [0, 1]"),
        (
            "mlp",
            ["--lr-end", "0.1", "--schedule", "cosine"],
            "--lr-end and --lr-peak shape --schedule onecycle",
        ),
        ("fast", ["--tta", "1", "--interim-tta", "2"], "--interim-tta 2 must not exceed --tta 1"),
        ("fast", ["--widths", "8,8,8,8"], "--widths takes the channels of the 3 conv groups, got 4"),
        ("mlp", ["--schedule", "onecycle", "--warmup-steps", "5"], "onecycle has its own warm-up"),
        ("mlp-numpy", ["--lookahead", "5"], "unrecognized arguments: --lookahead"),
    ],
)
def test_bad_flag_is_refused_before_anything_is_written(
    model, flags, match, synthetic, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the default run folder would be ./runs
    out = tmp_path / "out"
    fails(["train", model, "--data-dir", str(synthetic[0]), "--out", str(out), *TINY, *flags], capsys, match)
    assert not out.exists() and not (tmp_path / "runs").exists()
    fails(["train", model, "--data-dir", str(synthetic[0]), *TINY, *flags], capsys, match)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- paths and data


def test_out_under_a_file_or_a_file(synthetic, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep")
    fails(
        ["train", "mlp", "--data-dir", str(synthetic[0]), "--out", str(f / "run"), *TINY],
        capsys,
        "which is a file",
    )
    fails(["train", "mlp", "--data-dir", str(synthetic[0]), "--out", str(f), *TINY], capsys, "is a file")
    assert f.read_text() == "keep"


def test_out_not_empty_keeps_its_files(synthetic, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    fails(["train", "mlp", "--data-dir", str(synthetic[0]), "--out", str(out), *TINY], capsys, "not empty")
    assert snapshot(out) == {"precious.txt": b"keep me"}


def test_data_env_pointing_to_a_file(tmp_path, capsys, monkeypatch):
    f = tmp_path / "cifar.tar.gz"
    f.write_bytes(b"x")
    monkeypatch.setenv("CIFARLAB_DATA", str(f))
    fails(["data", "verify"], capsys, "$CIFARLAB_DATA")  # its message names where the path came from
    fails(["train", "mlp", "--out", str(tmp_path / "r"), *TINY], capsys, "is a file")
    assert not (tmp_path / "r").exists()


def test_missing_data_leaves_no_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CIFARLAB_URL", "http://127.0.0.1:9/cifar-10-binary.tar.gz")  # nothing listens
    fails(
        ["train", "mlp", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"), *TINY],
        capsys,
        "fetch that file by hand",
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--url", "ftp://example.org/c.tar.gz"], "unsupported download URL"),
        (["--url", "not a url"], "unsupported download URL"),
        (["--url", "http://127.0.0.1:9/c.tar.gz", "--md5", "xyz"], "is not an md5"),
    ],
)
def test_bad_download_options(flags, match, tmp_path, capsys):
    fails(["data", "download", "--data-dir", str(tmp_path / "d"), "--no-progress", *flags], capsys, match)
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- checkpoints


def _write_checkpoint(path: Path, tiny_run: Path, meta=None, drop=(), reshape=None, prep_shape=None):
    """A copy of tiny_run's checkpoint with its metadata or arrays damaged."""
    from safetensors import safe_open

    with safe_open(str(tiny_run / "checkpoint" / "model.safetensors"), "np") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
        md = f.metadata()
    if reshape:
        arrays[reshape] = np.zeros((3, 3), np.float32)
    if prep_shape:
        arrays["__preprocess__.shift"] = np.zeros(prep_shape, np.float32)
    if meta is not None:
        md = meta if meta != "none" else None
    save_file(arrays, str(path), metadata=md)
    return path


def _meta(tiny_run: Path, **changes) -> dict[str, str]:
    m = checkpoints.load(tiny_run)
    base = {"format_version": 1, "model": m.model, "model_kwargs": m.model_kwargs, "preprocess": "seed"}
    return {"cifarlab": json.dumps({**base, **changes})}


@pytest.mark.parametrize(
    "damage, match",
    [
        ({"meta": "none"}, "not a cifarlab checkpoint (no 'cifarlab' metadata)"),
        ({"meta": {"cifarlab": "{not json"}}, "metadata is not JSON"),
        ({"meta": {"cifarlab": "[1, 2]"}}, "metadata is not a JSON object"),
        ({"meta": "model=resnet9"}, "unknown model 'resnet9'"),
        ({"meta": "model_kwargs=bogus"}, "checkpoint does not match its model mlp"),
        ({"meta": "model_kwargs=classes20"}, "checkpoint does not match its model mlp"),
        ({"meta": "model_kwargs=inputs12"}, "checkpoint does not match its model mlp"),
        ({"meta": "model_kwargs=hiddenstr"}, "checkpoint does not match its model mlp"),
        ({"meta": "format_version=99"}, "checkpoint format 99"),
        ({"meta": "preprocess=zca"}, "unknown preprocessing 'zca'"),
        ({"reshape": "output.weight"}, "checkpoint does not match its model mlp"),
        ({"drop": ("output.bias",)}, "checkpoint does not match its model mlp"),
        ({"drop": ("__preprocess__.scale",)}, "__preprocess__.scale is missing"),
        ({"prep_shape": (5, 5)}, "preprocessing array __preprocess__.shift is float32(5, 5)"),
    ],
)
def test_damaged_or_foreign_checkpoint(damage, match, tiny_run, synthetic, tmp_path, capsys):
    meta = damage.get("meta")
    if isinstance(meta, str) and "=" in meta:
        key, value = meta.split("=")
        value = {
            "bogus": {"n_hidden": [100], "wings": 2},
            "classes20": {"n_hidden": [100], "num_classes": 20},
            "inputs12": {"n_hidden": [100], "n_inputs": 12},
            "hiddenstr": {"n_hidden": "100"},
        }.get(value, int(value) if value.isdigit() else value)
        meta = _meta(tiny_run, **{key: value})
    kw = {k: v for k, v in damage.items() if k != "meta"}
    f = _write_checkpoint(tmp_path / "bad.safetensors", tiny_run, meta=meta, **kw)
    fails(["eval", str(f), "--data-dir", str(synthetic[0]), "--out", str(tmp_path / "e")], capsys, match)
    assert not (tmp_path / "e").exists()
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    fails(["predict", str(f), str(img)], capsys, match)


def test_not_a_safetensors_file(tmp_path, capsys):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x00" * 7)
    fails(["predict", str(f), str(f)], capsys, "cannot read image")  # images are checked first
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    fails(["predict", str(f), str(img)], capsys, "not a readable safetensors file")


def test_eval_loads_exactly_the_file_named(tiny_run, synthetic, tmp_path, capsys):
    ckpt = tiny_run / "checkpoint"
    other = ckpt / "other.safetensors"
    other.write_bytes(b"garbage")  # a good model.safetensors sits beside it: it must not be used
    fails(["eval", str(other), "--data-dir", str(synthetic[0])], capsys, "other.safetensors")
    fails(["eval", str(tmp_path / "nope"), "--data-dir", str(synthetic[0])], capsys, "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(["eval", str(empty), "--data-dir", str(synthetic[0])], capsys, "no checkpoint in")


def test_evaluating_a_numpy_run_never_imports_torch(synthetic, tmp_path):
    out = tmp_path / "np"
    assert main(["train", "mlp-numpy", "--data-dir", str(synthetic[0]), "--out", str(out), *TINY]) == 0
    code = (
        "import sys; from cifarlab.cli import main\n"
        f"rc = main(['eval', {str(out)!r}, '--data-dir', {str(synthetic[0])!r}, '--no-verify'])\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout


# ----------------------------------------------------------------------------- resume


def test_resume_refusals_change_nothing(tiny_run, synthetic, tmp_path, capsys):
    d = ["--data-dir", str(synthetic[0]), "--no-progress"]
    before = snapshot(tiny_run)
    fails(["train", "mlp", "--resume", str(tiny_run), *d], capsys, "finished run (4 steps)")
    fails(["train", "convnet", "--resume", str(tiny_run), *d], capsys, "is a run of 'mlp', not convnet")
    fails(
        ["train", "mlp", "--resume", str(tiny_run), "--learning-rate", "0.5", *d],
        capsys,
        "--learning-rate cannot change",
    )
    fails(
        ["train", "mlp", "--resume", str(tiny_run), "--preset", "best", *d], capsys, "--preset cannot change"
    )
    fails(
        ["train", "mlp", "--resume", str(tiny_run), "--out", str(tmp_path / "x"), *d],
        capsys,
        "either --out or --resume",
    )
    fails(["train", "mlp", "--resume", str(tmp_path / "none"), *d], capsys, "not a run directory")
    fails(
        ["train", "mlp", "--resume", str(tiny_run), "--max-steps", "0", *d], capsys, "--max-steps must be in"
    )
    assert snapshot(tiny_run) == before


def test_resume_of_a_damaged_config(tiny_run, synthetic, capsys):
    d = ["--data-dir", str(synthetic[0]), "--no-progress", "--max-steps", "8"]
    cfg = tiny_run / "config.json"
    cfg.write_text(cfg.read_text()[:-40])
    fails(["train", "mlp", "--resume", str(tiny_run), *d], capsys, "damaged, not valid JSON")
    cfg.write_text(json.dumps({"model": "mlp", "train": {"learning_rate": "fast"}}))
    fails(["train", "mlp", "--resume", str(tiny_run), *d], capsys, "--learning-rate must be of type float")
    cfg.write_text(json.dumps({"model": "mlp", "train": {"wings": 2}}))
    fails(["train", "mlp", "--resume", str(tiny_run), *d], capsys, "unknown settings ['wings']")


def test_resume_without_checkpoint(tiny_run, synthetic, capsys):
    import shutil

    (tiny_run / "summary.json").unlink()
    shutil.rmtree(tiny_run / "checkpoint")
    fails(
        ["train", "mlp", "--resume", str(tiny_run), "--data-dir", str(synthetic[0])],
        capsys,
        "no checkpoint to resume",
    )


def test_resume_with_max_steps_extends_a_finished_run(tiny_run, synthetic, capsys):
    argv = ["train", "mlp", "--resume", str(tiny_run), "--data-dir", str(synthetic[0]), "--no-progress"]
    assert main([*argv, "--max-steps", "6", "--eval-batch-size", "7"]) == 0  # bookkeeping may change too
    summary = json.loads((tiny_run / "summary.json").read_text())
    config = json.loads((tiny_run / "config.json").read_text())
    assert summary["steps"] == 6 and config["train"]["max_steps"] == 6
    assert config["resumed_with"] == [{"at_step": 4, "max_steps": 6, "eval_batch_size": 7}]
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # log_freq 0: every step of so short a run
    assert [m["step"] for m in metrics if "test_acc" in m] == [2, 4, 6]


# ----------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tiny_run, synthetic, capsys):
    (tiny_run / "summary.json").unlink()  # an interrupted run
    argv = ["train", "mlp", "--resume", str(tiny_run), "--data-dir", str(synthetic[0]), "--no-progress"]
    lock = tiny_run / ".lock"
    holder_code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tiny_run)
        fails(argv, capsys, f"is being written by process {holder.pid}")
        assert snapshot(tiny_run) == before
    finally:
        holder.kill()
        holder.wait()
    lock.write_text("999999999")  # a lock file left by a process that died: not held, so taken over
    assert main(argv) == 0
    assert not lock.exists()  # released on exit


# ----------------------------------------------------------------------------- sweeps


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--configs", "0"], "rows must be distinct numbers in 1..7"),
        (["--configs", "8"], "rows must be distinct numbers in 1..7"),
        (["--configs", "1,1"], "rows must be distinct numbers in 1..7"),
        (["--configs", "one"], "expected comma-separated row numbers"),
        (["--jobs", "0"], "--jobs must be in 1..64"),
        (["--seeds", "0"], "--seeds must be in 1..100"),
        (["--max-steps", "-3"], "--max-steps must be positive"),
        (["--extra", "--seed '1"], "No closing quotation"),
    ],
)
def test_bad_sweep_flags(flags, match, synthetic, tmp_path, capsys):
    root = tmp_path / "sweep"
    fails(
        ["sweep", "table1", "--data-dir", str(synthetic[0]), "--out-root", str(root), *flags], capsys, match
    )
    assert not root.exists()


def test_sweep_never_reuses_or_overwrites_a_run_with_other_settings(synthetic, tmp_path, capsys):
    root, res = tmp_path / "sweep", tmp_path / "tables"
    base = [
        "sweep",
        "table1",
        "--data-dir",
        str(synthetic[0]),
        "--no-verify",
        "--configs",
        "1",
        "--seeds",
        "1",
    ]
    base += ["--out-root", str(root), "--out", str(res), "--extra=--batch-size 20 --eval-freq 2"]
    assert main([*base, "--max-steps", "2"]) == 0
    capsys.readouterr()
    run = root / "config1-seed42"
    before = snapshot(run)
    fails([*base, "--max-steps", "4"], capsys, "holds a run with other settings (max_steps differ)")
    assert snapshot(run) == before
    assert main([*base, "--max-steps", "2"]) == 0  # the same settings: reused as is
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- images


def test_bad_images(tiny_run, tmp_path, capsys, monkeypatch):
    fails(["predict", str(tiny_run), str(tmp_path / "missing.png")], capsys, "no such image file")
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    fails(["predict", str(tiny_run), str(txt)], capsys, "not a readable image")
    good = tmp_path / "ok.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    fails(["predict", str(tiny_run), str(cut)], capsys, "cut.png: cannot read image")
    monkeypatch.setattr(inference, "MAX_IMAGE_PIXELS", 1000)  # as if 64x64 were a decompression bomb
    fails(["predict", str(tiny_run), str(good)], capsys, "over the 1,000-pixel limit")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own guard, for other formats
    fails(["predict", str(tiny_run), str(good)], capsys, "decompression bomb")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_eval_and_predict_on_a_missing_device(tiny_run, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(img)
    before = snapshot(tiny_run)
    fails(["eval", str(tiny_run), "--device", "cuda"], capsys, "--device cuda: no CUDA device is available")
    fails(["predict", str(tiny_run), str(img), "--device", "cuda:0"], capsys, "no CUDA device")
    fails(["predict", str(tiny_run), str(img), "--device", "tpu"], capsys, "--device: must be auto")
    assert snapshot(tiny_run) == before


def test_predict_json_prints_only_json(tiny_run, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(img)
    assert main(["predict", str(tiny_run), str(img), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {str(img)}


# ----------------------------------------------------------------------------- help and config.json


@pytest.mark.parametrize("kind, names", [("train", ["mlp-numpy", "convnet"]), ("sweep", ["table1", "norms"])])
def test_help_lists_what_is_available(kind, names, capsys):
    assert main([kind, "--help"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in names)


def test_config_records_the_machine(tiny_run):
    m = json.loads((tiny_run / "config.json").read_text())["machine"]
    assert m["cores"] == os.cpu_count() and m["threads"] >= 1 and m["cpu"]
    if Path("/proc/cpuinfo").is_file():
        assert set(m["isa"]) == {"avx2", "avx512", "avx512_bf16", "amx"}


def test_data_module_never_unpickles_without_md5(synthetic_py, monkeypatch):
    """Guard for the table: the md5 gate comes before any unpickling."""
    root, _ = synthetic_py
    f = root / data.PY_DIR / "data_batch_1"
    f.write_bytes(f.read_bytes() + b"x")
    with pytest.raises(DataError, match="md5 mismatch"):
        data.load_cifar10(root)


# ----------------------------------------------------------------------------- resume, continued


def _state_file_with(run: Path, **changes) -> None:
    """Rewrite the run's trainer state with ``changes`` (a damaged or hand-edited checkpoint)."""
    from safetensors import safe_open

    f = run / "checkpoint" / "state.safetensors"
    with safe_open(str(f), "np") as st:
        arrays, md = {k: st.get_tensor(k) for k in st.keys()}, st.metadata()
    md["state"] = json.dumps({**json.loads(md["state"]), **changes})
    save_file(arrays, str(f), metadata=md)


def test_resume_checks_everything_before_changing_the_run(tiny_run, synthetic, capsys):
    (tiny_run / "summary.json").unlink()
    argv = ["train", "mlp", "--resume", str(tiny_run), "--data-dir", str(synthetic[0]), "--no-progress"]
    before = snapshot(tiny_run)
    fails([*argv, "--max-steps", "3"], capsys, "--max-steps 3 is below the step the run reached (4)")
    for bad in ({"step": -3}, {"step": "x"}, {"step": 2.5}, {"loss_sum": None}):
        _state_file_with(tiny_run, **bad)
        fails([*argv, "--max-steps", "8"], capsys, "damaged trainer state")
    state = tiny_run / "checkpoint" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    fails([*argv, "--max-steps", "8"], capsys, "not a readable safetensors file")
    after = snapshot(tiny_run)
    assert {k: v for k, v in after.items() if "state" not in k} == {
        k: v for k, v in before.items() if "state" not in k
    }


def test_resume_refuses_a_damaged_metrics_log_and_a_bad_hidden_size(tiny_run, synthetic, capsys):
    (tiny_run / "summary.json").unlink()
    argv = ["train", "mlp", "--resume", str(tiny_run), "--data-dir", str(synthetic[0]), "--max-steps", "6"]
    metrics = tiny_run / "metrics.jsonl"
    good = metrics.read_text()
    lines = good.splitlines(keepends=True)
    metrics.write_text(lines[0] + "x" + "".join(lines[1:])[1:])  # a record the checkpoint goes with, damaged
    before = snapshot(tiny_run)
    fails(argv, capsys, "metrics.jsonl:2: damaged (not a metrics record)")
    assert snapshot(tiny_run) == before
    metrics.write_text(good)
    cfg = tiny_run / "config.json"
    saved = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**saved, "train": {**saved["train"], "dnn_hidden_units": [-5]}}))
    fails(argv, capsys, "--dnn-hidden-units must be in [1, 1000000], got -5")


def test_an_interrupted_extension_resumes(tiny_run, synthetic, capsys):
    argv = ["train", "mlp", "--resume", str(tiny_run), "--data-dir", str(synthetic[0]), "--no-progress"]
    import shutil

    copy = tiny_run.parent / "copy"
    shutil.copytree(tiny_run, copy)
    assert main([*argv, "--max-steps", "6"]) == 0  # the reference: extended in one go
    # the same extension, interrupted after its first step: no summary (unfinished), and a plain
    # --resume then finishes it to the same numbers
    _state_file_with(copy, step=4)
    (copy / "summary.json").unlink()
    cfg = json.loads((copy / "config.json").read_text())
    cfg["train"]["max_steps"] = 6
    (copy / "config.json").write_text(json.dumps(cfg))
    assert (
        main(["train", "mlp", "--resume", str(copy), "--data-dir", str(synthetic[0]), "--no-progress"]) == 0
    )
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tiny_run, copy))
    assert a["test_accuracy"] == b["test_accuracy"] and a["steps"] == b["steps"] == 6


def test_numpy_divergence_is_one_line(synthetic, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "mlp-numpy", "--data-dir", str(synthetic[0]), "--learning-rate", "1e30", "--no-progress"]
    err = fails([*argv, "--max-steps", "4", "--eval-freq", "4", "--batch-size", "20"], capsys, "loss became")
    assert "nothing was kept" in err and "--grad-clip" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_eval_of_a_checkpoint_file_reports_into_the_run(tiny_run, synthetic, capsys):
    assert (
        main(["eval", str(tiny_run / "checkpoint" / "model.safetensors"), "--data-dir", str(synthetic[0])])
        == 0
    )
    assert (tiny_run / "eval.json").is_file() and not (tiny_run / "checkpoint" / "eval.json").exists()
    assert oct((tiny_run / "eval.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_works_before_and_after_the_command(synthetic, capsys, where):
    fails(["train", "mlp", "--max-steps", "0"], capsys, "--max-steps must be in")  # one line without it
    argv = ["train", "mlp", "--max-steps", "0"]
    with pytest.raises(Exception, match="--max-steps must be in"):  # the exception itself with it
        main(["--debug", *argv] if where == "before" else [*argv, "--debug"])


def test_debug_is_listed_in_every_help(capsys):
    for argv in (["--help"], ["train", "mlp", "--help"], ["eval", "--help"], ["reproduce", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "--debug" in capsys.readouterr().out, argv


def test_sweep_extra_is_checked_for_every_job(synthetic, tmp_path, capsys):
    root, res = tmp_path / "sweep", tmp_path / "tables"
    base = ["sweep", "seeds", "mlp-numpy", "--seeds", "2", "--data-dir", str(synthetic[0])]
    base += ["--out-root", str(root), "--out", str(res), "--no-progress"]
    fails([*base, "--extra=--bogus"], capsys, "unrecognized arguments: --bogus")
    fails([*base, "--extra=--max-steps 0"], capsys, "--max-steps must be in")
    fails(
        [*base, "--extra=--seed=7"], capsys, "--extra must not change --seed: the sweep sets it for each run"
    )
    assert not root.exists() and not res.exists()


@pytest.mark.parametrize("kind", ["train", "sweep"])
def test_bare_train_or_sweep_lists_choices_and_fails_in_one_line(kind, capsys):
    err = fails([kind], capsys, f"name what to {kind}: one of")
    assert "cifarlab: error: cifarlab" not in err


# ----------------------------------------------------------------------------- resume: check, then change


def _resume(run: Path, synthetic, *extra: str) -> list[str]:
    return ["train", "mlp", "--data-dir", str(synthetic[0]), "--resume", str(run), "--max-steps", "8",
            "--no-progress", *extra]  # fmt: skip


def test_records_appended_after_the_checkpoint_are_dropped_on_resume(tiny_run, synthetic):
    """Garbage or a half line after the last checkpoint's records (a crash, a full disk) does not
    make the run unresumable: the checkpoint knows how much of metrics.jsonl goes with it."""
    with open(tiny_run / "metrics.jsonl", "ab") as f:
        f.write(b'{}\n{"step": 3, "train_lo')
    assert main(_resume(tiny_run, synthetic)) == 0
    steps = [json.loads(line)["step"] for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 8


def test_a_tensorboard_file_is_refused_before_the_run_changes(tiny_run, synthetic, capsys):
    pytest.importorskip("tensorboard")
    (tiny_run / "tensorboard").write_text("not a folder")
    before = snapshot(tiny_run)
    fails(_resume(tiny_run, synthetic, "--tensorboard"), capsys, "is not a folder")
    assert snapshot(tiny_run) == before


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_checkpoint_copied_from_another_run_is_refused(synthetic, tmp_path, capsys, optimizer):
    """Another run's checkpoint (another optimizer, or the same one) copied into a run: refused
    by the run id (and the optimizer), and the run is left byte-identical."""
    base = ["train", "mlp", "--data-dir", str(synthetic[0]), *TINY]
    mine, other = tmp_path / "mine", tmp_path / "other"
    assert main([*base, "--out", str(mine)]) == 0
    assert main([*base, "--optimizer", optimizer, "--out", str(other)]) == 0
    shutil.rmtree(mine / "checkpoint")
    shutil.copytree(other / "checkpoint", mine / "checkpoint")
    before = snapshot(mine)
    fails(_resume(mine, synthetic), capsys, "another run")
    assert snapshot(mine) == before


def test_a_full_disk_while_logging_is_one_line_naming_the_file(tiny_run, synthetic, capsys):
    """ENOSPC on metrics.jsonl (here: it points at /dev/full) is one line naming the file and
    saying that the last checkpoint is resumable."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    from cifarlab.training.runs import RunDir

    metrics = tiny_run / "metrics.jsonl"
    kept = metrics.read_bytes()
    metrics.unlink()
    metrics.symlink_to("/dev/full")
    with pytest.raises(CheckpointError, match="metrics.jsonl: could not append a record.*--resume"):
        RunDir(tiny_run).log({"step": 9})
    metrics.unlink()
    metrics.write_bytes(kept)
    assert main(_resume(tiny_run, synthetic)) == 0


# ----------------------------------------------------------------------------- loose ends, one line each


def test_reproduce_refuses_zero_jobs(tmp_path, capsys):
    fails(["reproduce", "--jobs", "0", "--out", str(tmp_path / "s")], capsys, "--jobs must be in 1..64")


@pytest.mark.parametrize("content", [b"", b"\x80\x02}q\x00.", b"garbage" * 10])
def test_vgg_weights_that_are_not_weights_are_one_line(synthetic, tmp_path, capsys, content):
    bad = tmp_path / "w.pth"
    bad.write_bytes(content)
    fails(["train", "vgg13", "--weights", str(bad), "--max-steps", "1", "--data-dir", str(synthetic[0]),
           "--out", str(tmp_path / "run")], capsys, str(bad))  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "1e20", "0"])
def test_dist_timeout_must_be_sane(monkeypatch, value):
    from cifarlab.errors import UsageError
    from cifarlab.training import distributed

    monkeypatch.setenv("CIFARLAB_DIST_TIMEOUT", value)
    with pytest.raises(UsageError, match="CIFARLAB_DIST_TIMEOUT"):
        distributed.timeout()


def test_a_stray_world_size_without_a_master_is_one_line():
    from cifarlab.errors import UsageError
    from cifarlab.training.distributed import Dist

    with pytest.raises(UsageError, match="MASTER_ADDR"):
        Dist.from_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert Dist.from_env({"WORLD_SIZE": "1", "RANK": "0"}).world_size == 1


def test_json_output_is_always_valid_json(tiny_run, capsys):
    from cifarlab.errors import json_safe

    assert json.dumps(json_safe({"a": float("nan"), "b": [float("inf"), 1.5]}), allow_nan=False) == (
        '{"a": null, "b": [null, 1.5]}'
    )
    summary = json.loads((tiny_run / "summary.json").read_text())
    (tiny_run / "summary.json").write_text(json.dumps({**summary, "test_loss": float("nan")}))
    assert main(["runs", str(tiny_run.parent), "--json"]) == 0

    def strict(name):
        raise ValueError(f"{name} is not JSON")

    json.loads(capsys.readouterr().out, parse_constant=strict)


def test_crop_pad_and_flip_need_augment(synthetic, capsys):
    fails(["train", "mlp", "--crop-pad", "2", "--data-dir", str(synthetic[0])], capsys, "add --augment")
    fails(["train", "mlp", "--flip", "alternate", "--data-dir", str(synthetic[0])], capsys, "add --augment")


def test_a_16_bit_image_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "half.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    x = inference.read_images([str(path)])
    assert x.shape == (1, 32, 32, 3) and int(x.max()) == 128 and int(x.min()) == 128


def test_a_sweep_restarts_a_run_killed_before_its_first_checkpoint(synthetic, tmp_path, capsys):
    """A run directory with a config but no checkpoint and no live writer (kill -9 right after
    it appeared): the next sweep moves it aside and runs the job again, instead of failing."""
    root, res = tmp_path / "sweep", tmp_path / "tables"
    base = ["sweep", "seeds", "mlp-numpy", "--seeds", "1", "--data-dir", str(synthetic[0]), "--no-progress",
            "--out-root", str(root), "--out", str(res), "--extra=--dnn-hidden-units 8 --batch-size 10 --max-steps 2"]  # fmt: skip
    assert main(base) == 0
    run = next(p for p in root.iterdir() if p.is_dir())
    shutil.rmtree(run / "checkpoint")
    (run / "summary.json").unlink()
    assert main(base) == 0
    assert (run / "summary.json").is_file()
    assert [p.name for p in root.iterdir() if ".unstarted-" in p.name]  # the half-made one, kept


def test_two_reproduce_on_one_folder_are_refused(tmp_path, capsys):
    from cifarlab.training.runs import RunDir

    out = tmp_path / "study"
    out.mkdir()
    other = RunDir(out)
    other.lock()  # as another live reproduce would
    try:
        fails(["reproduce", "--out", str(out)], capsys, "is being written by process")
    finally:
        other.unlock()


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_last(tiny_run, monkeypatch):
    """A full disk during the save (safetensors raises its own error type): one CheckpointError
    naming the folder, and the previous checkpoint is intact."""
    import safetensors.numpy

    ckpt = tiny_run / "checkpoint"
    before = snapshot(ckpt)
    loaded = checkpoints.load(ckpt)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    with pytest.raises(CheckpointError, match="could not write the checkpoint.*No space left.*intact"):
        checkpoints.save(ckpt, loaded.weights, {"model": loaded.model, "model_kwargs": loaded.model_kwargs},
                         loaded.preprocess)  # fmt: skip
    assert snapshot(ckpt) == before and not (tiny_run / "checkpoint.tmp").exists()


def test_control_characters_never_reach_the_terminal(tmp_path, capsys):
    evil = tmp_path / "runs" / "a\x1b[2Jb\nc"
    evil.mkdir(parents=True)
    (evil / "config.json").write_text("{")
    assert main(["runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "a?[2Jb?c" in out
