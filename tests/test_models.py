"""Tests for cifarlab.models: registry, MLP and the pre-activation ConvNet."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from cifarlab import registry as registry_mod
from cifarlab.models import (
    MLP,
    ConvNet,
    PreActBlock,
    create_model,
    list_models,
    register_model,
)

# The layer table of the brief: name -> (kind, kernel, stride, padding, c_in, c_out, spatial out).
TABLE = [
    ("conv0", "conv", 3, 1, 1, 3, 64, 32),
    ("preact1", "preact", 3, 1, 1, 64, 64, 32),
    ("conv1", "conv", 1, 1, 0, 64, 128, 32),
    ("maxpool1", "pool", 3, 2, 1, 128, 128, 16),
    ("preact2_a", "preact", 3, 1, 1, 128, 128, 16),
    ("preact2_b", "preact", 3, 1, 1, 128, 128, 16),
    ("conv2", "conv", 1, 1, 0, 128, 256, 16),
    ("maxpool2", "pool", 3, 2, 1, 256, 256, 8),
    ("preact3_a", "preact", 3, 1, 1, 256, 256, 8),
    ("preact3_b", "preact", 3, 1, 1, 256, 256, 8),
    ("conv3", "conv", 1, 1, 0, 256, 512, 8),
    ("maxpool3", "pool", 3, 2, 1, 512, 512, 4),
    ("preact4_a", "preact", 3, 1, 1, 512, 512, 4),
    ("preact4_b", "preact", 3, 1, 1, 512, 512, 4),
    ("maxpool4", "pool", 3, 2, 1, 512, 512, 2),
    ("preact5_a", "preact", 3, 1, 1, 512, 512, 2),
    ("preact5_b", "preact", 3, 1, 1, 512, 512, 2),
    ("maxpool5", "pool", 3, 2, 1, 512, 512, 1),
]
N_CLASSES = 10


@pytest.fixture(scope="module")
def net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet()


def count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


# ----------------------------------------------------------------------------- ConvNet


def test_layer_counts(net):
    # conv0 + 9 pre-activation convs + conv1..conv3
    assert count(net, nn.Conv2d) == 1 + 9 + 3 == 13
    # one BN per pre-activation block + the head BN
    assert count(net, nn.BatchNorm2d) == 9 + 1 == 10
    assert count(net, nn.MaxPool2d) == 5
    assert count(net, PreActBlock) == 9
    assert count(net, nn.Linear) == 1


def test_children_follow_table_order(net):
    names = [name for name, _ in net.named_children()]
    assert names == [row[0] for row in TABLE] + ["bn", "relu", "flatten", "linear"]


@pytest.mark.parametrize("row", TABLE, ids=[row[0] for row in TABLE])
def test_layer_hyperparameters_match_table(net, row):
    name, kind, k, s, p, c_in, c_out, _ = row
    layer = getattr(net, name)
    if kind == "preact":
        assert isinstance(layer, PreActBlock)
        assert layer.bn.num_features == c_in
        conv = layer.conv
    elif kind == "conv":
        conv = layer
    else:
        assert isinstance(layer, nn.MaxPool2d)
        assert (layer.kernel_size, layer.stride, layer.padding) == (k, s, p)
        return
    assert isinstance(conv, nn.Conv2d)
    assert conv.kernel_size == (k, k)
    assert conv.stride == (s, s)
    assert conv.padding == (p, p)
    assert (conv.in_channels, conv.out_channels) == (c_in, c_out)
    assert conv.bias is not None


def test_head(net):
    assert isinstance(net.bn, nn.BatchNorm2d) and net.bn.num_features == 512
    assert isinstance(net.relu, nn.ReLU)
    assert isinstance(net.linear, nn.Linear)
    assert (net.linear.in_features, net.linear.out_features) == (512, N_CLASSES)


def test_stage_output_shapes(net):
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        getattr(net, row[0]).register_forward_hook(
            lambda _m, _i, out, name=row[0]: shapes.__setitem__(name, tuple(out.shape))
        )
        for row in TABLE
    ]
    try:
        with torch.no_grad():
            out = net.eval()(torch.randn(2, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    for name, *_, c_out, size in TABLE:
        assert shapes[name] == (2, c_out, size, size), name
    assert out.shape == (2, N_CLASSES)


def test_parameter_count_from_table(net):
    def conv(c_in, c_out, k):  # weight + bias
        return c_in * c_out * k * k + c_out

    def bn(c):  # weight + bias (running stats are buffers)
        return 2 * c

    def preact(c):
        return bn(c) + conv(c, c, 3)

    expected = (
        conv(3, 64, 3)
        + preact(64)
        + conv(64, 128, 1)
        + 2 * preact(128)
        + conv(128, 256, 1)
        + 2 * preact(256)
        + conv(256, 512, 1)
        + 2 * preact(512)  # PreAct4_a, PreAct4_b
        + 2 * preact(512)  # PreAct5_a, PreAct5_b
        + bn(512)
        + (512 * N_CLASSES + N_CLASSES)
    )
    assert sum(p.numel() for p in net.parameters()) == expected


@pytest.mark.parametrize("train", [True, False])
def test_preact_block_is_identity_with_zero_conv(train):
    torch.manual_seed(0)
    block = PreActBlock(8).train(train)
    with torch.no_grad():
        block.bn.weight.uniform_(0.5, 2.0)
        block.bn.bias.uniform_(-1.0, 1.0)
        block.conv.weight.zero_()
        block.conv.bias.zero_()
    x = torch.randn(4, 8, 5, 5)
    torch.testing.assert_close(block(x), x)


def test_preact_block_residual_and_input_untouched():
    torch.manual_seed(0)
    block = PreActBlock(4).eval()
    x = torch.randn(2, 4, 6, 6)
    x_before = x.clone()
    with torch.no_grad():
        out = block(x)
        expected = x + block.conv(torch.relu(block.bn(x)))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x, x_before)  # in-place ReLU must not touch the input


@pytest.mark.parametrize("train", [True, False])
def test_forward_shape_and_finite(net, train):
    net.train(train)
    try:
        with torch.no_grad():
            out = net(torch.randn(2, 3, 32, 32))
    finally:
        net.eval()
    assert out.shape == (2, N_CLASSES)
    assert torch.isfinite(out).all()


def test_num_classes_and_channels():
    model = ConvNet(n_channels=1, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 32, 32)).shape == (3, 7)


def test_channels_last_matches_contiguous_forward(net):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        ref = net(x)
        net_cl = net.to(memory_format=torch.channels_last)
        try:
            assert net_cl.conv0.weight.is_contiguous(memory_format=torch.channels_last)
            out = net_cl(x.contiguous(memory_format=torch.channels_last))
        finally:
            net.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_channels_last_matches_contiguous_gradients():
    # float64: train-mode BN over 2 samples at 1x1 makes float32 gradients too noisy to compare
    torch.manual_seed(2)
    ref_net = ConvNet().double().train()
    cl_net = ConvNet().double().train()
    cl_net.load_state_dict(ref_net.state_dict())
    cl_net.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([3, 7])
    nn.functional.cross_entropy(ref_net(x), y).backward()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    nn.functional.cross_entropy(cl_net(x_cl), y).backward()
    for (name, p_ref), p_cl in zip(ref_net.named_parameters(), cl_net.parameters()):
        torch.testing.assert_close(p_cl.grad, p_ref.grad, rtol=1e-6, atol=1e-8, msg=name)


# ----------------------------------------------------------------------------- MLP


def test_mlp_without_hidden_is_single_linear():
    model = MLP(3072, [], 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1
    assert (linears[0].in_features, linears[0].out_features) == (3072, 10)
    params = list(model.parameters())
    assert len(params) == 2 and sum(p.numel() for p in params) == 3072 * 10 + 10
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(model(x), linears[0](x.reshape(5, -1)))


def test_mlp_block_order_and_logits():
    model = MLP(12, [6, 5], 3, activation="relu", norm="batch", dropout=0.25)
    assert len(model.hidden) == 2
    block = model.hidden[0]
    kinds = [type(m) for m in block]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert block.linear.out_features == 6 and model.hidden[1].linear.in_features == 6
    assert (model.output.in_features, model.output.out_features) == (5, 3)
    # logits: the output is the last Linear, no softmax after it
    model.eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.output(model.hidden(x)))


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
@pytest.mark.parametrize("activation", ["elu", "relu", "tanh", "gelu"])
def test_mlp_norms_and_activations(norm, activation):
    torch.manual_seed(0)
    model = MLP(3 * 4 * 4, [16, 8], 10, activation=activation, norm=norm)
    x = torch.randn(6, 3, 4, 4)
    out = model.train()(x)
    assert out.shape == (6, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(x).shape == (6, 10)
    n_norms = sum(1 for block in model.hidden if "norm" in block._modules)
    assert n_norms == (0 if norm is None else 2)


def test_mlp_layer_norm_prefers_manual_implementation():
    model = MLP(8, [4], 2, norm="layer")
    norm = model.hidden[0].norm
    try:
        from cifarlab.ops.layernorm import LayerNormManual
    except ImportError:
        assert isinstance(norm, nn.LayerNorm)
    else:
        assert isinstance(norm, LayerNormManual)


def test_mlp_dropout_only_in_train_mode():
    torch.manual_seed(0)
    model = MLP(32, [256], 10, dropout=0.5)
    x = torch.randn(8, 32)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), model(x))
        eval_out = model(x)
        model.train()
        a, b = model(x), model(x)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, eval_out)


def test_mlp_rejects_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        MLP(4, [2], 2, activation="swishy")
    with pytest.raises(ValueError, match="norm"):
        MLP(4, [2], 2, norm="group")
    with pytest.raises(ValueError, match="dropout"):
        MLP(4, [2], 2, dropout=1.0)
    with pytest.raises(RuntimeError):
        MLP(4, [2], 2)(torch.randn(3, 5))


# ----------------------------------------------------------------------------- registry


def test_builtin_models_registered():
    assert {"mlp", "convnet"} <= set(list_models())
    assert list_models() == sorted(list_models())


def test_every_registered_model_can_be_trained():
    """Each name create_model knows has a recipe (`cifarlab train NAME`), and the other way round."""
    from cifarlab.training.recipes import RECIPES

    assert set(list_models()) == set(RECIPES)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("num_classes", [10, 7])
def test_create_model_every_registered_name(name, num_classes):
    model = create_model(name, num_classes=num_classes)
    if registry_mod.get_model_entry(name).framework == "numpy":
        assert model.logits(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, num_classes)
        return
    assert isinstance(model, nn.Module)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes)


def test_create_model_passes_kwargs():
    model = create_model("mlp", n_hidden=[], num_classes=4)
    assert isinstance(model, MLP) and model.n_hidden == [] and model.num_classes == 4
    model = create_model("mlp", n_hidden=[7, 5], activation="tanh", norm="batch")
    assert model.n_hidden == [7, 5] and isinstance(model.hidden[0].act, nn.Tanh)
    assert isinstance(create_model("convnet"), ConvNet)


def test_unknown_model_raises_with_known_names():
    with pytest.raises(ValueError, match="unknown model") as info:
        create_model("resnet9000")
    for name in list_models():
        assert name in str(info.value)


@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_pretrained_without_weights_raises(name):
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model(name, pretrained=True)


def test_register_model_generic(monkeypatch):
    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))
    calls = []

    @register_model("toy_pretrained", has_pretrained=True)
    def toy(num_classes=10, pretrained=False, width=3):
        calls.append((num_classes, pretrained, width))
        return nn.Linear(width, num_classes)

    assert "toy_pretrained" in list_models()
    model = create_model("toy_pretrained", pretrained=True, num_classes=5, width=2)
    assert isinstance(model, nn.Linear) and model.out_features == 5
    create_model("toy_pretrained")
    assert calls == [(5, True, 2), (10, False, 3)]

    with pytest.raises(ValueError, match="already registered"):
        register_model("toy_pretrained")(toy)

    @register_model
    def bare_name(num_classes=10):
        return "not a module"

    with pytest.raises(TypeError):
        create_model("bare_name")


def test_import_does_not_pull_trainer_or_data():
    code = (
        "import sys, cifarlab.models\n"
        "bad = sorted(m for m in sys.modules if m.startswith('cifarlab.') and "
        "m.split('.')[1] in {'train', 'trainer', 'training', 'data', 'datasets', 'cli'})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mlp_norm_after_activation_is_the_seeds_order():
    from cifarlab.models import MLP

    default = MLP(12, [5], 3, norm="batch")
    seed = MLP(12, [5], 3, norm="batch", norm_after_activation=True)
    assert list(default.hidden[0]._modules) == ["linear", "norm", "act"]
    assert list(seed.hidden[0]._modules) == ["linear", "act", "norm"]


def test_the_optional_model_hooks_are_found_by_their_protocol():
    """models.hooks is the one list of what a model may offer the trainer: a plain module
    offers nothing, `fast` offers both hooks."""
    from cifarlab.models import hooks

    plain = torch.nn.Linear(3, 2)
    assert hooks.lr_scales(plain) == {} and hooks.init_from_data(plain, torch.zeros(1, 3, 32, 32)) is False
    fast = create_model("fast", widths=[8, 8, 8])
    scales = hooks.lr_scales(fast)
    assert scales and set(scales.values()) == {64.0} and all(n.endswith("bias") for n in scales)
    before = fast.whiten.weight.clone()
    assert hooks.init_from_data(fast, torch.randn(64, 3, 32, 32)) is True
    assert not torch.equal(before, fast.whiten.weight)
