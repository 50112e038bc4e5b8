"""Optimisers that update NumPy parameters in place (PyTorch semantics).

An optimiser takes ``params``: a list of ``(params dict, grads dict)`` pairs, as returned by
:meth:`cifarlab.numpy_nn.MLP.parameters` (or ``[(layer.params, layer.grads)]`` for one module).
After each ``backward``, ``step()`` updates every parameter array in place from its gradient.

``lr`` is a plain attribute; a schedule sets it before each ``step()``.

``state_dict()`` returns a flat name -> ndarray dict (savable with safetensors): the buffers,
named ``'{i}.{name}.{buffer}'`` where ``i`` is the index of the pair in ``params`` and ``name``
the parameter's key (e.g. ``'0.weight.exp_avg'``), plus ``'step'`` (a 0-d int64 array).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["SGD", "Adam", "Optimizer"]

ParamPairs = Iterable[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]


class Optimizer:
    """Base class: keeps the (name, param, grad) triples, the step count and named buffers."""

    buffer_names: tuple[str, ...] = ()

    def __init__(self, params: ParamPairs, lr: float) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        self.lr = float(lr)
        self.step_count = 0
        self._triples: list[tuple[str, np.ndarray, np.ndarray]] = []
        for i, (p_dict, g_dict) in enumerate(params):
            for k, p in p_dict.items():
                g = g_dict[k]
                if g.shape != p.shape:
                    raise ValueError(f"{i}.{k}: grad shape {g.shape} != param shape {p.shape}")
                self._triples.append((f"{i}.{k}", p, g))
        if not self._triples:
            raise ValueError("optimizer got an empty parameter list")
        # one zero-initialised buffer per parameter and buffer name
        self.state: dict[str, np.ndarray] = {
            f"{name}.{b}": np.zeros_like(p) for name, p, _ in self._triples for b in self.buffer_names
        }

    def step(self) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Set every gradient to 0 (not needed with our modules, whose backward overwrites)."""
        for _, _, g in self._triples:
            g.fill(0)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of all buffers plus ``'step'`` (0-d int64 array)."""
        out = {k: v.copy() for k, v in self.state.items()}
        out["step"] = np.array(self.step_count, dtype=np.int64)
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore buffers and step count saved by :meth:`state_dict` (keys must match)."""
        expected = set(self.state) | {"step"}
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise KeyError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
        for k, buf in self.state.items():
            v = np.asarray(state[k])
            if v.shape != buf.shape:
                raise ValueError(f"{k}: expected shape {buf.shape}, got {v.shape}")
            np.copyto(buf, v, casting="same_kind")
        self.step_count = int(state["step"])


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    Per parameter p with gradient g (buffer v starts at 0, so v = g after the first step):

        g ← g + weight_decay · p            (weights only: biases, ndim ≤ 1, are not decayed)
        v ← momentum · v + g
        d = g + momentum · v  if nesterov  else  v        (d = g without momentum)
        p ← p − lr · d

    Args:
        params: list of (params dict, grads dict) pairs.
        lr: learning rate.
        momentum: momentum factor μ (0 disables the buffer).
        nesterov: use Nesterov momentum (needs momentum > 0).
        weight_decay: L2 penalty coefficient λ (adds λ p to the gradient).
    """

    def __init__(
        self,
        params: ParamPairs,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        if momentum < 0 or weight_decay < 0:
            raise ValueError("momentum and weight_decay must be >= 0")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        self.buffer_names = ("momentum_buffer",) if momentum > 0 else ()
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)
        super().__init__(params, lr)

    def step(self) -> None:
        lr, mu, wd = self.lr, self.momentum, self.weight_decay
        for name, p, g in self._triples:
            d = g + wd * p if wd and p.ndim >= 2 else g
            if mu:
                v = self.state[f"{name}.momentum_buffer"]
                v *= mu
                v += d
                d = d + mu * v if self.nesterov else v
            p -= lr * d
        self.step_count += 1


class Adam(Optimizer):
    """Adam, with decoupled weight decay (AdamW) by default.

    Per parameter p with gradient g, at step t = 1, 2, ... (m, v start at 0):

        p ← p − lr · λ · p          if decoupled (AdamW); weights only, never biases (ndim ≤ 1)
        g ← g + λ · p               otherwise (L2 penalty through the gradient)
        m ← β₁ m + (1 − β₁) g
        v ← β₂ v + (1 − β₂) g²
        p ← p − lr · m̂ / (√v̂ + eps),   m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ)

    At t = 1, m̂ = g and v̂ = g², so every element moves by lr · |g| / (|g| + eps) ≈ lr.

    Args:
        params: list of (params dict, grads dict) pairs.
        lr: learning rate.
        betas: (β₁, β₂), decay rates of the first and second moment estimates.
        eps: added to √v̂ to avoid division by zero.
        weight_decay: λ.
        decoupled: apply λ directly to the weights (AdamW) rather than through the gradient.
    """

    buffer_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: ParamPairs,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = True,
    ) -> None:
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError("eps and weight_decay must be >= 0")
        self.betas = (float(b1), float(b2))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.decoupled = bool(decoupled)
        super().__init__(params, lr)

    def step(self) -> None:
        self.step_count += 1
        t = self.step_count
        lr, wd, eps = self.lr, self.weight_decay, self.eps
        b1, b2 = self.betas
        bias1, bias2 = 1 - b1**t, 1 - b2**t
        for name, p, g in self._triples:
            if wd and p.ndim >= 2 and self.decoupled:
                p *= 1 - lr * wd
            elif wd and p.ndim >= 2:
                g = g + wd * p
            m = self.state[f"{name}.exp_avg"]
            v = self.state[f"{name}.exp_avg_sq"]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            denom = np.sqrt(v / bias2)
            denom += eps
            p -= (lr / bias1) * m / denom
