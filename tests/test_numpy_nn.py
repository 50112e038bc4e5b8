"""Tests for cifarlab.numpy_nn: every backward pass against numerical gradients, and the rest."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from cifarlab.numpy_nn import (
    ELU,
    MLP,
    SGD,
    Adam,
    CrossEntropy,
    Linear,
    ReLU,
    SoftMax,
    SoftmaxCrossEntropy,
    Tanh,
)
from cifarlab.ops.gradcheck import check_module, numerical_gradient, rel_error

TOL = 1e-6
FAST = settings(max_examples=25, deadline=None)

batch = st.integers(1, 6)
features = st.integers(1, 8)
seeds = st.integers(0, 2**32 - 1)


def away_from_zero(x: np.ndarray, margin: float = 1e-2) -> np.ndarray:
    """Move entries out of (-margin, margin), where ReLU's kink would spoil finite differences."""
    return np.where(np.abs(x) < margin, np.copysign(margin, x) + x, x)


def random_probs(rng: np.random.Generator, S: int, C: int) -> np.ndarray:
    p = rng.uniform(0.1, 1.0, size=(S, C))
    return p / p.sum(axis=1, keepdims=True)


def one_hot(labels: np.ndarray, C: int) -> np.ndarray:
    return np.eye(C)[labels]


def test_import_does_not_import_torch():
    code = (
        "import sys; import cifarlab.numpy_nn, cifarlab.ops.gradcheck; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# -- Linear ---------------------------------------------------------------------------------


@FAST
@given(S=batch, D=features, M=features, seed=seeds)
def test_linear_gradients(S, D, M, seed):
    rng = np.random.default_rng(seed)
    layer = Linear(D, M, init="he", rng=rng, dtype=np.float64)
    layer.params["bias"][:] = rng.standard_normal(M)
    x, dout = rng.standard_normal((S, D)), rng.standard_normal((S, M))
    errors = check_module(layer, x, dout)
    assert set(errors) == {"x", "weight", "bias"}
    assert max(errors.values()) < TOL, errors


def test_linear_forward_and_backward_formulas():
    rng = np.random.default_rng(0)
    layer = Linear(4, 3, init="he", rng=rng, dtype=np.float64)
    W, b = layer.params["weight"], layer.params["bias"]
    b[:] = [1.0, -2.0, 3.0]
    x, dy = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    np.testing.assert_allclose(layer.forward(x), x @ W.T + b)
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, dy @ W)
    np.testing.assert_allclose(layer.grads["weight"], dy.T @ x)
    assert layer.grads["weight"].shape == W.shape == (3, 4)


@pytest.mark.parametrize("S", [2, 7])
def test_linear_bias_gradient_is_sum_over_batch(S):
    # The seed code used the first row of dY as db; this catches it (rows differ, S > 1).
    rng = np.random.default_rng(S)
    layer = Linear(3, 4, rng=rng, dtype=np.float64)
    dy = rng.standard_normal((S, 4)) + np.arange(S)[:, None]
    layer.forward(rng.standard_normal((S, 3)))
    layer.backward(dy)
    np.testing.assert_allclose(layer.grads["bias"], dy.sum(axis=0))
    assert not np.allclose(layer.grads["bias"], dy[0])


def test_linear_input_grad_false_skips_dx():
    rng = np.random.default_rng(0)
    layer = Linear(3, 2, rng=rng, dtype=np.float64, input_grad=False)
    x, dy = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    layer.forward(x)
    assert layer.backward(dy) is None
    np.testing.assert_allclose(layer.grads["weight"], dy.T @ x)


