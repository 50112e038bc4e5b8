"""The `fast` recipe: its network (whitening, Dirac init, frozen BN scales, test-time augmentation),
the trainer features it uses (per-parameter learning-rate factors, alternating flips, crop
padding) and time_to_accuracy in the summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cifarlab.cli import main
from cifarlab.data import Batches, Preprocess, crop_flip_indices
from cifarlab.models import create_model
from cifarlab.models.fast import BIAS_LR_SCALE, ConvGroup, FastNet
from cifarlab.schedules import lookahead_decay
from cifarlab.training.config import TrainConfig
from cifarlab.training.loop import process_age, time_to_accuracy
from cifarlab.training.recipes import FastConfig
from cifarlab.training.torch_learner import TorchLearner, make_optimizer


def test_whitening_decorrelates_the_patches():
    """After init_from_data, the first 12 channels of the whitening conv have (nearly) identity
    covariance over the images it was fitted on, and the other 12 are their negatives."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 3, 32, 32, generator=g)
    x = base + 0.8 * torch.roll(base, 1, dims=-1) + 0.5 * base[:, :1]  # correlated in space and colour
    model = FastNet(widths=(8, 8, 8))
    model.init_from_data(x)
    w = model.whiten.weight
    torch.testing.assert_close(w[12:], -w[:12])
    out = torch.nn.functional.conv2d(x, w[:12]).permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = torch.cov(out.T)
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=0.02, rtol=0)
    assert not model.whiten.weight.requires_grad


def test_dirac_init_passes_the_input_through():
    group = ConvGroup(4, 8, bn_momentum=0.4)
    x = torch.randn(2, 4, 6, 6)
    out = torch.nn.functional.conv2d(x, group.conv1.weight, padding=1)
    torch.testing.assert_close(out[:, :4], x)  # the first cin outputs are the input


def test_batchnorm_scales_are_frozen_and_biases_get_the_64x_rate():
    model = create_model("fast", widths=(8, 16, 16))
    bn_weights = [p for n, p in model.named_parameters() if ".norm" in n and n.endswith("weight")]
    assert bn_weights and not any(p.requires_grad for p in bn_weights)
    cfg = TrainConfig(optimizer="momentum", learning_rate=0.5, weight_decay=1e-3)
    opt = make_optimizer(cfg, model)
    scaled = [g for g in opt.param_groups if g["lr_scale"] == BIAS_LR_SCALE]
    biases = {id(p) for n, p in model.named_parameters() if ".norm" in n and n.endswith("bias")}
    assert len(scaled) == 1 and {id(p) for p in scaled[0]["params"]} == biases
    assert scaled[0]["weight_decay"] == 0.0
    assert not any(p is model.whiten.weight for g in opt.param_groups for p in g["params"])  # frozen
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_tta_averages_the_views():
    torch.manual_seed(0)
    model = FastNet(widths=(8, 8, 8), tta=2)
    model.init_from_data(torch.randn(50, 3, 32, 32))
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        views = [x, padded[..., :-2, :-2], padded[..., 2:, 2:]]
        each = [(model.logits(v) + model.logits(v.flip(-1))) / 2 for v in views]
        want = each[0] / 2 + (each[1] + each[2]) / 4
        torch.testing.assert_close(model(x), want)
        model.tta = 1  # mirror only: the prediction cannot tell an image from its mirror image
        torch.testing.assert_close(model(x), model(x.flip(-1)))
        model.tta = 0
        torch.testing.assert_close(model(x), model.logits(x))
    model.train()
    model.tta = 2
    assert model(x).shape == (3, 10)  # training: one view


def test_alternating_flip_flips_every_image_the_other_way_each_epoch():
    n, bs = 40, 8
    x = np.zeros((n, 32, 32, 3), np.uint8)
    x[..., 0] = np.arange(32)[None, None, :]  # the column index, to see flips
    b = Batches(x, np.zeros(n, np.int64), bs, seed=3, augment=True, crop_pad=0, flip="alternate")
    per_epoch = []
    for epoch in range(3):
        flipped = {}
        for step in range(epoch * b.steps_per_epoch, (epoch + 1) * b.steps_per_epoch):
            plan = b.plan(step)
            for i, cols in zip(plan.idx, plan.cols):
                flipped[int(i)] = bool(cols[0] == 31)
        per_epoch.append(flipped)
    assert set(per_epoch[0]) == set(range(n))
    assert 0 < sum(per_epoch[0].values()) < n  # the first epoch is random
    for i in range(n):
        assert per_epoch[1][i] != per_epoch[0][i] and per_epoch[2][i] == per_epoch[0][i]


