"""What a run logs: metrics records every --log-freq steps and at every evaluation, TensorBoard
event files, diverged.json, and the final evaluation's per-class accuracy and confusion matrix."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from cifarlab import data
from cifarlab.cli import main
from cifarlab.data import CLASSES, Preprocess, load_cifar10
from cifarlab.numpy_nn.train import NumpyLearner
from cifarlab.training.config import TrainConfig
from cifarlab.training.loop import TrainState, fit, restore
from cifarlab.training.recipes import RECIPES
from cifarlab.training.runs import RunDir

TRAIN_KEYS = {"step", "epoch", "train_loss", "train_acc", "lr", "seconds"}
TEST_KEYS = {"test_loss", "test_acc"}


def _train_numpy(synthetic, out, *flags: str) -> int:
    """`cifarlab train mlp-numpy` of a tiny MLP on the synthetic data (milliseconds a step)."""
    argv = ["train", "mlp-numpy", "--data-dir", str(synthetic[0]), "--out", str(out), "--no-progress",
            "--dnn-hidden-units", "8", "--batch-size", "20", *flags]  # fmt: skip
    return main(argv)


def _one_line_error(capsys, match: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("cifarlab: error: ") and err.count("\n") == 1 and match in err, err
    return err


def _without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "seconds"} for m in records]


# ----------------------------------------------------------------------------- metrics records


def test_records_every_log_freq_steps_and_at_every_evaluation(synthetic, tmp_path):
    out = tmp_path / "run"
    assert _train_numpy(synthetic, out, "--max-steps", "7", "--eval-freq", "3", "--log-freq", "2") == 0
    run = RunDir(out)
    records = run.read_metrics()
    assert [m["step"] for m in records] == [2, 3, 4, 6, 7]  # step 6 is both: one record
    assert [m["step"] for m in run.evaluations()] == [3, 6, 7]  # 7: the last step is evaluated
    for m in records:
        evaluated = m["step"] in (3, 6, 7)
        assert m.keys() == TRAIN_KEYS | (TEST_KEYS if evaluated else set()), m
    summary = run.read_summary()
    assert summary["test_accuracy"] == records[-1]["test_acc"]
    assert summary["best_test_accuracy"] == max(m["test_acc"] for m in run.evaluations())


def test_a_record_holds_the_means_since_the_previous_record(synthetic, tmp_path):
    """The same run logged every step and every 3 steps: log_freq changes no number, and each
    record of the second is the mean of the first's per-step records since its previous one."""
    every, third = tmp_path / "every", tmp_path / "third"
    flags = ["--max-steps", "8", "--eval-freq", "4"]
    assert _train_numpy(synthetic, every, *flags, "--log-freq", "1") == 0
    assert _train_numpy(synthetic, third, *flags, "--log-freq", "3") == 0
    per_step = {m["step"]: m for m in RunDir(every).read_metrics()}
    records = RunDir(third).read_metrics()
    assert [m["step"] for m in records] == [3, 4, 6, 8]
    previous = 0
    for m in records:
        since = [per_step[s] for s in range(previous + 1, m["step"] + 1)]
        for key in ("train_loss", "train_acc"):
            assert m[key] == pytest.approx(np.mean([r[key] for r in since]), rel=1e-12), (m["step"], key)
        previous = m["step"]
    for m in RunDir(third).evaluations():  # the same weights: the same test metrics
        same = per_step[m["step"]]
        assert (m["test_loss"], m["test_acc"], m["lr"]) == (same["test_loss"], same["test_acc"], same["lr"])


@pytest.mark.parametrize("max_steps, points", [(1, 1), (99, 99), (250, 125), (10_000, 100), (123_456, 100)])
def test_default_log_freq_gives_about_100_points(max_steps, points):
    steps = TrainConfig(max_steps=max_steps).log_steps()
    assert max_steps // steps == points
    assert TrainConfig(max_steps=max_steps, log_freq=7).log_steps() == 7


def test_default_log_freq_run_has_100_records(synthetic, tmp_path):
    out = tmp_path / "run"
    assert _train_numpy(synthetic, out, "--max-steps", "200", "--eval-freq", "100") == 0
    records = RunDir(out).read_metrics()
    assert len(records) == 100 and [m["step"] for m in records][:3] == [2, 4, 6]
    assert json.loads((out / "config.json").read_text())["train"]["log_freq"] == 0


