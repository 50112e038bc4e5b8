"""Layers with hand-written backward passes, in pure NumPy.

Every module maps a batch-first array forward and maps the upstream gradient backward:

    y  = module.forward(x)        # caches what backward needs (and nothing else)
    dx = module.backward(dout)    # dout = dL/dy, same shape as y; returns dL/dx

Modules with parameters keep them in ``params`` and their gradients in ``grads``, two dicts keyed
``'weight'`` and ``'bias'``. ``backward`` *overwrites* ``grads`` (it does not accumulate), so one
``forward``/``backward`` pair per optimiser step is all that is needed.

The formulas are derived in ``docs/derivations.md``; each method names the equation it
implements. Notation: S = batch size, D = input features, M = output features, C = classes.

Every method computes the formula in its docstring as written, except where a faster form of it
measurably pays off: then the docstring gives the plain formula and says how the code differs,
``tests/test_numpy_nn.py::test_fast_forms_match_plain_formulas_*`` check the code against the
plain formula written out in NumPy, and ``benchmarks/bench_numpy_fast_forms.py`` times the two
(the rule: a fast form is kept only if it saves at least 5 % of forward+backward time at the
trainer's shapes; see docs/benchmarks.md, "NumPy fast forms vs plain formulas"). The one kept
is ELU's.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "INITS",
    "ELU",
    "CrossEntropy",
    "Linear",
    "Module",
    "ReLU",
    "SoftMax",
    "SoftmaxCrossEntropy",
    "Tanh",
]

INITS = ("seed", "he", "glorot")


class Module:
    """Base class: ``forward(x) -> y`` and ``backward(dout) -> dx``.

    Attributes:
        params: name -> parameter array (empty for parameter-free modules).
        grads: name -> gradient array of the same shape and dtype as ``params[name]``, filled
            in by ``backward``.
    """

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}

    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Linear(Module):
    """Fully connected layer (docs/derivations.md, "Linear layer").

    forward:  Y = X Wᵀ + b                  X (S, D), W (M, D), b (M,) -> Y (S, M)
    backward: dW = dYᵀ X                    dY (S, M), X (S, D)        -> dW (M, D)
              db = Σ_s dY  (= 1ᵀ dY)        dY (S, M)                  -> db (M,)
              dX = dY W                     dY (S, M), W (M, D)        -> dX (S, D)

    The code computes exactly these products, with W stored row-major as its shape (M, D) reads
    (a column-major W, i.e. a C-contiguous Wᵀ, saved nothing measurable; see
    docs/benchmarks.md). dW and db are written into the existing ``grads`` arrays, which
    optimisers hold on to.

    Args:
        in_features: D, the number of input features.
        out_features: M, the number of output features.
        init: ``'seed'`` (W ~ N(0, 1e-4²), the original assignment's init), ``'he'``
            (W ~ N(0, 2/D), for ReLU/ELU networks) or ``'glorot'`` (W ~ N(0, 2/(D+M))).
            The bias always starts at 0.
        rng: random generator for the weights (a fresh unseeded one if None).
        dtype: parameter dtype, ``np.float32`` (default) or ``np.float64``.
        input_grad: if False, ``backward`` skips dL/dX and returns None. The first layer of a
            network never needs it (the data is not trained), and skipping it saves a third of
            that layer's backward work.

    Attributes:
        params['weight']: W, shape (M, D).
        params['bias']: b, shape (M,).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        init: str = "seed",
        rng: np.random.Generator | None = None,
        dtype: type | np.dtype = np.float32,
        input_grad: bool = True,
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        rng = np.random.default_rng() if rng is None else rng
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.init = init
        self.input_grad = bool(input_grad)
        std = {
            "seed": 1e-4,
            "he": np.sqrt(2.0 / self.in_features),
            "glorot": np.sqrt(2.0 / (self.in_features + self.out_features)),
        }[init]
        shape = (self.out_features, self.in_features)
        weight = rng.standard_normal(shape, dtype=dtype)
        weight *= std
        self.params = {"weight": weight, "bias": np.zeros(self.out_features, dtype=dtype)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Y = X Wᵀ + b.

        Inputs:
            x: X, shape (S, D).
        Returns:
            y: Y, shape (S, M).
        Caches X (needed for dW).
        """
        self._x = x
        W, b = self.params["weight"], self.params["bias"]
        return x @ W.T + b

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """dW = dYᵀ X,  db = Σ_s dY (= 1ᵀ dY, the sum over the batch),  dX = dY W.

        Inputs:
            dout: dY = dL/dY, shape (S, M).
        Returns:
            dx: dX = dL/dX, shape (S, D), or None if ``input_grad`` is False.
        Sets ``grads['weight']`` = dW, shape (M, D), and ``grads['bias']`` = db, shape (M,).
        """
        x = self._x
        if x is None:
            raise RuntimeError("Linear.backward called before forward")
        W = self.params["weight"]
        # dW = dYᵀ X: (M, S) @ (S, D)
        np.matmul(dout.T, x, out=self.grads["weight"])
        # db = 1ᵀ dY: b is added to every sample, so its gradient sums dY over the batch
        np.sum(dout, axis=0, out=self.grads["bias"])
        if not self.input_grad:
            return None
        # dX = dY W: (S, M) @ (M, D)
        return dout @ W

    def __repr__(self) -> str:
        return (
            f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
            f"init={self.init!r}, dtype={self.params['weight'].dtype})"
        )


class ELU(Module):
    """Exponential linear unit (docs/derivations.md, "Elementwise activations").

    forward:  Y = where(X > 0, X, α(e^X − 1))                 X (S, D) -> Y (S, D)
    backward: dX = dY ∘ where(Y > 0, 1, Y + α)                 dY (S, D) -> dX (S, D)

    (dy/dx = 1 if x > 0 else α eˣ = y + α, so backward needs only the cached output Y; at x = 0
    it takes the left derivative α.)

    Fast form, kept because it saves 32–42 % of forward+backward time at the trainer's shapes
    (``benchmarks/bench_numpy_fast_forms.py``; ``np.where`` evaluates both branches into fresh
    arrays): forward computes α·expm1(min(X, 0)) in place and then takes the elementwise max
    with X (for α <= 1: α(e^x − 1) >= x where x <= 0, and 0 < x where x > 0; for α > 1 it adds
    max(X, 0) instead); backward builds min(Y, 0) + α in place (= Y + α where Y <= 0, α where
    Y > 0, corrected to 1 there when α != 1) and multiplies by dY. e^x is only ever evaluated on
    min(x, 0), so large positive inputs cannot overflow.
    """

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = float(alpha)
        self._y: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Y = where(X > 0, X, α(e^X − 1)) (fast form, see the class docstring).

        Inputs: x, shape (S, D). Returns y, shape (S, D). Caches y.
        """
        # α(e^x − 1) on min(x, 0): exp never sees a positive number (no overflow), and the
        # result is 0 where x > 0. In place: one new array and few passes over memory.
        y = np.minimum(x, 0)
        np.expm1(y, out=y)
        if self.alpha != 1.0:
            y *= self.alpha
        if self.alpha <= 1.0:
            # x where x > 0 (there y = 0 < x); where x <= 0, α(e^x − 1) >= x for α <= 1
            np.maximum(y, x, out=y)
        else:
            y += np.maximum(x, 0)
        self._y = y
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """dX = dY ∘ where(Y > 0, 1, Y + α) (fast form, see the class docstring).

        Inputs: dout, dY of shape (S, D). Returns dX, shape (S, D).
        """
        y = self._y
        if y is None:
            raise RuntimeError("ELU.backward called before forward")
        dx = np.minimum(y, 0)
        dx += self.alpha  # y + α = α e^x where x <= 0; α where x > 0 (1 for the default α)
        if self.alpha != 1.0:
            dx += dx.dtype.type(1 - self.alpha) * (y > 0)  # 1 where x > 0
        dx *= dout
        return dx

    def __repr__(self) -> str:
        return f"ELU(alpha={self.alpha})"


class ReLU(Module):
    """Rectified linear unit.

    forward:  Y = max(X, 0)                X (S, D) -> Y (S, D)
    backward: dX = dY ∘ [Y > 0]            dY (S, D) -> dX (S, D)

    (dy/dx = 1 if x > 0 else 0; we take 0 at x = 0.)
    """

    def __init__(self) -> None:
        super().__init__()
        self._y: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Inputs: x, shape (S, D). Returns y, shape (S, D). Caches y (y > 0 exactly if x > 0)."""
        y = np.maximum(x, 0)
        self._y = y
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """dx = dout ∘ [y > 0]. Inputs: dout, shape (S, D). Returns (S, D)."""
        y = self._y
        if y is None:
            raise RuntimeError("ReLU.backward called before forward")
        return dout * (y > 0)


class Tanh(Module):
    """Hyperbolic tangent.

    forward:  Y = tanh(X)                  X (S, D) -> Y (S, D)
    backward: dX = dY ∘ (1 − Y²)           dY (S, D) -> dX (S, D)   (dy/dx = 1 − tanh² x)
    """

    def __init__(self) -> None:
        super().__init__()
        self._y: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Inputs: x, shape (S, D). Returns y, shape (S, D). Caches y."""
        y = np.tanh(x)
        self._y = y
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """dx = dout ∘ (1 − y²). Inputs: dout, shape (S, D). Returns (S, D)."""
        y = self._y
        if y is None:
            raise RuntimeError("Tanh.backward called before forward")
        return dout * (1 - y * y)


class SoftMax(Module):
    """Row-wise softmax (docs/derivations.md, "Softmax").

    forward:  Y_ic = exp(X_ic) / Σ_k exp(X_ik)          X (S, C) -> Y (S, C)
    backward: dX = Y ∘ (dY − rowsum(dY ∘ Y))             dY (S, C) -> dX (S, C)
              (row i: dX_i = J_iᵀ dY_i with the Jacobian J_i = diag(Y_i) − Y_i Y_iᵀ)

    Forward subtracts the row maximum first (the "max trick"): softmax is invariant to adding a
    constant per row, and afterwards every exponent is <= 0, so exp cannot overflow and the
    largest term is exactly 1, so the denominator cannot underflow to 0.
    """

    def __init__(self) -> None:
        super().__init__()
        self._y: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Inputs: x, logits of shape (S, C). Returns y, probabilities (S, C). Caches y."""
        e = np.exp(x - x.max(axis=1, keepdims=True))
        y = e / e.sum(axis=1, keepdims=True)
        self._y = y
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Jacobian-vector product dX = Y ∘ (dY − rowsum(dY ∘ Y)).

        Inputs: dout, dL/dY of shape (S, C). Returns dL/dX, shape (S, C).
        """
        y = self._y
        if y is None:
            raise RuntimeError("SoftMax.backward called before forward")
        return y * (dout - np.sum(dout * y, axis=1, keepdims=True))


def _check_targets(targets: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Validate targets against (S, C); return True for integer labels, False for one-hot."""
    targets = np.asarray(targets)
    if targets.ndim == 1 and np.issubdtype(targets.dtype, np.integer):
        if targets.shape[0] != shape[0]:
            raise ValueError(f"got {targets.shape[0]} labels for a batch of {shape[0]}")
        return True
    if targets.shape != shape:
        raise ValueError(
            f"targets must be integer labels of shape ({shape[0]},) or one-hot of shape "
            f"{shape}, got {targets.dtype} array of shape {targets.shape}"
        )
    return False


class CrossEntropy:
    """Mean cross-entropy of probabilities X against targets T, L = −(1/S) Σ_ic T_ic log X_ic.

    ``forward(probs, targets)`` returns L and ``backward(probs, targets)`` returns
    dL/dX = −(1/S) T / X. ``targets`` are one-hot, shape (S, C), or integer labels, shape (S,).

    Probabilities are clipped from below at ``eps = 1e-12`` inside log and the division. A
    float32 softmax underflows to exactly 0 once a logit trails the maximum by ~104, and then
    log 0 = −inf makes the loss infinite, T/0 makes the gradient inf (or 0/0 = NaN where
    T = 0), and 0·log 0 = NaN poisons the sum. With the clip a sample's loss is at most
    −log(1e-12) ≈ 27.6 and the gradient at most 1/(S·1e-12), finite in float32 (1e-12 is a
    normal float32); where X >= eps, which is every probability that matters, the result is
    exact. We do not clip at ``np.finfo(np.float32).tiny`` (1.2e-38) because 1/tiny ≈ 8.5e37 is
    a factor 4 from float32 overflow.

    For training prefer :class:`SoftmaxCrossEntropy`, which never forms log of a probability.
    """

    eps = 1e-12

    def forward(self, probs: np.ndarray, targets: np.ndarray) -> float:
        """Inputs: probs X (S, C) with rows summing to 1; targets (S, C) or (S,). Returns L."""
        labels = _check_targets(targets, probs.shape)
        S = probs.shape[0]
        log_x = np.log(np.maximum(probs, self.eps))
        if labels:
            return float(-log_x[np.arange(S), targets].sum() / S)
        return float(-(targets * log_x).sum() / S)

    def backward(self, probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """dL/dX = −(1/S) T / X. Inputs as in forward. Returns dL/dX, shape (S, C)."""
        labels = _check_targets(targets, probs.shape)
        S = probs.shape[0]
        x = np.maximum(probs, self.eps)
        if labels:
            dx = np.zeros_like(x)
            rows = np.arange(S)
            dx[rows, targets] = -1 / (S * x[rows, targets])
            return dx
        return -(targets / x) / S

    __call__ = forward

    def __repr__(self) -> str:
        return "CrossEntropy()"


class SoftmaxCrossEntropy:
    """Softmax followed by cross-entropy, fused, on logits Z of shape (S, C).

    Forward: log P_ic = z_ic − lse_i with z = Z − rowmax(Z) and lse_i = log Σ_k exp(z_ik)
    (stable log-sum-exp), L = −(1/S) Σ_ic T_ic log P_ic. No probability is ever put through
    log, so the loss is finite for any finite logits.

    Backward: dL/dZ = (P − T) / S (for target rows summing to 1, e.g. one-hot), much cheaper
    than the SoftMax Jacobian-vector product followed by −T/(S P).

    ``forward(logits, targets)`` caches P (as ``self.probs``) and the targets;
    ``backward(dloss=1.0)`` returns dloss · dL/dZ. Shapes: Z, P, T (S, C) (or T (S,) integer
    labels), L a scalar, dL/dZ (S, C).

    With integer labels y the one-hot T (T_ic = [c = y_i]) is never formed: the loss picks
    log P_{i, y_i} by indexing and the gradient subtracts 1 at (i, y_i), which is the same
    formula, not a faster form of it.
    """

    def __init__(self) -> None:
        self.probs: np.ndarray | None = None
        self._targets: np.ndarray | None = None
        self._labels = False

    def forward(self, logits: np.ndarray, targets: np.ndarray) -> float:
        """Inputs: logits Z (S, C); targets one-hot (S, C) or integer labels (S,). Returns L."""
        self._labels = _check_targets(targets, logits.shape)
        S = logits.shape[0]
        z = logits - logits.max(axis=1, keepdims=True)
        exp_z = np.exp(z)
        sum_exp = exp_z.sum(axis=1, keepdims=True)
        lse = np.log(sum_exp)
        if self._labels:
            loss = -(z[np.arange(S), targets] - lse[:, 0]).sum() / S
        else:
            loss = -(targets * (z - lse)).sum() / S
        exp_z /= sum_exp
        self.probs = exp_z
        self._targets = targets
        return float(loss)

    def backward(self, dloss: float = 1.0) -> np.ndarray:
        """dL/dZ = dloss · (P − T)/S. Returns shape (S, C)."""
        if self.probs is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward called before forward")
        P, T = self.probs, self._targets
        S = P.shape[0]
        if self._labels:
            dz = P.copy()
            dz[np.arange(S), T] -= 1
        else:
            dz = P - T
        dz *= dloss / S
        return dz

    __call__ = forward

    def __repr__(self) -> str:
        return "SoftmaxCrossEntropy()"
