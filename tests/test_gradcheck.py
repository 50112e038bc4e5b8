"""Tests for cifarlab.ops.gradcheck: the checker must pass correct code and catch wrong code."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cifarlab.numpy_nn import Linear, Module
from cifarlab.ops.gradcheck import check_module, numerical_gradient, rel_error

FAST = settings(max_examples=25, deadline=None)


@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**32 - 1))
def test_numerical_gradient_of_known_functions(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    a = rng.standard_normal(shape)
    original = x.copy()
    grad = numerical_gradient(lambda z: np.sum(a * z**3), x)
    np.testing.assert_allclose(grad, 3 * a * original**2, rtol=1e-6, atol=1e-8)
    assert grad.shape == x.shape and grad.dtype == np.float64
    np.testing.assert_array_equal(x, original)  # perturbations are undone


def test_numerical_gradient_eps_controls_truncation_error():
    x = np.array([1.0])
    f = np.exp  # third derivative e: central-difference error ≈ eps²/6 · e
    err_coarse = abs(numerical_gradient(lambda z: f(z).sum(), x, eps=1e-2)[0] - np.e)
    err_fine = abs(numerical_gradient(lambda z: f(z).sum(), x, eps=1e-5)[0] - np.e)
    assert err_coarse == pytest.approx(1e-4 / 6 * np.e, rel=1e-2)
    assert err_fine < 1e-8


def test_rel_error_formula():
    a = np.array([1.0, -2.0, 0.0])
    b = np.array([1.0, -2.5, 1e-3])
    # max |a-b| = 0.5 ; max(|a|+|b|) = 4.5
    assert rel_error(a, b) == pytest.approx(0.5 / 4.5)
    assert rel_error(b, a) == rel_error(a, b)
    assert rel_error(a, a) == 0.0
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_error(np.zeros(2), np.array([1e-13, 0.0])) == pytest.approx(0.1)  # floor 1e-12
    assert rel_error(np.array([1.0]), np.array([-1.0])) == 1.0
    with pytest.raises(ValueError):
        rel_error(np.zeros(2), np.zeros(3))


def test_check_module_passes_correct_linear():
    rng = np.random.default_rng(0)
    layer = Linear(4, 3, init="he", rng=rng, dtype=np.float64)
    errors = check_module(layer, rng.standard_normal((5, 4)), rng.standard_normal((5, 3)))
    assert set(errors) == {"x", "weight", "bias"}
    assert max(errors.values()) < 1e-8


class FirstRowBiasLinear(Linear):
    """The seed's bug: db = dY[0] instead of the sum over the batch."""

    def backward(self, dout):
        dx = super().backward(dout)
        self.grads["bias"][...] = dout[0]
        return dx


class WrongSquare(Module):
    """y = x², with backward forgetting the factor 2."""

    def forward(self, x):
        self.x = x
        return x**2

    def backward(self, dout):
        return dout * self.x


def test_check_module_catches_wrong_gradients():
    rng = np.random.default_rng(1)
    layer = FirstRowBiasLinear(4, 3, rng=rng, dtype=np.float64)
    errors = check_module(layer, rng.standard_normal((5, 4)), rng.standard_normal((5, 3)))
    assert errors["bias"] > 1e-2
    assert errors["weight"] < 1e-6 and errors["x"] < 1e-6
    x = rng.standard_normal((2, 3))
    assert check_module(WrongSquare(), x, np.ones_like(x))["x"] == pytest.approx(1 / 3)


def test_check_module_without_input_grad_and_shape_check():
    rng = np.random.default_rng(2)
    layer = Linear(3, 2, rng=rng, dtype=np.float64, input_grad=False)
    x = rng.standard_normal((4, 3))
    errors = check_module(layer, x, rng.standard_normal((4, 2)))
    assert set(errors) == {"weight", "bias"}
    with pytest.raises(ValueError):
        check_module(layer, x, np.ones((4, 3)))
