"""The optional hooks a torch model may give the trainer, in one place.

A model needs none of them: ``create_model`` may return any ``nn.Module`` that maps a
(B, 3, H, W) float batch to (B, num_classes) logits. The trainer
(``cifarlab.training.torch_learner``) asks for each hook through the functions below, so what a
model can offer is written here once rather than found by reading the trainer.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LearningRateScales(Protocol):
    """``lr_scales``: parameter name -> factor on the learning rate (and the weight decay is
    divided by it). ``fast`` trains its BatchNorm biases at 64× the rate."""

    @property
    def lr_scales(self) -> dict[str, float]: ...


@runtime_checkable
class InitFromData(Protocol):
    """``init_from_data(x)``: set the model up from the first 5000 training images, preprocessed
    (float (N, 3, 32, 32)), before the first step of a new run (a resumed run's weights come
    from its checkpoint). ``fast`` computes its whitening filters this way."""

    def init_from_data(self, x: torch.Tensor) -> None: ...


def lr_scales(model: torch.nn.Module) -> dict[str, float]:
    """The model's learning-rate factors by parameter name ({} when it has none)."""
    return dict(model.lr_scales) if isinstance(model, LearningRateScales) else {}


def init_from_data(model: torch.nn.Module, x: torch.Tensor) -> bool:
    """Let the model set itself up from training images ``x``, if it can; whether it did."""
    if not isinstance(model, InitFromData):
        return False
    model.init_from_data(x)
    return True
