"""Devices, precision and torchrun: selection without a GPU, bf16 autocast with fp32
checkpoints, and two CPU processes (gloo) that train exactly as one process would.

The torchrun tests start real jobs of 2 tiny processes (OMP_NUM_THREADS=1, synthetic data),
each bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from cifarlab.cli import main
from cifarlab.data import Preprocess, load_cifar10
from cifarlab.errors import UsageError
from cifarlab.training import checkpoints, devices
from cifarlab.training.distributed import Dist
from cifarlab.training.recipes import RECIPES
from cifarlab.training.runs import RunDir
from cifarlab.training.torch_learner import TorchLearner

TINY = ["--dnn-hidden-units", "32", "--batch-size", "20", "--max-steps", "6", "--eval-freq", "3",
        "--optimizer", "momentum", "--learning-rate", "0.05", "--preprocess", "standard"]  # fmt: skip
JOB_TIMEOUT = 120


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CIFARLAB_DIST_TIMEOUT": "60",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def _train(root: Path, out: Path, *flags: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """`cifarlab train mlp` on the synthetic data: in this process (nproc 1), or as a torchrun job."""
    if "--precision" not in flags:  # never the machine's auto: fp32 unless a test asks otherwise
        flags = (*flags, "--precision", "fp32")
    args = [
        "train",
        "mlp",
        *TINY,
        *flags,
        "--data-dir",
        str(root),
        "--no-verify",
        "--no-progress",
        "--out",
        str(out),
    ]
    if nproc == 1:
        return subprocess.CompletedProcess(args, main(args), "", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cifarlab", *args]  # fmt: skip
    return subprocess.run(
        cmd, capture_output=True, text=True, env=_env(), timeout=JOB_TIMEOUT, cwd=out.parent
    )


def _weights(run: Path) -> dict[str, np.ndarray]:
    return load_file(run / "checkpoint" / checkpoints.MODEL_FILE)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


# --------------------------------------------------------------------------- device and precision


def test_dist_from_env():
    assert Dist.from_env({}) == Dist()
    master = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    d = Dist.from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", **master})
    assert (d.rank, d.world_size, d.active, d.is_main) == (2, 4, True, False)
    for bad in ({"WORLD_SIZE": "2", "RANK": "2", **master}, {"WORLD_SIZE": "x"}, {"WORLD_SIZE": "0"},
                {"WORLD_SIZE": "2", "RANK": "0"}):  # fmt: skip
        with pytest.raises(UsageError):
            Dist.from_env(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_device_auto_is_cpu_and_missing_devices_are_refused():
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(UsageError, match="no CUDA device"):
            devices.resolve_device(name)
    with pytest.raises(UsageError, match="--device"):
        devices.resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "tpu", "mps"])
def test_cli_device_not_here_is_one_line_exit_2(synthetic, tmp_path, capsys, device):
    if device == "mps" and devices._mps_available():
        pytest.skip("this machine has MPS")
    out = tmp_path / "run"
    code = main(
        ["train", "mlp", *TINY, "--data-dir", str(synthetic[0]), "--device", device, "--out", str(out)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and device in err
    assert not out.exists()  # nothing written


def test_auto_precision_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.resolve_precision("auto", cpu) == "fp32"
    assert devices.resolve_precision("fp16", cpu) == "fp16"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_trains_and_checkpoints_fp32(synthetic, tmp_path, precision):
    out = tmp_path / "run"
    code = main(["train", "mlp", *TINY, "--norm", "batch", "--precision", precision,
                 "--data-dir", str(synthetic[0]), "--no-progress", "--out", str(out)])  # fmt: skip
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["distributed"]["precision"] == precision and cfg["distributed"]["world_size"] == 1
    weights = _weights(out)
    assert {w.dtype for w in weights.values() if w.dtype.kind == "f"} == {np.dtype(np.float32)}
    assert np.isfinite(json.loads((out / "summary.json").read_text())["test_loss"])


def test_autocast_really_runs_in_bf16(synthetic):
    """The training step computes its matrix products in bf16 (not a silent fp32 fallback)."""
    d = load_cifar10(synthetic[0])
    cfg = RECIPES["mlp"].make_config(None, dnn_hidden_units=[8], batch_size=10, precision="bf16")
    learner = TorchLearner.create("mlp", cfg, Preprocess.fit("standard", d[0]), "cpu")
    seen = []
    learner.model.hidden[0].linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    from cifarlab.data import Batches

    learner.step(learner.put(d[0], d[1]), Batches(d[0], d[1], 10).plan(0), 0.01)
    assert seen == [torch.bfloat16]
    assert learner.model.hidden[0].linear.weight.dtype == torch.float32  # weights stay fp32


def test_resume_in_another_precision_is_refused(synthetic, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)  # auto = fp32 at the start
    common = ["--data-dir", str(synthetic[0]), "--no-progress"]
    assert main(["train", "mlp", *TINY, "--max-steps", "3", *common, "--out", str(out)]) == 0
    capsys.readouterr()
    assert (
        main(["train", "mlp", "--precision", "bf16", "--max-steps", "6", *common, "--resume", str(out)]) == 2
    )
    assert "--precision cannot change" in capsys.readouterr().err
    # the same flags, but auto now resolves to bf16 (a CPU with native bf16): refused too
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    before = (out / "config.json").read_bytes()
    assert main(["train", "mlp", "--max-steps", "6", *common, "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fp32" in err and "bf16" in err
    assert (out / "config.json").read_bytes() == before


# --------------------------------------------------------------------------- torchrun (gloo, 2 CPU processes)


def test_torchrun_two_processes_equal_one(synthetic, tmp_path):
    """Same global batch: the weights after 6 steps match within 1e-5 and only rank 0 wrote."""
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _train(synthetic[0], one)
    r2 = _train(synthetic[0], two, nproc=2)
    assert r1.returncode == 0
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert _max_diff(_weights(one), _weights(two)) < 1e-5
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["distributed"]["world_size"] == 2 and cfg["distributed"]["backend"] == "gloo"
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert s2["test_loss"] == pytest.approx(s1["test_loss"], rel=1e-5)
    assert s2["test_accuracy"] == s1["test_accuracy"]
    # rank 0 alone writes: one run directory, one result line, no default runs/ folder
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "root") == ["one", "two"]
    assert r2.stdout.count("test accuracy") == 1
    m = RunDir(two).evaluations()
    assert [r["step"] for r in m] == [3, 6]
    assert s2["confusion"] == s1["confusion"] and s2["per_class_accuracy"] == s1["per_class_accuracy"]

    # sharded evaluation: what one process computes on the same weights (the counts exactly;
    # the mean loss to rounding, since the shards' sums add up in another order: on a 16-core
    # Intel Xeon the two differed in the 8th digit)
    ckpt = checkpoints.load(two)
    d = load_cifar10(synthetic[0])
    cfg_obj = RECIPES["mlp"].make_config(None, **cfg["train"])
    learner = TorchLearner.create("mlp", cfg_obj, ckpt.preprocess, "cpu")
    learner.model.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.weights.items()})
    ev = learner.evaluate(learner.put(d[2], d[3]))
    assert ev["acc"] == m[-1]["test_acc"] and ev["loss"] == pytest.approx(m[-1]["test_loss"], rel=1e-6)
    assert ev["confusion"].tolist() == s2["confusion"]


def test_torchrun_sync_bn_equals_one_process(synthetic, tmp_path):
    one, two, unsynced = tmp_path / "one", tmp_path / "two", tmp_path / "unsynced"
    r1 = _train(synthetic[0], one, "--norm", "batch", "--sync-bn")
    r2 = _train(synthetic[0], two, "--norm", "batch", "--sync-bn", nproc=2)
    r3 = _train(synthetic[0], unsynced, "--norm", "batch", nproc=2)
    for r in (r1, r2, r3):
        assert r.returncode == 0, r.stderr[-2000:]
    assert _max_diff(_weights(one), _weights(two)) < 1e-4
    assert (
        _max_diff(_weights(one), _weights(unsynced)) > 1e-4
    )  # per-rank statistics differ: the test can fail
    assert json.loads((two / "config.json").read_text())["distributed"]["sync_bn"] is True


# bf16 keeps 8 significant bits: each product it rounds is off by up to u = 2^-8 of its size.
# Two ranks round other partial sums than one process (each rank's half-batch gradient is rounded
# to bf16, then the halves are summed in fp32), so each step's update may differ by ~u of its
# size, and the differences add up over the steps. Bound: steps * u * the largest weight change.
BF16_U = 2.0**-8


def test_torchrun_bf16_equals_one_process_within_bf16_rounding(synthetic, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ("--norm", "batch", "--sync-bn", "--precision", "bf16")
    r1 = _train(synthetic[0], one, *flags)
    r2 = _train(synthetic[0], two, *flags, nproc=2)
    assert r1.returncode == 0 and r2.returncode == 0, r2.stderr[-2000:]
    cfg = RECIPES["mlp"].make_config(None, **json.loads((one / "config.json").read_text())["train"])
    start = TorchLearner.create(
        "mlp", cfg, Preprocess.fit("standard", load_cifar10(synthetic[0])[0])
    ).weights()
    w1, w2 = _weights(one), _weights(two)
    moved = max(float(np.abs(w1[k] - v).max()) for k, v in start.items() if v.dtype.kind == "f")
    steps = cfg.max_steps
    diff = _max_diff(w1, w2)
    assert diff <= steps * BF16_U * moved, (diff, moved)
    assert json.loads((two / "config.json").read_text())["distributed"]["precision"] == "bf16"


def test_torchrun_refuses_a_batch_the_ranks_cannot_split(synthetic, tmp_path):
    r = _train(synthetic[0], tmp_path / "run", "--batch-size", "15", nproc=2)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("cifarlab: ")]
    # Both ranks refuse, but torchrun's agent may stop the second one before it prints: at least one line, all ours.
    assert 1 <= len(ours) <= 2 and all("divisible by the 2 processes" in line for line in ours)
    assert "src/cifarlab" not in r.stderr and "site-packages/cifarlab" not in r.stderr  # no traceback of ours
    assert not (tmp_path / "run").exists()


def _worker_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of the launcher's worker processes."""
    out = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env = dict(
                kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv
            )
            if "RANK" in env:
                out[int(env["RANK"])] = int(pid)
    return out


