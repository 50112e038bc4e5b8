"""``cifarlab train mlp``: the PyTorch MLP of the seed's Part 2.

Presets: ``seed`` is the seed's defaults (hidden 100, SGD, lr 1e-3, 1400 steps, batch 200);
``best`` is our recipe for >= 0.62 test accuracy in under 15 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from cifarlab.config import add_config_args
from cifarlab.train import TrainConfig, run_recipe

ACTIVATIONS = ("elu", "relu", "tanh", "gelu")
NORMS = ("none", "batch", "layer")


@dataclass
class MLPConfig(TrainConfig):
    dnn_hidden_units: list[int] = field(
        default_factory=lambda: [100], metadata={"help": "hidden sizes, comma-separated ('' = none)"}
    )
    activation: str = field(default="elu", metadata={"help": "hidden activation", "choices": ACTIVATIONS})
    norm: str = field(
        default="none", metadata={"help": "normalisation after each hidden Linear", "choices": NORMS}
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout after each hidden block"})
    norm_after_activation: bool = field(
        default=False,
        metadata={"help": "Linear -> activation -> norm (the seed's code) instead of norm first"},
    )

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "n_inputs": 3 * 32 * 32,
            "n_hidden": list(self.dnn_hidden_units),
            "activation": self.activation,
            "norm": None if self.norm == "none" else self.norm,
            "dropout": self.dropout,
            "norm_after_activation": self.norm_after_activation,
        }


PRESETS: dict[str, dict[str, Any]] = {
    "seed": {},
    "best": {
        "dnn_hidden_units": [1024, 1024, 1024],
        "activation": "gelu",
        "norm": "batch",
        "dropout": 0.1,
        "optimizer": "adamw",
        "learning_rate": 2e-3,
        "weight_decay": 0.05,
        "schedule": "onecycle",
        "batch_size": 256,
        "max_steps": 12000,
        "eval_freq": 1000,
        "label_smoothing": 0.1,
        "augment": True,
        "preprocess": "standard",
    },
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, MLPConfig, PRESETS)


def main(args: argparse.Namespace) -> int:
    return run_recipe(args, MLPConfig, PRESETS, "mlp")
