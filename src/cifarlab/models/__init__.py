"""Torch models for cifarlab, all built through :func:`create_model`.

>>> from cifarlab.models import create_model, list_models
>>> model = create_model("convnet", num_classes=10)

New model modules register factories with ``@register_model("name")`` and are imported
here so that registration happens on ``import cifarlab.models``. This package must not import
the trainer or data modules.
"""

# The model modules are imported for their @register_model side effects.
from cifarlab.models.convnet import ConvNet, PreActBlock
from cifarlab.models.efficientnet import EfficientNetLite
from cifarlab.models.fast import FastNet
from cifarlab.models.mlp import MLP
from cifarlab.models.vgg import VGG
from cifarlab.registry import (
    ModelEntry,
    create_model,
    get_model_entry,
    is_model,
    list_models,
    register_model,
)

__all__ = [
    "MLP",
    "ConvNet",
    "EfficientNetLite",
    "FastNet",
    "VGG",
    "ModelEntry",
    "PreActBlock",
    "create_model",
    "get_model_entry",
    "is_model",
    "list_models",
    "register_model",
]
