"""Conjugacy coefficients (beta) of nonlinear conjugate gradient.

The new search direction is :math:`d_{k+1} = -g_{k+1} + \\beta_k d_k`. Every formula here takes the
inner products of :class:`DirectionProducts`, which the optimizer computes in one pass over the
parameters, so each formula is a few floating-point operations on the host.

Notation: :math:`g = g_{k+1}` is the new gradient, :math:`g_- = g_k` the previous one,
:math:`d = d_k` the previous direction and :math:`y = g - g_-`.

References:
    M. R. Hestenes and E. Stiefel, "Methods of conjugate gradients for solving linear systems", 1952.
    R. Fletcher and C. M. Reeves, "Function minimization by conjugate gradients", 1964.
    E. Polak and G. Ribiere, "Note sur la convergence de methodes de directions conjuguees", 1969.
    Y. H. Dai and Y. Yuan, "A nonlinear conjugate gradient method with a strong global convergence
    property", SIAM J. Optim. 10(1), 1999.
    W. W. Hager and H. Zhang, "A new conjugate gradient method with guaranteed descent and an
    efficient line search", SIAM J. Optim. 16(1):170-192, 2005.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "BETA_FORMULAS",
    "DirectionProducts",
    "compute_beta",
    "dai_yuan",
    "fletcher_reeves",
    "hager_zhang",
    "hestenes_stiefel",
    "polak_ribiere_plus",
]

# Hager and Zhang's eta in the lower bound of their beta (SIAM J. Optim. 16(1), 2005, eq. 1.6).
HAGER_ZHANG_ETA = 0.01


@dataclass(frozen=True)
class DirectionProducts:
    """Inner products of the new gradient ``g``, the previous gradient ``g_-`` and direction ``d``.

    Attributes:
        grad_sq: :math:`g^T g`.
        prev_grad_sq: :math:`g_-^T g_-`.
        grad_dot_diff: :math:`g^T y` with :math:`y = g - g_-`.
        direction_dot_diff: :math:`d^T y`.
        diff_sq: :math:`y^T y`.
        grad_dot_direction: :math:`g^T d`.
        direction_sq: :math:`d^T d`.
    """

    grad_sq: float
    prev_grad_sq: float
    grad_dot_diff: float
    direction_dot_diff: float
    diff_sq: float
    grad_dot_direction: float
    direction_sq: float

    @property
    def grad_dot_prev_grad(self) -> float:
        """:math:`g^T g_- = g^T g - g^T y`, the quantity of Powell's restart test."""
        return self.grad_sq - self.grad_dot_diff


def _ratio(numerator: float, denominator: float) -> float:
    """Divide, returning 0 (a restart to steepest descent) for a zero or non-finite quotient."""
    if denominator == 0.0:
        return 0.0

    quotient = numerator / denominator
    return quotient if math.isfinite(quotient) else 0.0


def polak_ribiere_plus(products: DirectionProducts) -> float:
    """Return the Polak-Ribiere coefficient clipped at zero, :math:`\\max(0, g^T y / g_-^T g_-)`."""
    return max(0.0, _ratio(products.grad_dot_diff, products.prev_grad_sq))


def fletcher_reeves(products: DirectionProducts) -> float:
    """Return the Fletcher-Reeves coefficient :math:`g^T g / g_-^T g_-`."""
    return _ratio(products.grad_sq, products.prev_grad_sq)


def hestenes_stiefel(products: DirectionProducts) -> float:
    """Return the Hestenes-Stiefel coefficient :math:`g^T y / d^T y`.

    A non-positive :math:`d^T y` (possible only when the last line search missed the Wolfe
    curvature condition) returns 0.
    """
    if products.direction_dot_diff <= 0.0:
        return 0.0

    return _ratio(products.grad_dot_diff, products.direction_dot_diff)


def dai_yuan(products: DirectionProducts) -> float:
    """Return the Dai-Yuan coefficient :math:`g^T g / d^T y`, or 0 when :math:`d^T y \\le 0`."""
    if products.direction_dot_diff <= 0.0:
        return 0.0

    return _ratio(products.grad_sq, products.direction_dot_diff)


def hager_zhang(products: DirectionProducts, eta: float = HAGER_ZHANG_ETA) -> float:
    """Return the Hager-Zhang coefficient with its lower bound.

    .. math::

        \\beta^N = \\frac{1}{d^T y}\\Big(y - 2 d \\frac{y^T y}{d^T y}\\Big)^T g, \\qquad
        \\beta = \\max\\Big(\\beta^N, \\frac{-1}{\\lVert d \\rVert \\min(\\eta, \\lVert g_- \\rVert)}\\Big).

    The lower bound keeps the method globally convergent for general nonlinear functions.
    A non-positive :math:`d^T y` returns 0.
    """
    curvature = products.direction_dot_diff
    if curvature <= 0.0:
        return 0.0

    unbounded = _ratio(
        products.grad_dot_diff - 2.0 * products.diff_sq * products.grad_dot_direction / curvature,
        curvature,
    )

    scale = math.sqrt(products.direction_sq) * min(eta, math.sqrt(products.prev_grad_sq))
    lower_bound = -1.0 / scale if scale > 0.0 else -math.inf
    return max(unbounded, lower_bound)


BETA_FORMULAS: dict[str, Callable[[DirectionProducts], float]] = {
    "pr+": polak_ribiere_plus,
    "fr": fletcher_reeves,
    "hs": hestenes_stiefel,
    "dy": dai_yuan,
    "hz": hager_zhang,
}


def compute_beta(name: str, products: DirectionProducts) -> float:
    """Evaluate the beta formula called ``name`` ('pr+', 'fr', 'hs', 'dy' or 'hz').

    Raises:
        ValueError: if ``name`` is not one of the formulas above.
    """
    formula = BETA_FORMULAS.get(name)
    if formula is None:
        expected = ", ".join(repr(key) for key in BETA_FORMULAS)
        raise ValueError(f"Invalid beta: {name!r}. Expected one of {expected}.")

    return formula(products)