def test_log_freq_is_checked_and_may_change_on_resume(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train_numpy(synthetic, out, "--max-steps", "4", "--log-freq", "-1") == 2
    _one_line_error(capsys, "--log-freq must be in [0, inf)")
    assert not out.exists()
    assert _train_numpy(synthetic, out, "--max-steps", "4", "--eval-freq", "2", "--log-freq", "2") == 0
    resume = ["train", "mlp-numpy", "--resume", str(out), "--data-dir", str(synthetic[0]), "--no-progress"]
    assert main([*resume, "--max-steps", "6", "--log-freq", "1"]) == 0
    assert [m["step"] for m in RunDir(out).read_metrics()] == [2, 4, 5, 6]
    config = json.loads((out / "config.json").read_text())
    assert config["resumed_with"] == [{"at_step": 4, "max_steps": 6, "log_freq": 1}]


def test_old_run_directories_with_only_evaluation_records_still_read(tmp_path):
    run = RunDir(tmp_path)
    old = [
        {"step": s, "epoch": s / 10, "train_loss": 2.0 / s, "train_acc": 0.1 * s, "test_loss": 2.1 / s,
         "test_acc": 0.1 * s, "seconds": s, "lr": 0.001}
        for s in (1, 2, 3)
    ]  # fmt: skip
    run.metrics_path.write_text("".join(json.dumps(m) + "\n" for m in old))
    assert run.evaluations() == old
    summary = run.finish({"test_accuracy": 0.3})
    assert summary["best_test_accuracy"] == pytest.approx(0.3) and run.curves_path.is_file()


# ----------------------------------------------------------------------------- resume


def _numpy_fit(synthetic, run: RunDir, cfg, resume: bool = False, progress_bar: bool = False, **kw):
    """``fit`` of the NumPy MLP in this process (to stop or crash it at a chosen step)."""
    d = load_cifar10(synthetic[0])
    prep = Preprocess.fit(cfg.preprocess, d[0])
    meta = {"model": "mlp-numpy", "model_kwargs": cfg.model_kwargs()}
    learner = NumpyLearner.create("mlp-numpy", cfg, prep)
    state = restore(learner, run, meta) if resume else None
    return fit(learner, cfg, run, d, meta, prep, state=state, progress=progress_bar, **kw)


def _cfg(**kw):
    base = dict(dnn_hidden_units=[16], max_steps=10, eval_freq=4, log_freq=3, batch_size=20, warmup_steps=2)
    return RECIPES["mlp-numpy"].make_config("best", **{**base, **kw})  # records at 3, 4, 6, 8, 9, 10


def _crash_at(step: int):
    def on_step(state: TrainState) -> None:
        if state.step == step:
            raise RuntimeError("the machine went away")

    return on_step


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _as_scalars(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard should hold for ``records`` (its values are float32)."""
    tags = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")
    return {
        tag: [(m["step"], float(np.float32(m[tag]))) for m in records if tag in m]
        for tag in tags
        if any(tag in m for m in records)
    }


def test_resume_after_a_crash_relogs_each_record_once(synthetic, tmp_path):
    """A crash at step 7 (no checkpoint since step 4, record 6 already logged): the resumed run's
    metrics.jsonl and TensorBoard scalars equal an uninterrupted run's, record 6 once."""
    pytest.importorskip("tensorboard")
    full, part = RunDir(tmp_path / "full"), RunDir(tmp_path / "part")
    full.path.mkdir()
    part.path.mkdir()
    _numpy_fit(synthetic, full, _cfg(), tensorboard=True)
    with pytest.raises(RuntimeError, match="went away"):
        _numpy_fit(synthetic, part, _cfg(), tensorboard=True, on_step=_crash_at(7))
    assert [m["step"] for m in part.read_metrics()] == [3, 4, 6]
    _numpy_fit(synthetic, part, _cfg(), resume=True, tensorboard=True)
    assert [m["step"] for m in full.read_metrics()] == [3, 4, 6, 8, 9, 10]
    assert _without_seconds(part.read_metrics()) == _without_seconds(full.read_metrics())
    assert len(list(part.tensorboard_dir.iterdir())) == 2  # one event file per session
    assert (
        _scalars(part.tensorboard_dir) == _scalars(full.tensorboard_dir) == _as_scalars(full.read_metrics())
    )


def test_resume_after_a_stop_at_the_last_step_summarises_the_same(synthetic, tmp_path):
    """Stopped right after the final evaluation: the resume trains no step, and its summary
    (per-class accuracy and confusion included) is the uninterrupted run's."""
    full, part = RunDir(tmp_path / "full"), RunDir(tmp_path / "part")
    full.path.mkdir()
    part.path.mkdir()
    _numpy_fit(synthetic, full, _cfg())

    def sigterm_at_the_end(state: TrainState) -> None:
        if state.step == 10:
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt, match="stopped at step 10"):
        _numpy_fit(synthetic, part, _cfg(), on_step=sigterm_at_the_end)
    _numpy_fit(synthetic, part, _cfg(), resume=True)
    keys = ("test_accuracy", "test_loss", "best_test_accuracy", "per_class_accuracy", "confusion")
    a, b = full.read_summary(), part.read_summary()
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


# ----------------------------------------------------------------------------- tensorboard


def test_tensorboard_holds_every_record_and_numpy_runs_stay_torch_free(synthetic, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    argv = ["train", "mlp-numpy", "--data-dir", str(synthetic[0]), "--no-verify", "--out", str(out), "--no-progress",
            "--dnn-hidden-units", "8", "--batch-size", "20", "--max-steps", "6", "--eval-freq", "3",
            "--log-freq", "2", "--tensorboard"]  # fmt: skip
    code = (
        "import sys; from cifarlab.cli import main\n"
        f"assert main({argv!r}) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    records = RunDir(out).read_metrics()
    assert [m["step"] for m in records] == [2, 3, 4, 6]
    scalars = _scalars(out / "tensorboard")
    assert scalars == _as_scalars(records)
    assert [s for s, _ in scalars["test_acc"]] == [3, 6] and [s for s, _ in scalars["train_loss"]] == [
        2,
        3,
        4,
        6,
    ]


def test_tensorboard_missing_is_one_line_before_anything_is_written(synthetic, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert _train_numpy(synthetic, out, "--max-steps", "2") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for name in ("tensorboard", "tensorboard.summary.writer.event_file_writer"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import` fail as if not installed
    new = tmp_path / "new"
    assert _train_numpy(synthetic, new, "--max-steps", "2", "--tensorboard") == 2
    _one_line_error(capsys, "pip install 'cifarlab[tensorboard]'")
    assert not new.exists()
    resume = ["train", "mlp-numpy", "--resume", str(out), "--data-dir", str(synthetic[0]), "--max-steps", "4"]
    assert main([*resume, "--tensorboard"]) == 2
    _one_line_error(capsys, "pip install 'cifarlab[tensorboard]'")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------- divergence


def test_divergence_writes_diverged_json(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--learning-rate", "1e30", "--max-steps", "6", "--eval-freq", "1"]  # a checkpoint at step 1
    assert _train_numpy(synthetic, out, *flags) == 2
    err = _one_line_error(capsys, "loss became")
    diverged = json.loads((out / "diverged.json").read_text())
    assert diverged.keys() == {"step", "message"} and err.strip() == f"cifarlab: error: {diverged['message']}"
    assert 1 < diverged["step"] <= 6 and "last good checkpoint is kept" in diverged["message"]
    assert not (out / "summary.json").exists()
    assert max(m["step"] for m in RunDir(out).read_metrics()) < diverged["step"]


def test_a_start_that_diverges_before_any_checkpoint_leaves_nothing(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--learning-rate", "1e30", "--max-steps", "6", "--eval-freq", "6", "--log-freq", "1"]
    assert _train_numpy(synthetic, out, *flags) == 2
    _one_line_error(capsys, "nothing was kept")
    assert not out.exists()  # records, diverged.json and config.json of the failed start included


# ----------------------------------------------------------------------------- summary


@pytest.mark.parametrize("model", ["mlp-numpy", "mlp"])
def test_summary_has_per_class_accuracy_and_confusion(model, synthetic, tmp_path):
    out = tmp_path / "run"
    argv = ["train", model, "--data-dir", str(synthetic[0]), "--out", str(out), "--no-progress",
            "--dnn-hidden-units", "8", "--batch-size", "20", "--max-steps", "4", "--eval-freq", "2"]  # fmt: skip
    assert main(argv) == 0
    summary = RunDir(out).read_summary()
    confusion = np.array(summary["confusion"])
    labels = synthetic[1][data.TEST_BATCH][1]
    assert (
        confusion.shape == (10, 10)
        and confusion.sum(1).tolist() == np.bincount(labels, minlength=10).tolist()
    )
    assert np.trace(confusion) / confusion.sum() == summary["test_accuracy"]
    assert list(summary["per_class_accuracy"]) == list(CLASSES)
    for i, name in enumerate(CLASSES):
        assert summary["per_class_accuracy"][name] == confusion[i, i] / confusion[i].sum()


# ----------------------------------------------------------------------------- progress bar


@pytest.mark.parametrize("tty, interval", [(False, 10), (True, 0.1)])
def test_progress_bar_prints_seldom_into_a_file(tty, interval, synthetic, tmp_path, monkeypatch):
    import tqdm

    seen = {}

    class Recorder(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    class Stderr(io.StringIO):
        def isatty(self) -> bool:
            return tty

    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    monkeypatch.setattr(sys, "stderr", Stderr())
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    _numpy_fit(synthetic, run, _cfg(max_steps=2), progress_bar=True)
    assert seen["mininterval"] == interval
