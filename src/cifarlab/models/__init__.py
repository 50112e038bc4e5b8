"""Torch models for cifarlab, all built through :func:`create_model`.

>>> from cifarlab.models import create_model, list_models
>>> model = create_model("convnet", num_classes=10)

A model module registers its factory with ``@register_model("name")``; every module of this
package is imported here, so a new model file needs no line in this one. This package must
not import the trainer (cifarlab.training) or anything above it.
"""

import importlib
import pkgutil

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

for _module in pkgutil.iter_modules(__path__):  # registration happens on import
    importlib.import_module(f"{__name__}.{_module.name}")

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
