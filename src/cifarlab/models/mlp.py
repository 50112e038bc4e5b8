"""Multi-layer perceptron (and, with no hidden layers, multinomial logistic regression)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from cifarlab.choices import LAYERNORMS, NORMS
from cifarlab.registry import register_model

__all__ = ["ACTIVATION_LAYERS", "MLP", "mlp"]

# the layer of each name in cifarlab.choices.ACTIVATIONS (the one list of choices)
ACTIVATION_LAYERS: dict[str, type[nn.Module]] = {
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


def _layer_norm(n: int, impl: str) -> nn.Module:
    """A layer norm over ``n`` features, by ``impl`` (one of cifarlab.choices.LAYERNORMS)."""
    from cifarlab.ops.layernorm import LayerNormAutograd, LayerNormManual

    layers = {"function": LayerNormManual, "autograd": LayerNormAutograd, "torch": nn.LayerNorm}
    if impl not in layers:
        raise ValueError(f"unknown layernorm {impl!r}; expected one of {LAYERNORMS}")
    return layers[impl](n)


def _make_norm(norm: str | None, n: int, layernorm: str = "function") -> nn.Module | None:
    if norm in (None, "none"):
        return None
    if norm == "batch":
        return nn.BatchNorm1d(n)
    if norm == "layer":
        return _layer_norm(n, layernorm)
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


class MLP(nn.Module):
    """Fully connected network returning logits.

    Each hidden block is ``Linear -> [norm] -> activation -> [dropout]``, followed by an output
    ``Linear``. With ``n_hidden=[]`` the model is a single ``Linear`` (multinomial logistic
    regression). Inputs of shape ``(N, ...)`` are flattened to ``(N, n_inputs)``.

    Args:
        n_inputs: number of input features (3072 for CIFAR-10 images).
        n_hidden: widths of the hidden layers; may be empty.
        num_classes: number of output logits.
        activation: one of ``'elu'``, ``'relu'``, ``'tanh'``, ``'gelu'``.
        norm: ``None``, ``'batch'`` (``BatchNorm1d``) or ``'layer'`` (see ``layernorm``).
        dropout: dropout probability after each hidden activation (0 disables it).
        norm_after_activation: ``Linear -> activation -> norm`` instead (the seed's order).
        layernorm: the layer norm of ``norm='layer'``: ``'function'``
            (``cifarlab.ops.layernorm.LayerNormManual``), ``'autograd'`` (``LayerNormAutograd``)
            or ``'torch'`` (``nn.LayerNorm``).
    """

    def __init__(
        self,
        n_inputs: int,
        n_hidden: Sequence[int],
        num_classes: int,
        activation: str = "elu",
        norm: str | None = None,
        dropout: float = 0.0,
        norm_after_activation: bool = False,
        layernorm: str = "function",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATION_LAYERS:
            raise ValueError(
                f"unknown activation {activation!r}; expected one of {sorted(ACTIVATION_LAYERS)}"
            )
        if norm is not None and norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.n_inputs = int(n_inputs)
        self.n_hidden = [int(h) for h in n_hidden]
        self.num_classes = int(num_classes)
        self.activation = activation
        self.norm = None if norm == "none" else norm
        self.dropout = float(dropout)
        self.norm_after_activation = bool(norm_after_activation)

        blocks = []
        width = self.n_inputs
        for h in self.n_hidden:
            layers: OrderedDict[str, nn.Module] = OrderedDict(linear=nn.Linear(width, h))
            norm_layer = _make_norm(norm, h, layernorm)
            if norm_after_activation:
                layers["act"] = ACTIVATION_LAYERS[activation]()
            if norm_layer is not None:
                layers["norm"] = norm_layer
            if not norm_after_activation:
                layers["act"] = ACTIVATION_LAYERS[activation]()
            if dropout > 0:
                layers["dropout"] = nn.Dropout(dropout)
            blocks.append(nn.Sequential(layers))
            width = h
        self.hidden = nn.Sequential(*blocks)
        self.output = nn.Linear(width, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.n_inputs)
        return self.output(self.hidden(x))

    def extra_repr(self) -> str:
        return (
            f"n_inputs={self.n_inputs}, n_hidden={self.n_hidden}, num_classes={self.num_classes}, "
            f"activation={self.activation!r}, norm={self.norm!r}, dropout={self.dropout}"
        )


@register_model("mlp")
def mlp(
    num_classes: int = 10,
    n_inputs: int = 3072,
    n_hidden: Sequence[int] = (100,),
    activation: str = "elu",
    norm: str | None = None,
    dropout: float = 0.0,
    norm_after_activation: bool = False,
    layernorm: str = "function",
) -> MLP:
    """MLP on flattened images (default: one hidden layer of 100 ELU units)."""
    return MLP(
        n_inputs, list(n_hidden), num_classes, activation, norm, dropout, norm_after_activation, layernorm
    )