@pytest.mark.parametrize(
    "init, expected_std",
    [("seed", lambda d, m: 1e-4), ("he", lambda d, m: np.sqrt(2 / d)),
     ("glorot", lambda d, m: np.sqrt(2 / (d + m)))],
)  # fmt: skip
def test_linear_init(init, expected_std):
    D, M = 400, 300
    layer = Linear(D, M, init=init, rng=np.random.default_rng(0))
    W = layer.params["weight"]
    assert W.shape == (M, D) and W.dtype == np.float32
    assert np.all(layer.params["bias"] == 0)
    assert W.std() == pytest.approx(expected_std(D, M), rel=0.02)
    assert abs(W.mean()) < 0.01 * expected_std(D, M)
    again = Linear(D, M, init=init, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(again.params["weight"], W)


def test_linear_rejects_unknown_init_and_dtype():
    with pytest.raises(ValueError):
        Linear(2, 2, init="xavier")
    with pytest.raises(ValueError):
        Linear(2, 2, dtype=np.int32)


# -- activations and softmax -----------------------------------------------------------------


@FAST
@given(S=batch, D=features, seed=seeds, which=st.sampled_from(["elu", "relu", "tanh"]))
def test_activation_gradients(S, D, seed, which):
    rng = np.random.default_rng(seed)
    module = {"elu": ELU(), "relu": ReLU(), "tanh": Tanh()}[which]
    x = away_from_zero(2 * rng.standard_normal((S, D)))
    errors = check_module(module, x, rng.standard_normal((S, D)))
    assert errors["x"] < TOL, errors


def test_activation_forward_values():
    x = np.array([[-2.0, -0.5, 0.0, 0.5, 3.0]])
    np.testing.assert_allclose(ELU().forward(x), np.where(x > 0, x, np.exp(x) - 1))
    np.testing.assert_allclose(ELU(alpha=0.5).forward(x), np.where(x > 0, x, 0.5 * np.expm1(x)))
    np.testing.assert_allclose(ReLU().forward(x), [[0, 0, 0, 0.5, 3.0]])
    np.testing.assert_allclose(Tanh().forward(x), np.tanh(x))
    # ELU never evaluates exp of a large positive input (no overflow warning, exact identity)
    with np.errstate(over="raise"):
        np.testing.assert_array_equal(ELU().forward(np.array([[1000.0]])), [[1000.0]])


@pytest.mark.parametrize("alpha", [0.3, 2.0])
def test_elu_alpha_gradient(alpha):
    rng = np.random.default_rng(1)
    x = away_from_zero(2 * rng.standard_normal((4, 5)))
    elu = ELU(alpha=alpha)
    np.testing.assert_allclose(elu.forward(x), np.where(x > 0, x, alpha * np.expm1(x)))
    assert check_module(elu, x, rng.standard_normal((4, 5)))["x"] < TOL


@FAST
@given(S=batch, C=features, seed=seeds)
def test_softmax_gradients(S, C, seed):
    rng = np.random.default_rng(seed)
    x = 3 * rng.standard_normal((S, C))
    errors = check_module(SoftMax(), x, rng.standard_normal((S, C)))
    assert errors["x"] < TOL, errors


def test_softmax_backward_is_jacobian_vector_product():
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    sm = SoftMax()
    y = sm.forward(x)
    dx = sm.backward(dy)
    for i in range(3):  # explicit Jacobian J = diag(y) - y yᵀ, one row at a time
        J = np.diag(y[i]) - np.outer(y[i], y[i])
        np.testing.assert_allclose(dx[i], J.T @ dy[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_finite_for_extreme_logits(dtype):
    x = np.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, -1000.0], [1000.0, 1000.0, 999.0]])
    x = x.astype(dtype)
    sm = SoftMax()
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow is fine
        y = sm.forward(x)
        dx = sm.backward(np.ones_like(x))
    assert y.dtype == dtype
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    np.testing.assert_allclose(y.sum(axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(y[0], [1, 0, 0], atol=1e-7)
    np.testing.assert_allclose(y[1], [1 / 3] * 3, rtol=1e-6)


# -- the code against the plain formulas of the docstrings -------------------------------------
# modules.py keeps a faster form of a formula only where it pays (benchmarks/
# bench_numpy_fast_forms.py); these tests pin every module, fast form or not, to the plain formula
# written out here in NumPy, forward and backward, in float64.


def plain_elu(x, dy, alpha):
    """Y = where(X > 0, X, α(e^X − 1)); dX = dY ∘ f'(X), f'(x) = 1 if x > 0 else α e^x."""
    with np.errstate(over="ignore"):  # np.where evaluates e^x for the large positive x too
        y = np.where(x > 0, x, alpha * (np.exp(x) - 1))
        dx = dy * np.where(x > 0, 1.0, alpha * np.exp(x))
    return y, dx


def plain_softmax(x, dy):
    """Y_ic = e^{X_ic} / Σ_k e^{X_ik}; dX_i = J_iᵀ dY_i with J_i = diag(Y_i) − Y_i Y_iᵀ."""
    e = np.exp(x - x.max(axis=1, keepdims=True))
    y = e / e.sum(axis=1, keepdims=True)
    jac = np.einsum("ij,jk->ijk", y, np.eye(x.shape[1])) - np.einsum("ij,ik->ijk", y, y)
    return y, np.einsum("ijk,ij->ik", jac, dy)


def fwd_bwd(module, x, dy):
    return module.forward(x), module.backward(dy)


def assert_tight(got, want, what):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=what)


@pytest.mark.parametrize("S, D, M", [(1, 1, 1), (5, 7, 3), (32, 40, 10)])
@pytest.mark.parametrize("input_grad", [True, False])
def test_fast_forms_match_plain_formulas_linear(S, D, M, input_grad):
    """Y = X Wᵀ + b; dW = dYᵀ X, db = Σ_s dY, dX = dY W, with W as state_dict shows it (M, D)."""
    rng = np.random.default_rng(S * D * M)
    layer = Linear(D, M, init="he", rng=rng, dtype=np.float64, input_grad=input_grad)
    layer.params["bias"][:] = rng.standard_normal(M)
    W, b = layer.params["weight"].copy(), layer.params["bias"].copy()
    assert W.shape == (M, D) and b.shape == (M,)
    x, dy = rng.standard_normal((S, D)), rng.standard_normal((S, M))
    y, dx = fwd_bwd(layer, x, dy)
    assert_tight(y, x @ W.T + b[None, :], "Y")
    assert_tight(layer.grads["weight"], np.einsum("sm,sd->md", dy, x), "dW")
    assert_tight(layer.grads["bias"], dy.sum(axis=0), "db")
    if input_grad:
        assert_tight(dx, np.einsum("sm,md->sd", dy, W), "dX")
    else:
        assert dx is None
    # backward overwrites (the optimiser holds these very arrays): a second pass gives the same
    grads = [layer.grads["weight"], layer.grads["bias"]]
    layer.forward(x), layer.backward(dy)
    assert layer.grads["weight"] is grads[0] and layer.grads["bias"] is grads[1]
    assert_tight(grads[0], np.einsum("sm,sd->md", dy, x), "dW, second pass")


@pytest.mark.parametrize("alpha", [1.0, 0.3, 2.0])
def test_fast_forms_match_plain_formulas_elu(alpha):
    """ELU's fast form (in-place expm1/max forward, min(y, 0) + α backward) vs the plain one."""
    rng = np.random.default_rng(20)
    x = 3 * rng.standard_normal((16, 9))
    x[0, :5] = [0.0, -0.0, 1e-300, -1e-300, 1e-8]  # the kink and its neighbours
    x[1, :4] = [-50.0, -800.0, 50.0, 800.0]  # far out on both sides (no overflow in the code)
    dy = rng.standard_normal(x.shape)
    with np.errstate(over="raise"):
        y, dx = fwd_bwd(ELU(alpha=alpha), x, dy)
    y_ref, dx_ref = plain_elu(x, dy, alpha)
    assert_tight(y, y_ref, "Y")
    assert_tight(dx, dx_ref, "dX")
    assert dx[0, 0] == alpha * dy[0, 0]  # left derivative α at x = 0


@pytest.mark.parametrize("which", ["relu", "tanh", "softmax"])
def test_fast_forms_match_plain_formulas_activations(which):
    rng = np.random.default_rng(21)
    x = 3 * rng.standard_normal((12, 10))
    x[0, :2] = 0.0
    dy = rng.standard_normal(x.shape)
    if which == "relu":
        got, want = fwd_bwd(ReLU(), x, dy), (np.maximum(x, 0), dy * (x > 0))
    elif which == "tanh":
        got, want = fwd_bwd(Tanh(), x, dy), (np.tanh(x), dy * (1 - np.tanh(x) ** 2))
    else:
        got, want = fwd_bwd(SoftMax(), x, dy), plain_softmax(x, dy)
    assert_tight(got[0], want[0], "Y")
    assert_tight(got[1], want[1], "dX")


@pytest.mark.parametrize("labels", [True, False])
def test_fast_forms_match_plain_formulas_softmax_cross_entropy(labels):
    """L = −(1/S) Σ T ∘ log softmax(Z), dL/dZ = (P − T)/S, with T one-hot, for labels too."""
    rng = np.random.default_rng(22)
    S, C = 9, 5
    z, y = 4 * rng.standard_normal((S, C)), rng.integers(0, C, size=S)
    T = one_hot(y, C)
    loss_fn = SoftmaxCrossEntropy()
    loss = loss_fn.forward(z, y if labels else T)
    dz = loss_fn.backward(0.7)
    P = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)  # small logits: no max trick needed
    assert loss == pytest.approx(-(T * np.log(P)).sum() / S, rel=1e-13)
    assert_tight(dz, 0.7 * (P - T) / S, "dZ")


