"""Every model ``cifarlab train`` knows: its config class, its presets, one line about it.

A preset is a dict of settings applied to the config class's defaults with
``dataclasses.replace``; the first preset of a recipe is its default. Add a model by adding
a row to ``RECIPES`` (and registering the model with ``create_model``'s registry).
Torch-free: ``cifarlab train mlp-numpy`` imports this table and never torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from cifarlab.errors import UsageError
from cifarlab.training.config import (
    ACTIVATIONS,
    LAYERNORMS,
    NORMS,
    NUMPY_ACTIVATIONS,
    TrainConfig,
    make_config,
    setting,
    to_flags,
)


def _mlp_parameters(widths: list[int], norm: str = "none") -> int:
    """Linear weights + biases between consecutive widths, + 2 per hidden unit for a norm."""
    linear = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    return linear + (2 * sum(widths[1:-1]) if norm != "none" else 0)


@dataclass
class MLPConfig(TrainConfig):
    """The PyTorch MLP of the seed's Part 2."""

    dnn_hidden_units: list[int] = setting([100], "hidden sizes, comma-separated ('' = none)", lo=1, hi=10**6)
    activation: str = setting("elu", "hidden activation", choices=ACTIVATIONS)
    norm: str = setting("none", "normalisation after each hidden Linear", choices=NORMS)
    layernorm: str = setting(
        "function", "--norm layer's implementation: the hand-written autograd.Function (C kernel where it "
        "builds), the autograd-derived module, or torch.nn.LayerNorm", choices=LAYERNORMS,
    )  # fmt: skip
    dropout: float = setting(0.0, "dropout after each hidden block", lo=0, hi=1, hi_open=True)
    norm_after_activation: bool = setting(
        False, "Linear -> activation -> norm (the seed's code) instead of norm first"
    )

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "n_inputs": 3 * 32 * 32,
            "n_hidden": list(self.dnn_hidden_units),
            "activation": self.activation,
            "norm": None if self.norm == "none" else self.norm,
            "dropout": self.dropout,
            "norm_after_activation": self.norm_after_activation,
            # only when not the default, so checkpoints from before the setting rebuild the same
            **({"layernorm": self.layernorm} if self.layernorm != "function" else {}),
        }

    def parameter_count(self) -> int:
        return _mlp_parameters([3072, *self.dnn_hidden_units, 10], self.norm)


@dataclass
class NumpyMLPConfig(TrainConfig):
    """The NumPy MLP of the seed's Part 1 (hand-written backward; never imports torch)."""

    dnn_hidden_units: list[int] = setting([100], "hidden sizes, comma-separated ('' = none)", lo=1, hi=10**6)
    activation: str = setting("elu", "hidden activation", choices=NUMPY_ACTIVATIONS)
    init: str = setting("seed", "weight init", choices=("seed", "he", "glorot"))
    dtype: str = setting("float32", "float type", choices=("float32", "float64"))

    torch_trainer = False

    @property
    def parameter_size(self) -> int:  # type: ignore[override]
        return 8 if self.dtype == "float64" else 4

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "n_inputs": 3 * 32 * 32,
            "n_hidden": list(self.dnn_hidden_units),
            "activation": self.activation,
            "init": self.init,
            "dtype": self.dtype,
        }

    def parameter_count(self) -> int:
        return _mlp_parameters([3072, *self.dnn_hidden_units, 10])


@dataclass
class TransferConfig(TrainConfig):
    """An ImageNet backbone with a new 10-way head (spec Part 4b)."""

    pretrained: bool = setting(True, "start from the ImageNet weights")
    image_size: int = setting(64, "upsample the 32x32 images to this size", lo=32, hi=512)
    freeze_backbone: bool = setting(False, "train only the new head")
    freeze_stages: int = setting(
        0, "freeze the stem and the first N of the 7 stages (their backward pass is skipped)", lo=0, hi=7
    )
    dropout: float = setting(0.2, "dropout before the head", lo=0, hi=1, hi_open=True)

    # bf16 trains EfficientNet-Lite0 at 0.63x fp32's speed on a CPU with native bf16 (its
    # depthwise convolutions): --precision auto keeps fp32 on CPUs (docs/benchmarks.md)
    cpu_bf16 = False

    def model_kwargs(self) -> dict[str, Any]:
        kwargs = {
            "pretrained": self.pretrained,
            "image_size": self.image_size,
            "dropout": self.dropout,
            "freeze_backbone": self.freeze_backbone,
        }
        if self.freeze_stages:  # only when used: older runs' model_kwargs stay as they were
            kwargs["freeze_stages"] = self.freeze_stages
        return kwargs