def _start_job(root: Path, out: Path, steps: int) -> subprocess.Popen:
    args = [*TINY, "--batch-size", "10", "--max-steps", str(steps), "--eval-freq", "5"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "cifarlab",
           "train", "mlp", *args, "--data-dir", str(root), "--no-verify", "--no-progress", "--out", str(out)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _wait_for_metrics(job: subprocess.Popen, run: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert job.poll() is None, job.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)


def _interrupted_job(root: Path, run: Path, interrupt) -> tuple[int, str, float]:
    """Start a long job, call ``interrupt(job)`` once it has evaluated, and wait for it to end:
    (exit status, stderr, seconds from the interruption to the end)."""
    job = _start_job(root, run, 10**6)
    try:
        _wait_for_metrics(job, run)
        interrupt(job)
        t0 = time.monotonic()
        _, err = job.communicate(timeout=90)
    finally:
        job.kill()
    return job.returncode, err, time.monotonic() - t0


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the ranks")
def test_a_dead_rank_ends_the_job_with_a_clear_error(synthetic, tmp_path):
    run = tmp_path / "run"
    code, err, seconds = _interrupted_job(
        synthetic[0], run, lambda job: os.kill(_worker_pids(job.pid)[1], signal.SIGKILL)
    )
    assert seconds < 90 and code != 0
    assert "rank 1" in err.lower() or "local_rank: 1" in err  # torchrun names the rank that died
    assert (run / "checkpoint" / checkpoints.MODEL_FILE).is_file()  # the last evaluation's checkpoint is kept


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the ranks")
def test_sigterm_checkpoints_once_and_resume_under_torchrun(synthetic, tmp_path):
    run = tmp_path / "run"
    code, err, _ = _interrupted_job(
        synthetic[0], run, lambda job: job.send_signal(signal.SIGTERM)
    )  # a scheduler's
    assert code != 0
    assert err.count("stopped at step") == 2  # every rank stopped at the same step, cleanly
    state = json.loads(checkpoints.load_state(run / "checkpoint")[1]["state"])
    assert state["step"] > 0 and not (run / "summary.json").exists()
    assert not RunDir(run).lock_path.exists()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "cifarlab",
           "train", "mlp", "--max-steps", str(state["step"] + 5), "--data-dir", str(synthetic[0]), "--no-verify",
           "--no-progress", "--resume", str(run)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=JOB_TIMEOUT)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == state["step"] + 5 and summary["resumed"] is True
