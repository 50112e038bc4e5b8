"""Numerical gradient checking for any ``forward``/``backward`` module (pure NumPy).

Use float64 inputs and parameters: with float32 the rounding error of f divided by 2·eps swamps
the gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["check_module", "numerical_gradient", "rel_error"]


def numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of a scalar function, one element of x at a time.

    grad[i] = (f(x + eps·e_i) − f(x − eps·e_i)) / (2·eps)

    ``x`` is perturbed *in place* (and restored), so ``f`` may ignore its argument and read
    ``x`` through a module that holds it (this is how parameters are checked). The error is
    O(eps²) from truncation plus O(ε_machine·|f| / eps) from rounding.

    Inputs:
        f: function of x returning a scalar.
        x: float array of any shape (float64 for meaningful results).
        eps: step size.
    Returns:
        float64 array of the shape of x.
    """
    grad = np.zeros(x.shape, dtype=np.float64)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        f_plus = float(f(x))
        x[idx] = old - eps
        f_minus = float(f(x))
        x[idx] = old
        grad[idx] = (f_plus - f_minus) / (2 * eps)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Relative error of two arrays, scaled by the largest entry:

        rel_error(a, b) = max_i |a_i − b_i| / max(1e-12, max_i (|a_i| + |b_i|))

    i.e. the worst absolute difference relative to the gradient's overall magnitude (an
    ∞-norm relative error), in [0, 1]. It is not the per-element ratio
    max_i |a_i − b_i| / (|a_i| + |b_i|): that ratio is ~1 wherever the true gradient is ~0 and
    finite-difference noise (~1e-10) is all there is, so it fails correct code. The 1e-12 floor
    makes two all-zero arrays compare as 0 instead of 0/0.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    scale = max(1e-12, float(np.max(np.abs(a) + np.abs(b))))
    return float(np.max(np.abs(a - b)) / scale)


def check_module(module, x: np.ndarray, dout: np.ndarray, eps: float = 1e-6) -> dict[str, float]:
    """Compare a module's backward pass with numerical gradients.

    Uses the scalar f = sum(module.forward(x) ∘ dout), whose gradient with respect to the
    output is exactly ``dout``; so ``module.backward(dout)`` must return df/dx and leave df/dp in
    ``module.grads[k]`` for every ``module.params[k]``.

    Inputs:
        module: anything with ``forward(x)``, ``backward(dout)`` and optionally ``params``/
            ``grads`` dicts (of live arrays, perturbed in place).
        x: input, shape (S, ...), float64.
        dout: upstream gradient, the shape of ``module.forward(x)``.
        eps: finite-difference step.
    Returns:
        {'x': rel_error of dL/dx, k: rel_error of grads[k] for each k in params}. The 'x' entry
        is left out when ``backward`` returns None (a module told not to compute dL/dx).
    """
    y = module.forward(x)
    if y.shape != dout.shape:
        raise ValueError(f"dout shape {dout.shape} != output shape {y.shape}")
    dx = module.backward(dout)
    params = getattr(module, "params", {}) or {}
    analytic = {k: np.array(g, dtype=np.float64) for k, g in module.grads.items()} if params else {}

    def f(_: np.ndarray) -> float:
        return float(np.sum(module.forward(x) * dout))

    errors: dict[str, float] = {}
    if dx is not None:
        errors["x"] = rel_error(dx, numerical_gradient(f, x, eps))
    for k, p in params.items():
        errors[k] = rel_error(analytic[k], numerical_gradient(f, p, eps))
    return errors