@pytest.mark.parametrize("module", [Linear(6, 4, init="he"), ELU(), ELU(0.5), ReLU(), Tanh(), SoftMax()])
def test_modules_keep_float32(module):
    """No silent float64 upcast in any form (a Python scalar in a formula stays weak)."""
    rng = np.random.default_rng(23)
    x = rng.standard_normal((3, 6), dtype=np.float32)
    y = module.forward(x)
    dx = module.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in module.grads.values())


# -- losses -----------------------------------------------------------------------------------


@FAST
@given(S=batch, C=st.integers(2, 8), seed=seeds, labels=st.booleans())
def test_cross_entropy_gradients(S, C, seed, labels):
    rng = np.random.default_rng(seed)
    probs = random_probs(rng, S, C)
    y = rng.integers(0, C, size=S)
    targets = y if labels else one_hot(y, C)
    ce = CrossEntropy()
    num = numerical_gradient(lambda p: ce.forward(p, targets), probs)
    analytic = ce.backward(probs, targets)
    assert rel_error(analytic, num) < TOL
    expected_loss = -np.mean(np.log(probs[np.arange(S), y]))
    assert ce.forward(probs, targets) == pytest.approx(expected_loss, rel=1e-12)


def test_cross_entropy_finite_when_probability_is_zero():
    probs = np.array([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], dtype=np.float32)
    targets = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    ce = CrossEntropy()
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow is fine
        for t in (targets, targets.argmax(axis=1)):
            loss = ce.forward(probs, t)
            grad = ce.backward(probs, t)
            assert np.isfinite(loss) and np.all(np.isfinite(grad))
            assert loss == pytest.approx(-np.log(ce.eps), rel=1e-4)  # both samples: -log(eps)/1
            assert grad.dtype == np.float32


