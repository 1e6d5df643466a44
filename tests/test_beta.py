"""Beta formulas against hand-computed values."""

import math

import pytest

from lightning_twophase.optim.beta import (
    BETA_FORMULAS,
    DirectionProducts,
    compute_beta,
    dai_yuan,
    fletcher_reeves,
    hager_zhang,
    hestenes_stiefel,
    polak_ribiere_plus,
)


def products_of(grad, prev_grad, direction):
    """Build DirectionProducts from explicit vectors."""
    diff = [a - b for a, b in zip(grad, prev_grad)]

    def dot(x, y):
        return sum(a * b for a, b in zip(x, y))

    return DirectionProducts(
        grad_sq=dot(grad, grad),
        prev_grad_sq=dot(prev_grad, prev_grad),
        grad_dot_diff=dot(grad, diff),
        direction_dot_diff=dot(direction, diff),
        diff_sq=dot(diff, diff),
        grad_dot_direction=dot(grad, direction),
        direction_sq=dot(direction, direction),
    )


# g = (1, 2), g_- = (3, 1), d = (-3, -1): y = (-2, 1), g.y = 0, d.y = 5, y.y = 5, g.d = -5, d.d = 10.
PRODUCTS = products_of([1.0, 2.0], [3.0, 1.0], [-3.0, -1.0])


def test_fletcher_reeves_value():
    assert fletcher_reeves(PRODUCTS) == pytest.approx(5.0 / 10.0)


def test_polak_ribiere_plus_value():
    products = products_of([2.0, 2.0], [1.0, 0.0], [-1.0, 0.0])
    assert polak_ribiere_plus(products) == pytest.approx((8.0 - 2.0) / 1.0)


def test_polak_ribiere_plus_clips_negative():
    products = products_of([1.0, 0.0], [2.0, 0.0], [-2.0, 0.0])
    assert products.grad_dot_diff < 0.0
    assert polak_ribiere_plus(products) == 0.0


def test_hestenes_stiefel_value():
    products = products_of([2.0, 2.0], [1.0, 0.0], [-1.0, 0.0])
    # y = (1, 2), g.y = 6, d.y = -1 < 0: no Wolfe step can produce this, so beta falls back to 0.
    assert hestenes_stiefel(products) == 0.0
    products = products_of([2.0, 2.0], [1.0, 0.0], [1.0, 1.0])
    assert hestenes_stiefel(products) == pytest.approx(6.0 / 3.0)


def test_dai_yuan_value():
    assert dai_yuan(PRODUCTS) == pytest.approx(5.0 / 5.0)


def test_hager_zhang_value():
    # beta_N = (g.y - 2 y.y g.d / d.y) / d.y = (0 - 2 * 5 * (-5) / 5) / 5 = 2.
    assert hager_zhang(PRODUCTS) == pytest.approx(2.0)


def test_hager_zhang_lower_bound():
    # g.y strongly negative makes beta_N very negative; the bound is -1 / (||d|| min(eta, ||g_-||)).
    products = DirectionProducts(
        grad_sq=1.0, prev_grad_sq=4.0, grad_dot_diff=-100.0, direction_dot_diff=1.0,
        diff_sq=0.0, grad_dot_direction=0.0, direction_sq=4.0,
    )
    assert hager_zhang(products) == pytest.approx(-1.0 / (2.0 * 0.01))


@pytest.mark.parametrize("name", sorted(BETA_FORMULAS))
def test_zero_denominator_gives_zero(name):
    products = DirectionProducts(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    beta = compute_beta(name, products)
    assert math.isfinite(beta)
    assert beta == 0.0


def test_powell_quantity():
    assert PRODUCTS.grad_dot_prev_grad == pytest.approx(1.0 * 3.0 + 2.0 * 1.0)


def test_compute_beta_rejects_unknown_name():
    with pytest.raises(ValueError, match="Invalid beta: 'xx'"):
        compute_beta("xx", PRODUCTS)