def test_first_flips_have_a_stream_of_their_own():
    """Not the validation split's or epoch 2's stream ([seed, 2]), nor another seed's."""
    n = 1000
    x, y = np.zeros((n, 32, 32, 3), np.uint8), np.zeros(n, np.int64)
    flips = Batches(x, y, 10, seed=5, augment=True, flip="alternate").first_flips
    assert not np.array_equal(flips, np.random.default_rng([5, 2]).random(n) < 0.5)
    assert not np.array_equal(flips, Batches(x, y, 10, seed=6, augment=True, flip="alternate").first_flips)
    assert Batches(x, y, 10, seed=5, augment=True).first_flips is None  # random flips need none


@pytest.mark.parametrize("pad", [0, 2, 4])
def test_crop_pad_bounds_the_shift(pad):
    rows, cols = crop_flip_indices(500, np.random.default_rng(0), pad=pad, flip=np.zeros(500, bool))
    shifts = rows[:, 0].astype(int) - 0  # reflected: row index of the first output row
    assert rows.min() >= 0 and rows.max() <= 31 and cols.min() >= 0 and cols.max() <= 31
    assert np.abs(shifts).max() == pad  # reflect makes -k and k both read row k


def test_time_to_accuracy_takes_the_first_evaluation_past_each_mark():
    tests = [
        {"test_acc": 0.85, "seconds": 10.0},
        {"test_acc": 0.931, "seconds": 20.0},
        {"test_acc": 0.92, "seconds": 30.0},
    ]
    assert time_to_accuracy(tests, 5.0) == {"0.90": 25.0, "0.93": 25.0, "0.94": None}


def test_process_age_is_this_process_lifetime():
    age = process_age()
    assert 0 < age < 24 * 3600


def test_cli_trains_fast_end_to_end(synthetic, tmp_path):
    out = tmp_path / "run"
    args = ["train", "fast", "--data-dir", str(synthetic[0]), "--out", str(out), "--no-progress"]
    args += [
        "--widths",
        "8,16,16",
        "--batch-size",
        "20",
        "--max-steps",
        "10",
        "--eval-freq",
        "5",
        "--learning-rate",
        "0.1",
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["time_to_accuracy"]) == {"0.90", "0.93", "0.94"}
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "fast" and config["model_kwargs"] == {"widths": [8, 16, 16], "tta": 2}
    assert config["train"]["flip"] == "alternate" and config["train"]["crop_pad"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "test_acc" in r] == [5, 10]
    assert main(["eval", str(out), "--data-dir", str(synthetic[0])]) == 0  # the checkpoint rebuilds the net


def test_only_the_last_evaluations_see_the_whole_test_set(synthetic, tmp_path):
    """--full-evals 1: the evaluations before the last are a quick one-view check of
    --quick-eval-images test images (recorded as such); the final one sees them all, and its
    accuracy is the summary's, the same as a run evaluating fully each time."""
    from cifarlab.training.recipes import FastConfig

    cfg = FastConfig(max_steps=10, eval_freq=3, full_evals=2, quick_eval_images=7)
    assert [cfg.quick_check_images(s) for s in (3, 6, 9, 10)] == [7, 7, 0, 0]  # 4 evaluations, last 2 full
    assert [FastConfig(max_steps=9, eval_freq=3, full_evals=1).quick_check_images(s) for s in (3, 6, 9)] == [
        2000, 2000, 0,
    ]  # fmt: skip
    assert FastConfig(max_steps=10, eval_freq=3).quick_check_images(3) == 0  # field default: all full
    common = ["train", "fast", "--data-dir", str(synthetic[0]), "--no-progress", "--widths", "8,8,8",
              "--batch-size", "20", "--max-steps", "6", "--eval-freq", "2", "--precision", "fp32"]  # fmt: skip
    assert (
        main([*common, "--out", str(tmp_path / "quick"), "--quick-eval-images", "7"]) == 0
    )  # default: 1 full
    assert main([*common, "--out", str(tmp_path / "full"), "--full-evals", "0"]) == 0
    quick, full = (
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("quick", "full")
    )
    assert [r.get("test_images") for r in quick if "test_acc" in r] == [7, 7, None]
    assert all("test_images" not in r for r in full)
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("quick", "full")]
    assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]
    assert summaries[0]["test_loss"] == summaries[1]["test_loss"]