@pytest.mark.parametrize("loss_cls", [CrossEntropy, SoftmaxCrossEntropy])
def test_integer_labels_equal_one_hot(loss_cls):
    rng = np.random.default_rng(3)
    y = np.array([2, 0, 1, 2, 3])
    inputs = random_probs(rng, 5, 4) if loss_cls is CrossEntropy else rng.standard_normal((5, 4))
    results = []
    for targets in (y, one_hot(y, 4)):
        loss_fn = loss_cls()
        loss = loss_fn.forward(inputs, targets)
        grad = loss_fn.backward(inputs, targets) if loss_cls is CrossEntropy else loss_fn.backward()
        results.append((loss, grad))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-12)


def test_losses_reject_bad_targets():
    probs = np.full((2, 3), 1 / 3)
    with pytest.raises(ValueError):
        CrossEntropy().forward(probs, np.array([0, 1, 2]))
    with pytest.raises(ValueError):
        SoftmaxCrossEntropy().forward(probs, np.ones((2, 4)))


@FAST
@given(S=batch, C=st.integers(2, 8), seed=seeds, labels=st.booleans())
def test_fused_softmax_cross_entropy_matches_chain(S, C, seed, labels):
    rng = np.random.default_rng(seed)
    z = 2 * rng.standard_normal((S, C))
    y = rng.integers(0, C, size=S)
    targets = y if labels else one_hot(y, C)
    fused = SoftmaxCrossEntropy()
    loss = fused.forward(z, targets)
    dz = fused.backward()
    # chain: SoftMax then CrossEntropy
    sm, ce = SoftMax(), CrossEntropy()
    probs = sm.forward(z)
    assert loss == pytest.approx(ce.forward(probs, targets), rel=1e-10)
    np.testing.assert_allclose(dz, sm.backward(ce.backward(probs, targets)), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(dz, (probs - one_hot(y, C)) / S, rtol=1e-10, atol=1e-15)
    # and against finite differences of the fused loss itself
    num = numerical_gradient(lambda zz: SoftmaxCrossEntropy().forward(zz, targets), z)
    assert rel_error(dz, num) < TOL
    # upstream gradient scales linearly
    np.testing.assert_allclose(fused.backward(2.5), 2.5 * dz)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_finite_for_extreme_logits(dtype):
    z = np.array([[1000.0, -1000.0], [-1000.0, 1000.0]], dtype=dtype)
    y = np.array([1, 1])
    fused = SoftmaxCrossEntropy()
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow is fine
        loss = fused.forward(z, y)
        dz = fused.backward()
    assert loss == pytest.approx(1000.0, rel=1e-6)  # (2000 + 0) / 2
    assert dz.dtype == dtype and np.all(np.isfinite(dz))


# -- MLP --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "activation, hidden",
    [("elu", [5, 4]), ("relu", [5, 4]), ("tanh", [5, 4]), ("elu", [])],
)
def test_mlp_gradients(activation, hidden):
    rng = np.random.default_rng(4)
    net = MLP(6, hidden, 3, activation=activation, init="he", dtype=np.float64, rng=rng)
    for p in net.params.values():  # non-zero biases too
        p += 0.1 * rng.standard_normal(p.shape)
    net.input_grad = True
    x, dprobs = rng.standard_normal((4, 6)), rng.standard_normal((4, 3))
    errors = check_module(net, x, dprobs)
    n_linear = len(hidden) + 1
    assert set(errors) == {"x"} | {f"layers.{2 * i}.{k}" for i in range(n_linear)
                                   for k in ("weight", "bias")}  # fmt: skip
    assert max(errors.values()) < TOL, errors


