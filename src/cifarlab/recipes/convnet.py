"""``cifarlab train convnet``: the spec's VGG13-like pre-activation ConvNet.

Presets: ``seed`` is the seed's protocol (Adam, lr 1e-4, batch 32, 5000 steps, evaluation
every 500 steps, seed preprocessing); ``best`` is our better recipe for this CPU.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from cifarlab.config import add_config_args
from cifarlab.train import TrainConfig, run_recipe


@dataclass
class ConvNetConfig(TrainConfig):
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    max_steps: int = field(default=5000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    eval_freq: int = field(default=500, metadata={"help": "evaluate on the whole test set every N steps"})
    optimizer: str = field(
        default="adam", metadata={"help": "optimizer", "choices": ("sgd", "momentum", "adam", "adamw")}
    )
    channels_last: bool = field(default=True, metadata={"help": "NHWC memory format (faster convs on CPU)"})

    def model_kwargs(self) -> dict[str, Any]:
        return {}


# best: the same architecture in less time than the seed protocol (4000 steps at batch 32,
# 4 evaluations): AdamW with a one-cycle schedule, label smoothing, standardised inputs. At
# ~2.5 epochs the net is still underfitting, so no augmentation.
PRESETS: dict[str, dict[str, Any]] = {
    "seed": {},
    "best": {
        "optimizer": "adamw",
        "learning_rate": 2e-3,
        "weight_decay": 0.05,
        "schedule": "onecycle",
        "max_steps": 4000,
        "eval_freq": 1000,
        "label_smoothing": 0.1,
        "preprocess": "standard",
    },
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, ConvNetConfig, PRESETS)


def main(args: argparse.Namespace) -> int:
    return run_recipe(args, ConvNetConfig, PRESETS, "convnet")