def _prep() -> Preprocess:
    return Preprocess.fit("standard", np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3))


def test_lookahead_decay_schedule():
    cfg = TrainConfig(lookahead=5, max_steps=12)
    assert [lookahead_decay(cfg, s) for s in (1, 4, 6, 11)] == [None] * 4
    assert lookahead_decay(cfg, 5) == pytest.approx(0.95**5 * (5 / 12) ** 3)
    assert lookahead_decay(cfg, 10) == pytest.approx(0.95**5 * (10 / 12) ** 3)
    assert lookahead_decay(cfg, 12) == 1.0  # the run ends on the slow weights
    assert lookahead_decay(TrainConfig(lookahead=5, max_steps=10), 10) == pytest.approx(0.95**5)
    assert lookahead_decay(TrainConfig(lookahead=0, max_steps=10), 10) is None


def test_lookahead_moves_the_weights_to_the_slow_average():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    learner = TorchLearner(model, TrainConfig(lookahead=2), _prep())
    w0 = model[0].weight.detach().clone()
    learner.lookahead(0.5)  # the first call starts the slow weights here: nothing moves
    torch.testing.assert_close(model[0].weight, w0)
    with torch.no_grad():
        model[0].weight += 1.0
        model[1].running_mean += 4.0
    learner.lookahead(0.75)  # slow = 0.75 slow + 0.25 fast, and the fast weights jump there
    torch.testing.assert_close(model[0].weight, w0 + 0.25)
    torch.testing.assert_close(model[1].running_mean, torch.ones(2))  # buffers too
    with torch.no_grad():
        model[0].weight += 10.0
    learner.lookahead(1.0)  # back to the slow weights
    torch.testing.assert_close(model[0].weight, w0 + 0.25)


def test_decay_biases_divides_the_decay_by_the_rate_factor():
    model = create_model("fast", widths=(8, 16, 16))
    cfg = TrainConfig(optimizer="momentum", learning_rate=0.5, weight_decay=1e-3, decay_biases=True)
    opt = make_optimizer(cfg, model)
    assert all(g["weight_decay"] == pytest.approx(1e-3 / g["lr_scale"]) for g in opt.param_groups)
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0, BIAS_LR_SCALE}


def test_interim_evaluations_use_the_cheaper_tta_level(monkeypatch):
    model = FastNet(widths=(8, 8, 8), tta=2)
    calls = []
    real = model.logits
    monkeypatch.setattr(model, "logits", lambda x: calls.append(len(x)) or real(x))
    prep = _prep()
    learner = TorchLearner(model, FastConfig(eval_batch_size=10, interim_tta=0), prep)
    data = learner.put(np.zeros((10, 32, 32, 3), np.uint8), np.zeros(10, np.int64))
    learner.evaluate(data, final=False)
    assert calls == [10] and model.tta == 2  # one view, and the level is restored
    learner.evaluate(data)
    assert calls[1:] == [10] * 6  # the final evaluation: all six views


def test_whitening_bias_freezes_after_its_epochs_and_gets_no_gradient(synthetic):
    """--whiten-bias-epochs 1: the bias learns in epoch 1, and from epoch 2 on no gradient
    reaches the whitening layer (autograd builds no backward pass for it)."""
    from cifarlab.data import Batches, Preprocess, load_cifar10
    from cifarlab.training.recipes import RECIPES
    from cifarlab.training.torch_learner import TorchLearner

    d = load_cifar10(synthetic[0])
    cfg = RECIPES["fast"].make_config(
        None, widths=[8, 8, 8], batch_size=50, whiten_bias_epochs=1, precision="fp32", channels_last=False
    )
    learner = TorchLearner.create("fast", cfg, Preprocess.fit(cfg.preprocess, d[0]), "cpu", x_train=d[0])
    batches, data = Batches(d[0], d[1], 50, seed=0), learner.put(d[0], d[1])
    whiten = learner.model.whiten
    learner.step(data, batches.plan(0), 0.1, batches.epoch_of(0))
    assert whiten.bias.grad is not None and whiten.bias.grad.abs().sum() > 0  # epoch 1: it learns
    before = whiten.bias.detach().clone()
    learner.step(data, batches.plan(2), 0.1, batches.epoch_of(2))  # epoch 2
    assert whiten.bias.grad is None and whiten.weight.grad is None
    torch.testing.assert_close(whiten.bias.detach(), before, rtol=0, atol=0)
    x = learner.inputs(data.x[:4])
    assert not whiten(x).requires_grad  # no backward node: the pass is really skipped