def test_mlp_logits_path_with_fused_loss():
    rng = np.random.default_rng(5)
    net = MLP(5, [4], 3, activation="tanh", init="he", dtype=np.float64, rng=rng)
    x, y = rng.standard_normal((6, 5)), rng.integers(0, 3, size=6)
    loss_fn = SoftmaxCrossEntropy()

    def loss(_=None):
        return loss_fn.forward(net.logits(x), y)

    loss()
    assert net.backward_logits(loss_fn.backward()) is None  # input_grad is off by default
    analytic = {k: g.copy() for k, g in net.grads.items()}
    for k, p in net.params.items():
        assert rel_error(analytic[k], numerical_gradient(loss, p)) < TOL, k
    # probabilities path gives the same parameter gradients
    probs = net.forward(x)
    net.backward(CrossEntropy().backward(probs, y))
    for k, g in net.grads.items():
        np.testing.assert_allclose(g, analytic[k], rtol=1e-7, atol=1e-12)


def test_mlp_structure_and_logistic_regression():
    net = MLP(12, [], 4, rng=np.random.default_rng(0))
    assert [type(m).__name__ for m in net.layers] == ["Linear"]
    assert list(net.state_dict()) == ["layers.0.weight", "layers.0.bias"]
    probs = net.forward(np.ones((3, 2, 2, 3), dtype=np.float32))  # flattened to (3, 12)
    assert probs.shape == (3, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-6)
    deep = MLP(12, [7, 5], 4, activation="relu")
    assert [type(m).__name__ for m in deep.layers] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert deep.num_parameters() == 12 * 7 + 7 + 7 * 5 + 5 + 5 * 4 + 4
    with pytest.raises(ValueError):
        MLP(12, [3], 4, activation="gelu")


def test_mlp_float32_end_to_end():
    # No silent float64 upcasts anywhere on the training path (they would halve the speed).
    rng = np.random.default_rng(6)
    net = MLP(20, [16, 8], 10, rng=rng, init="he")
    x = rng.standard_normal((5, 20), dtype=np.float32)
    y = rng.integers(0, 10, size=5)
    loss_fn = SoftmaxCrossEntropy()
    z = net.logits(x)
    loss_fn.forward(z, y)
    dz = loss_fn.backward()
    net.input_grad = True
    dx = net.backward_logits(dz)
    assert z.dtype == dz.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in net.grads.values())
    probs = net.forward(x)
    assert probs.dtype == np.float32
    assert net.backward(CrossEntropy().backward(probs, y)).dtype == np.float32