@dataclass
class FastConfig(TrainConfig):
    """The ``fast`` network (``cifarlab.models.fast``)."""

    widths: list[int] = setting([64, 256, 256], "channels of the three conv groups", lo=1, hi=4096)
    tta: int = setting(2, "test-time augmentation: 0 none, 1 + mirror, 2 + shifted by a pixel", lo=0, hi=2)
    interim_tta: int = setting(
        0, "--tta level of the evaluations before the last (6 views cost 6x; the last uses --tta)", lo=0, hi=2,
        bookkeeping=True,
    )  # fmt: skip
    full_evals: int = setting(
        0,
        "only the last N evaluations see the whole test set (the last with --tta); earlier ones are "
        "a quick one-view check of --quick-eval-images images (for the curves and time_to_accuracy); "
        "0: every evaluation is full",
        lo=0,
        bookkeeping=True,
    )
    quick_eval_images: int = setting(
        2000, "test images of a quick check (see --full-evals)", lo=1, hi=10**6, bookkeeping=True
    )  # fmt: skip
    whiten_bias_epochs: float = setting(
        0.0, "train the whitening layer's bias for this many epochs, then freeze it (its backward pass is "
        "skipped from then on); 0: it trains all run", lo=0, hi=10**6,
    )  # fmt: skip

    def validate(self) -> None:
        super().validate()
        if len(self.widths) != 3:
            raise UsageError(
                f"--widths takes the channels of the 3 conv groups, got {len(self.widths)} numbers"
            )
        if self.interim_tta > self.tta:
            raise UsageError(f"--interim-tta {self.interim_tta} must not exceed --tta {self.tta}")

    def model_kwargs(self) -> dict[str, Any]:
        return {"widths": list(self.widths), "tta": self.tta}

    def quick_check_images(self, step: int) -> int:
        """Evaluations come after steps eval_freq, 2 eval_freq, ... and max_steps; all but the
        last ``full_evals`` of them are quick (a function of the step: a resumed run agrees)."""
        if not self.full_evals:
            return 0
        count = -(-self.max_steps // self.eval_freq)  # evaluations in the run
        index = count if step >= self.max_steps else step // self.eval_freq
        return self.quick_eval_images if index <= count - self.full_evals else 0

    def before_step(self, model: Any, epoch: float) -> None:
        """After ``whiten_bias_epochs`` the whitening layer has nothing left to learn: with its
        bias frozen too (its filters always are), autograd no longer builds its backward pass."""
        if self.whiten_bias_epochs and epoch >= self.whiten_bias_epochs:
            model.whiten.bias.requires_grad_(False)

    def changes_trainable(self) -> bool:
        return self.whiten_bias_epochs > 0

    @contextmanager
    def evaluating(self, model: Any, final: bool) -> Iterator[None]:
        """Evaluations before the last use the cheaper ``interim_tta`` views."""
        kept, model.tta = model.tta, self.tta if final else self.interim_tta
        try:
            yield
        finally:
            model.tta = kept


@dataclass
class VGGConfig(TrainConfig):
    """torchvision's VGG13 from ImageNet with a new last layer (the seed's Part 4b)."""

    pretrained: bool = setting(True, "start from torchvision's ImageNet weights")
    weights: str = setting("", "the ImageNet .pth file (default: downloaded once into ~/.cache/cifarlab)")
    dropout: float = setting(0.5, "dropout in the classifier", lo=0, hi=1, hi_open=True)

    # not measured on a native-bf16 CPU (its benchmark needs torchvision): fp32 until it is
    cpu_bf16 = False

    def model_kwargs(self) -> dict[str, Any]:
        return {"pretrained": self.pretrained, "weights": self.weights or None, "dropout": self.dropout}


# ----------------------------------------------------------------------------- presets

MLP_NUMPY_BEST = {
    "dnn_hidden_units": [1024, 1024],
    "init": "he",
    "optimizer": "adamw",
    "learning_rate": 1e-3,
    "weight_decay": 0.02,
    "schedule": "cosine",
    "warmup_steps": 200,
    "batch_size": 256,
    "max_steps": 6000,
    "eval_freq": 500,
    "augment": True,
    "preprocess": "standard",
}
MLP_BEST = {
    "dnn_hidden_units": [1024, 1024, 1024],
    "activation": "gelu",
    "norm": "batch",
    "dropout": 0.1,
    "optimizer": "adamw",
    "learning_rate": 1e-3,  # chosen on validation among 1e-3, 2e-3, 4e-3 (docs/results.md)
    "weight_decay": 0.05,
    "schedule": "onecycle",
    "batch_size": 256,
    "max_steps": 12000,
    "eval_freq": 1000,
    "label_smoothing": 0.1,
    "augment": True,
    "preprocess": "standard",
}
# the seed's ConvNet protocol: Adam 1e-4, batch 32, 5000 steps, the test set every 500
CONVNET_SEED = {
    "learning_rate": 1e-4,
    "max_steps": 5000,
    "batch_size": 32,
    "eval_freq": 500,
    "optimizer": "adam",
    "channels_last": True,
}
# best: the same architecture in less time (4000 steps, 4 evaluations): AdamW one-cycle,
# label smoothing, standardised inputs; at ~2.5 epochs the net still underfits: no augmentation
CONVNET_BEST = {
    **CONVNET_SEED,
    "optimizer": "adamw",
    "learning_rate": 2e-3,
    "weight_decay": 0.05,
    "schedule": "onecycle",
    "max_steps": 4000,
    "eval_freq": 1000,
    "label_smoothing": 0.1,
    "preprocess": "standard",
}
# finetune: every layer at 64 px, 4000 steps of 64 (5 epochs); best: 96 px, 3000 steps;
# linear: only the head (a step is ~3x cheaper); scratch: finetune from random weights (control)
TRANSFER_FINETUNE = {
    "learning_rate": 1e-3,
    "max_steps": 4000,
    "batch_size": 64,
    "eval_freq": 1000,
    "optimizer": "adamw",
    "weight_decay": 0.01,
    "schedule": "onecycle",
    "label_smoothing": 0.1,
    "augment": True,
    "preprocess": "tf",
    "eval_batch_size": 50,  # 1.6-1.7x faster than 500 on a 2-core CPU at 64 and 128 px (docs/benchmarks.md)
    "channels_last": True,
}


# the seed's protocol: ImageNet VGG13, last layer replaced, Adam 1e-4, batch 32, 5000 steps, 32x32
VGG_SEED = {
    "optimizer": "adam",
    "learning_rate": 1e-4,
    "batch_size": 32,
    "max_steps": 5000,
    "eval_freq": 500,
    "preprocess": "imagenet",
    "channels_last": True,
}
# not measured (these machines cannot download the weights): the EfficientNet recipe's choices
VGG_BEST = {**VGG_SEED, "optimizer": "adamw", "weight_decay": 0.01, "schedule": "onecycle",
            "label_smoothing": 0.1, "augment": True, "batch_size": 64, "max_steps": 4000, "eval_freq": 1000}  # fmt: skip


# fast: reach 94 % in as little arithmetic as possible (airbench94's hyperparameters, converted
# to a mean loss: its lr 11.5 per 1024 images with momentum 0.85 is 1.5 here, its decoupled
# decay 0.0153 per 1024 images is 0.0013 here). 48 steps of 1024 make an epoch; 475 are 9.9.
# Its last five settings are airbench94's too, chosen together on validation over 8 seeds
# (0.9409 against 0.9383 without them; docs/results.md, results/gpu/study-round4.md). A
# setting's field default stays "off": runs recorded before it existed read as off.
FAST = {
    "batch_size": 1024,
    "max_steps": 475,
    "eval_freq": 48,  # every epoch, for time_to_accuracy
    "optimizer": "momentum",
    "momentum": 0.85,
    "learning_rate": 1.5,  # BatchNorm biases: 64x (cifarlab.models.fast.BIAS_LR_SCALE)
    "weight_decay": 0.0013,
    "schedule": "onecycle",
    "label_smoothing": 0.2,
    "augment": True,
    "crop_pad": 2,
    "flip": "alternate",
    "preprocess": "standard",
    "channels_last": True,
    "lookahead": 5,  # weights averaged every 5 steps, decay 0.95^5 (t/T)^3
    "lr_start": 0.2,  # the triangle goes 0.2 -> 1 (at 23 % of the steps) -> 0.07
    "lr_peak": 0.23,
    "lr_end": 0.07,
    "decay_biases": True,  # BatchNorm biases shrink per step like the weights
    "whiten_bias_epochs": 3.0,  # then frozen: its backward pass is skipped for the other 70 %
    "full_evals": 1,  # the final evaluation sees all 10,000 test images (6 views); earlier ones 2000, 1 view
}


# best: chosen on 5000 held-out training images among 7 budgets of resolution x steps x frozen
# stages (docs/results.md): 128 px with the stem and stages 1-4 frozen, 1400 steps (~28 min on a
# 2-core AVX2 CPU); the test set is evaluated once, at the end
TRANSFER_BEST = {
    **TRANSFER_FINETUNE,
    "image_size": 128,
    "freeze_stages": 4,
    "max_steps": 1400,
    "eval_freq": 1400,
}


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Recipe:
    """What ``cifarlab train NAME`` trains: ``create_model(NAME, **config.model_kwargs())``."""

    name: str
    config: type[TrainConfig]
    presets: dict[str, dict[str, Any]]  # the first is the default
    description: str
    framework: str = "torch"  # "numpy": trained by cifarlab.numpy_nn.train, never imports torch
    # rough training and evaluation images/s on a 2-core AVX2 CPU (at 64 px for the transfer
    # models), for `cifarlab reproduce`'s time estimate only
    speed: tuple[float, float] = (500, 2000)

    def defaults(self, preset: str | None = None) -> TrainConfig:
        """The config of ``preset`` (default: the first) before any flag."""
        return replace(self.config(), **self.presets[preset or next(iter(self.presets))])

    def make_config(self, preset: str | None = None, **overrides: Any) -> TrainConfig:
        """The validated config of ``preset`` with ``overrides`` applied."""
        return make_config(self.config, self.presets[preset or next(iter(self.presets))], overrides)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "mlp-numpy",
            NumpyMLPConfig,
            {"seed": {}, "best": MLP_NUMPY_BEST},
            "MLP in pure NumPy with hand-written backprop",
            framework="numpy",
            speed=(2500, 20000),
        ),
        Recipe(
            "mlp",
            MLPConfig,
            {"seed": {}, "best": MLP_BEST},
            "PyTorch MLP (ELU/Tanh/ReLU/GELU, BatchNorm/LayerNorm, dropout)",
            speed=(2000, 8000),
        ),
        Recipe(
            "convnet",
            TrainConfig,
            {"seed": CONVNET_SEED, "best": CONVNET_BEST},
            "the spec's VGG13-like pre-activation ConvNet",
            speed=(40, 150),
        ),
        Recipe(
            "efficientnet_lite0",
            TransferConfig,
            {
                "finetune": TRANSFER_FINETUNE,
                "best": TRANSFER_BEST,
                "linear": {
                    **TRANSFER_FINETUNE,
                    "freeze_backbone": True,
                    "learning_rate": 3e-3,
                    "weight_decay": 0.0,
                    "label_smoothing": 0.0,
                    "max_steps": 2000,
                    "eval_freq": 500,
                },
                "scratch": {**TRANSFER_FINETUNE, "pretrained": False},
            },
            "transfer learning from ImageNet (EfficientNet-Lite0)",
            speed=(250, 700),
        ),
        *(
            Recipe(
                f"efficientnet_{v}",
                TransferConfig,
                {
                    "finetune": TRANSFER_FINETUNE,
                    "best": {**TRANSFER_FINETUNE, "image_size": 96, "max_steps": 3000},
                },
                f"transfer learning from ImageNet (EfficientNet-{v.title()})",
            )
            for v in ("lite1", "lite2")
        ),
        Recipe(
            "fast",
            FastConfig,
            {"default": FAST},
            "94 % in as little arithmetic as possible (airbench-style)",
            speed=(115, 65),  # evaluation: 6 test-time views per image
        ),
        *(
            Recipe(
                name,
                VGGConfig,
                {"seed": VGG_SEED, "best": VGG_BEST},
                f"transfer learning from ImageNet as the seed did (torchvision's {label} weights)",
            )
            for name, label in (("vgg13", "VGG13"), ("vgg13_bn", "VGG13 with BatchNorm"))
        ),
    )
}


def resolve(model: str, preset: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The validated config that ``cifarlab train MODEL --preset PRESET`` with the flags of
    ``overrides`` runs with, without any command line: experiments, sweeps, ``reproduce`` and
    the report all describe runs this way. Unknown names give a one-line UsageError."""
    recipe = RECIPES.get(model)
    if recipe is None:
        raise UsageError(f"unknown model {model!r}; cifarlab train knows {', '.join(RECIPES)}")
    if preset is not None and preset not in recipe.presets:
        raise UsageError(f"{model} has no preset {preset!r}; its presets: {', '.join(recipe.presets)}")
    return recipe.make_config(preset, **(overrides or {}))


def command_line(model: str, preset: str | None = None, overrides: dict[str, Any] | None = None) -> list[str]:
    """The ``cifarlab train`` arguments that :func:`resolve` describes (model first)."""
    return [model, *(["--preset", preset] if preset else []), *to_flags(overrides or {})]
