"""A small timm-style model registry, for the torch models and the NumPy MLP alike.

Every model in cifarlab is built through :func:`create_model`. Model modules register
factory functions with the :func:`register_model` decorator::

    @register_model("mlp")
    def mlp(num_classes=10, **kwargs) -> nn.Module: ...

    @register_model("mlp-numpy", framework="numpy")
    def mlp_numpy(num_classes=10, **kwargs) -> numpy_nn.MLP: ...

A factory always receives ``num_classes`` plus any extra keyword arguments given to
:func:`create_model`. Factories registered with ``has_pretrained=True`` additionally receive
``pretrained=<bool>``; for all others ``create_model(..., pretrained=True)`` raises
``ValueError``.

This module imports neither torch nor NumPy: asking for a name that is not registered yet
imports ``cifarlab.numpy_nn`` (NumPy models) and then, only if still unknown,
``cifarlab.models`` (torch models), so ``create_model("mlp-numpy")`` never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# where registrations live, imported on the first lookup of an unknown name (in this order)
_PROVIDERS = ("cifarlab.numpy_nn", "cifarlab.models")

__all__ = [
    "ModelEntry",
    "create_model",
    "get_model_entry",
    "is_model",
    "list_models",
    "register_model",
]


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: its name, factory and whether pretrained weights exist."""

    name: str
    factory: Callable[..., Any]
    has_pretrained: bool = False
    description: str = ""
    framework: str = "torch"  # or "numpy"


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str | Callable[..., Any] | None = None,
    *,
    has_pretrained: bool = False,
    framework: str = "torch",
    overwrite: bool = False,
) -> Any:
    """Decorator registering a model factory under ``name`` (default: the function name).

    Usable as ``@register_model("mlp")``, ``@register_model()`` or bare ``@register_model``.
    Registering an already-used name raises ``ValueError`` unless ``overwrite=True``.
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        model_name = name if isinstance(name, str) else fn.__name__
        if not model_name:
            raise ValueError("model name must be a non-empty string")
        if model_name in _REGISTRY and not overwrite:
            raise ValueError(f"model {model_name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[model_name] = ModelEntry(
            name=model_name,
            factory=fn,
            has_pretrained=has_pretrained,
            description=doc[0] if doc else "",
            framework=framework,
        )
        return fn

    if callable(name):  # used bare: @register_model
        return decorator(name)
    return decorator


def _load_providers(name: str | None = None) -> None:
    """Import the modules that register models until ``name`` is known (all if None)."""
    for module in _PROVIDERS:
        if name is not None and name in _REGISTRY:
            return
        importlib.import_module(module)


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    _load_providers()
    return sorted(_REGISTRY)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    _load_providers(name)
    return name in _REGISTRY


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; ``ValueError`` listing known names if unknown."""
    _load_providers(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_models()) or "<none>"
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None


def create_model(name: str, pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> Any:
    """Build the registered model ``name``.

    Args:
        name: a name from :func:`list_models`.
        pretrained: load pretrained weights; only for models registered with
            ``has_pretrained=True``, otherwise ``ValueError``.
        num_classes: size of the output layer (the model returns logits).
        **kwargs: passed on to the model's factory.
    """
    entry = get_model_entry(name)
    if pretrained and not entry.has_pretrained:
        with_weights = [n for n in list_models() if _REGISTRY[n].has_pretrained]
        raise ValueError(
            f"model {name!r} has no pretrained weights; models with pretrained weights: "
            f"{', '.join(with_weights) or '<none>'}"
        )
    if entry.has_pretrained:
        kwargs["pretrained"] = bool(pretrained)
    model = entry.factory(num_classes=num_classes, **kwargs)
    if entry.framework == "torch":
        from torch import nn

        if not isinstance(model, nn.Module):
            raise TypeError(f"factory for {name!r} returned {type(model).__name__}, not nn.Module")
    return model