def test_mlp_state_dict_round_trip():
    a = MLP(6, [5], 3, init="he", rng=np.random.default_rng(7))
    b = MLP(6, [5], 3, init="he", rng=np.random.default_rng(8))
    x = np.random.default_rng(9).standard_normal((4, 6), dtype=np.float32)
    assert not np.allclose(a.forward(x), b.forward(x))
    state = a.state_dict()
    assert set(state) == {"layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"}
    for k, v in state.items():  # copies, not views of the live parameters
        assert not np.shares_memory(v, a.params[k])
    b.load_state_dict(state)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    with pytest.raises(KeyError):
        b.load_state_dict({k: v for k, v in state.items() if k != "layers.2.bias"})
    with pytest.raises(ValueError):
        b.load_state_dict({**state, "layers.2.bias": np.zeros(4)})


def test_mlp_training_reduces_loss():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((32, 8), dtype=np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    net = MLP(8, [16], 3, init="he", rng=rng)
    loss_fn = SoftmaxCrossEntropy()
    opt = SGD(net.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(60):
        losses.append(loss_fn.forward(net.logits(x), y))
        net.backward_logits(loss_fn.backward())
        opt.step()
    assert losses[-1] < 0.25 * losses[0]


# -- optimizers ---------------------------------------------------------------------------------


def make_params(rng, dtype=np.float64):
    p = {"weight": rng.standard_normal((3, 2)).astype(dtype), "bias": rng.standard_normal(3)}
    g = {k: np.zeros_like(v) for k, v in p.items()}
    return p, g


@pytest.mark.parametrize(
    "momentum, nesterov, wd", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.01), (0, 0, 0.1)]
)
def test_sgd_step_matches_formula(momentum, nesterov, wd):
    rng = np.random.default_rng(11)
    p, g = make_params(rng)
    ref = {k: v.copy() for k, v in p.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    opt = SGD([(p, g)], lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for step, lr in enumerate([0.1, 0.05, 0.02]):
        opt.lr = lr  # a schedule sets it each step
        for k in g:
            g[k][...] = rng.standard_normal(g[k].shape)
            d = g[k] + wd * ref[k] if ref[k].ndim >= 2 else g[k]  # no decay on biases (ndim 1)
            buf[k] = momentum * buf[k] + d
            if momentum:
                d = d + momentum * buf[k] if nesterov else buf[k]
            ref[k] = ref[k] - lr * d
        opt.step()
        assert opt.step_count == step + 1
        for k in p:
            np.testing.assert_allclose(p[k], ref[k], rtol=1e-12)


def test_sgd_plain_step_is_minus_lr_times_grad():
    p, g = make_params(np.random.default_rng(12))
    before = {k: v.copy() for k, v in p.items()}
    for k in g:
        g[k][...] = np.arange(g[k].size).reshape(g[k].shape)
    SGD([(p, g)], lr=0.3).step()
    for k in p:
        np.testing.assert_allclose(p[k], before[k] - 0.3 * g[k])


@pytest.mark.parametrize("decoupled", [True, False])
def test_adam_first_step_moves_each_param_by_lr(decoupled):
    rng = np.random.default_rng(13)
    p, g = make_params(rng)
    before = {k: v.copy() for k, v in p.items()}
    for k in g:
        g[k][...] = rng.standard_normal(g[k].shape) * 10.0 ** rng.integers(-3, 3, g[k].shape)
    opt = Adam([(p, g)], lr=1e-3, decoupled=decoupled)
    opt.step()
    for k in p:
        step = p[k] - before[k]
        np.testing.assert_allclose(np.abs(step), 1e-3, rtol=1e-4)
        assert np.all(np.sign(step) == -np.sign(g[k]))


def test_adam_matches_reference_over_steps():
    rng = np.random.default_rng(14)
    for decoupled in (True, False):
        p, g = make_params(rng)
        ref = {k: v.copy() for k, v in p.items()}
        m = {k: np.zeros_like(v) for k, v in p.items()}
        v = {k: np.zeros_like(v) for k, v in p.items()}
        lr, (b1, b2), eps, wd = 0.01, (0.8, 0.99), 1e-6, 0.05
        opt = Adam([(p, g)], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, decoupled=decoupled)
        for t in range(1, 4):
            for k in g:
                g[k][...] = rng.standard_normal(g[k].shape)
                wd_k = wd if ref[k].ndim >= 2 else 0.0  # no decay on biases (ndim 1)
                gk = g[k] if decoupled else g[k] + wd_k * ref[k]
                if decoupled:
                    ref[k] = ref[k] * (1 - lr * wd_k)
                m[k] = b1 * m[k] + (1 - b1) * gk
                v[k] = b2 * v[k] + (1 - b2) * gk**2
                m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
                ref[k] = ref[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
            opt.step()
            for k in p:
                np.testing.assert_allclose(p[k], ref[k], rtol=1e-10)


@pytest.mark.parametrize(
    "make_opt",
    [lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True), lambda ps: Adam(ps, lr=0.01)],
    ids=["sgd", "adam"],
)
def test_optimizer_state_dict_round_trip(make_opt):
    rng = np.random.default_rng(15)
    p1, g1 = make_params(rng, np.float32)
    p2, g2 = {k: v.copy() for k, v in p1.items()}, {k: v.copy() for k, v in g1.items()}
    opt1, opt2 = make_opt([(p1, g1)]), make_opt([(p2, g2)])
    grads = [{k: rng.standard_normal(v.shape) for k, v in g1.items()} for _ in range(5)]

    def step(opt, g, gk):
        for k in g:
            g[k][...] = gk[k]
        opt.step()

    for gk in grads[:3]:
        step(opt1, g1, gk)
    state = opt1.state_dict()
    assert state["step"] == 3 and state["step"].dtype == np.int64
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert any(np.any(v != 0) for k, v in state.items() if k != "step")
    # bring model 2 to model 1's weights, load the optimizer state; then both must agree
    for k in p1:
        p2[k][...] = p1[k]
    opt2.load_state_dict(state)
    assert opt2.step_count == 3
    for gk in grads[3:]:
        step(opt1, g1, gk)
        step(opt2, g2, gk)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])
    with pytest.raises(KeyError):
        opt2.load_state_dict({"step": np.array(1)})


