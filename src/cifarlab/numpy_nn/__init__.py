"""Neural-network layers with hand-written backward passes, in pure NumPy (no torch import).

Each module has ``forward(x)`` and ``backward(dout) -> dx`` on batch-first arrays; parametrised
modules keep ``params`` and ``grads`` dicts. The math is derived in ``docs/derivations.md``.

    >>> import numpy as np
    >>> from cifarlab.numpy_nn import MLP, SoftmaxCrossEntropy, SGD
    >>> net = MLP(3072, [100], 10, rng=np.random.default_rng(0))
    >>> loss_fn, opt = SoftmaxCrossEntropy(), SGD(net.parameters(), lr=1e-3)
    >>> x, y = np.zeros((4, 3072), np.float32), np.array([0, 1, 2, 3])
    >>> loss = loss_fn(net.logits(x), y)
    >>> _ = net.backward_logits(loss_fn.backward())
    >>> opt.step()
"""

from cifarlab.numpy_nn.mlp import ACTIVATIONS, MLP
from cifarlab.numpy_nn.modules import (
    ELU,
    INITS,
    CrossEntropy,
    Linear,
    Module,
    ReLU,
    SoftMax,
    SoftmaxCrossEntropy,
    Tanh,
)
from cifarlab.numpy_nn.optim import SGD, Adam, Optimizer
from cifarlab.registry import register_model


@register_model("mlp-numpy", framework="numpy")
def mlp_numpy(
    num_classes: int = 10,
    n_inputs: int = 3072,
    n_hidden: tuple[int, ...] | list[int] = (100,),
    activation: str = "elu",
    init: str = "seed",
    dtype: str = "float32",
    seed: int | None = None,
) -> MLP:
    """The NumPy MLP (hand-written backward); ``seed`` seeds its weight init."""
    import numpy as np

    return MLP(
        n_inputs, list(n_hidden), num_classes, activation, init, np.dtype(dtype), np.random.default_rng(seed)
    )


__all__ = [
    "ACTIVATIONS",
    "ELU",
    "INITS",
    "MLP",
    "SGD",
    "Adam",
    "CrossEntropy",
    "Linear",
    "Module",
    "Optimizer",
    "ReLU",
    "SoftMax",
    "SoftmaxCrossEntropy",
    "Tanh",
    "mlp_numpy",
]
