"""Multi-layer perceptron built from :mod:`cifarlab.numpy_nn.modules`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from cifarlab.numpy_nn.modules import ELU, Linear, Module, ReLU, SoftMax, Tanh

__all__ = ["ACTIVATIONS", "MLP"]

ACTIVATIONS: dict[str, type[Module]] = {"elu": ELU, "relu": ReLU, "tanh": Tanh}


class MLP:
    """N × (Linear → activation), then Linear → SoftMax.

    With ``n_hidden=[]`` this is multinomial logistic regression (Linear → SoftMax).

    Layers are stored in ``self.layers`` (Linear, activation, Linear, activation, ..., Linear) and
    named like a ``torch.nn.Sequential``: the parameters of ``self.layers[i]`` are
    ``'layers.{i}.weight'`` and ``'layers.{i}.bias'``. The final SoftMax is ``self.softmax``.

    Two ways to train:

    * probabilities: ``probs = forward(x)``; ``backward(dL/dprobs)`` (e.g. with
      :class:`~cifarlab.numpy_nn.modules.CrossEntropy`), the original assignment's path;
    * logits (faster, numerically safer): ``z = logits(x)``;
      ``backward_logits(dL/dz)`` (with :class:`~cifarlab.numpy_nn.modules.SoftmaxCrossEntropy`).

    Args:
        n_inputs: input features D (3072 for CIFAR-10); inputs of shape (S, ...) are flattened.
        n_hidden: widths of the hidden layers, possibly empty.
        num_classes: number of classes C.
        activation: ``'elu'``, ``'relu'`` or ``'tanh'``.
        init: weight init of every Linear, ``'seed'``, ``'he'`` or ``'glorot'``.
        dtype: ``np.float32`` (default) or ``np.float64``; inputs are cast to it.
        rng: random generator for the weights (a fresh unseeded one if None).

    Attributes:
        input_grad: if True, ``backward``/``backward_logits`` return dL/dx; False by default (the
            data needs no gradient, and skipping it saves a third of the first layer's backward).
    """

    def __init__(
        self,
        n_inputs: int,
        n_hidden: Sequence[int],
        num_classes: int,
        activation: str = "elu",
        init: str = "seed",
        dtype: type | np.dtype = np.float32,
        rng: np.random.Generator | None = None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        rng = np.random.default_rng() if rng is None else rng
        self.n_inputs = int(n_inputs)
        self.n_hidden = [int(h) for h in n_hidden]
        self.num_classes = int(num_classes)
        self.activation = activation
        self.init = init
        self.dtype = np.dtype(dtype)
        widths = [self.n_inputs, *self.n_hidden, self.num_classes]
        self.layers: list[Module] = []
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            self.layers.append(Linear(d_in, d_out, init=init, rng=rng, dtype=self.dtype))
            if i < len(self.n_hidden):
                self.layers.append(ACTIVATIONS[activation]())
        self.softmax = SoftMax()
        self.input_grad = False

    # -- gradient of the input ---------------------------------------------------------------
    @property
    def input_grad(self) -> bool:
        return self.layers[0].input_grad

    @input_grad.setter
    def input_grad(self, value: bool) -> None:
        self.layers[0].input_grad = bool(value)

    # -- forward / backward -------------------------------------------------------------------
    def logits(self, x: np.ndarray) -> np.ndarray:
        """Inputs: x, shape (S, D) or (S, ...) with D elements per sample. Returns (S, C)."""
        x = np.asarray(x, dtype=self.dtype)
        x = x.reshape(x.shape[0], self.n_inputs)
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities. Inputs: x, shape (S, D). Returns probs, shape (S, C)."""
        return self.softmax.forward(self.logits(x))

    __call__ = forward

    def backward_logits(self, dlogits: np.ndarray) -> np.ndarray | None:
        """Backpropagate dL/dlogits (S, C) through all layers, filling every Linear's grads.

        Returns dL/dx of shape (S, D) if ``input_grad`` else None.
        """
        dout = dlogits
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout

    def backward(self, dprobs: np.ndarray) -> np.ndarray | None:
        """Backpropagate dL/dprobs (S, C) through SoftMax and all layers (see backward_logits)."""
        return self.backward_logits(self.softmax.backward(dprobs))

    # -- parameters ---------------------------------------------------------------------------
    def named_modules(self) -> Iterator[tuple[str, Module]]:
        """Yield ('layers.{i}', module) for every layer that has parameters."""
        for i, layer in enumerate(self.layers):
            if layer.params:
                yield f"layers.{i}", layer

    def parameters(self) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """[(params dict, grads dict)] for every Linear, in order; pass to SGD/Adam."""
        return [(m.params, m.grads) for _, m in self.named_modules()]

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Flat name -> parameter array (the live arrays, not copies), e.g. 'layers.0.weight'."""
        return {f"{n}.{k}": v for n, m in self.named_modules() for k, v in m.params.items()}

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """Flat name -> gradient array (live), with the same keys as ``params``."""
        return {f"{n}.{k}": v for n, m in self.named_modules() for k, v in m.grads.items()}

    def num_parameters(self) -> int:
        return sum(p.size for p in self.params.values())

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat name -> copy of each parameter ('layers.0.weight', 'layers.0.bias', ...)."""
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray], strict: bool = True) -> None:
        """Copy arrays from ``state`` into the parameters (cast to the model dtype).

        With ``strict`` (default) the keys must match exactly; shapes must always match.
        """
        params = self.params
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
        for k, p in params.items():
            if k not in state:
                continue
            v = np.asarray(state[k])
            if v.shape != p.shape:
                raise ValueError(f"{k}: expected shape {p.shape}, got {v.shape}")
            np.copyto(p, v, casting="same_kind")

    def __repr__(self) -> str:
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"MLP([{inner}, SoftMax()])"