def test_optimizers_accept_mlp_parameters():
    net = MLP(4, [3], 2, rng=np.random.default_rng(16))
    opt = Adam(net.parameters(), lr=0.1)
    assert set(opt.state_dict()) == {
        f"{i}.{k}.{b}" for i in (0, 1) for k in ("weight", "bias") for b in ("exp_avg", "exp_avg_sq")
    } | {"step"}


# -- convolution (docs/derivations.md, bonus section) -----------------------------------------


def conv2d(X: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Valid cross-correlation, stride 1: Y_ij = Σ_ab X_{i+a, j+b} K_ab."""
    return np.einsum("ijab,ab->ij", sliding_window_view(X, K.shape), K)


def test_conv2d_gradients_match_derivation():
    rng = np.random.default_rng(17)
    X, K = rng.standard_normal((4, 4)), rng.standard_normal((2, 2))
    dY = rng.standard_normal((3, 3))

    def L(_=None):
        return float(np.sum(conv2d(X, K) * dY))

    Y = conv2d(X, K)
    # explicit element (1-based in the docs): Y21 = X21 K11 + X22 K12 + X31 K21 + X32 K22
    assert Y[1, 0] == pytest.approx(
        X[1, 0] * K[0, 0] + X[1, 1] * K[0, 1] + X[2, 0] * K[1, 0] + X[2, 1] * K[1, 1]
    )
    num_dK, num_dX = numerical_gradient(L, K), numerical_gradient(L, X)
    # dL/dK11 = Σ_ij dY_ij X_ij ;  dL/dX12 = dY11 K12 + dY12 K11
    assert num_dK[0, 0] == pytest.approx(np.sum(dY * X[:3, :3]), rel=1e-7)
    assert num_dX[0, 1] == pytest.approx(dY[0, 0] * K[0, 1] + dY[0, 1] * K[0, 0], rel=1e-7)
    # general forms: dL/dK = X ⋆ dY (valid correlation); dL/dX = full convolution of dY with K,
    # i.e. correlation of the zero-padded dY with the flipped kernel
    dK = conv2d(X, dY)
    dX = conv2d(np.pad(dY, 1), K[::-1, ::-1])
    assert dK.shape == K.shape and dX.shape == X.shape
    assert rel_error(dK, num_dK) < TOL
    assert rel_error(dX, num_dX) < TOL
