"""ConjugateGradient convergence on closed-form problems."""

import numpy as np
import pytest
import scipy.optimize
import torch

from lightning_twophase.optim import ConjugateGradient
from lightning_twophase.optim.beta import BETA_FORMULAS
from lightning_twophase.optim.cg import StopReason


def spd_quadratic(n=20, condition=100.0, dtype=torch.float64, seed=0):
    """Return (A, b) of f(x) = x^T A x / 2 - b^T x with the given condition number."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0, np.log10(condition), n, dtype=torch.float64)
    matrix = basis @ torch.diag(eigenvalues) @ basis.T
    rhs = torch.randn(n, generator=generator, dtype=torch.float64)
    return matrix.to(dtype), rhs.to(dtype)


def make_closure(optimizer, x, objective, counter=None):
    def closure():
        if counter is not None:
            counter[0] += 1
        optimizer.zero_grad()
        loss = objective(x)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("beta", sorted(BETA_FORMULAS))
def test_quadratic_converges_within_n_iterations(beta):
    n = 20
    matrix, rhs = spd_quadratic(n)
    x = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    # Polak-Ribiere+ needs 37 iterations here because Powell's test restarts it, so the bound is 2n.
    optimizer = ConjugateGradient([x], max_iter=2 * n, tolerance_grad=1e-6, tolerance_change=0.0, beta=beta,
                                  max_eval=1000)

    optimizer.step(make_closure(optimizer, x, lambda v: 0.5 * v @ matrix @ v - rhs @ v))

    solution = torch.linalg.solve(matrix, rhs)
    assert optimizer.last_stats.reason == StopReason.CONVERGED_GRAD
    assert optimizer.last_stats.iterations <= 2 * n
    assert torch.allclose(x.detach(), solution, atol=1e-6)


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


@pytest.mark.parametrize("line_search", ["strong_wolfe", "hager_zhang"])
def test_rosenbrock_reaches_scipy_minimum(line_search):
    start = [-1.2, 1.0]
    x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = ConjugateGradient([x], max_iter=2000, max_eval=10000, tolerance_grad=1e-9, tolerance_change=0.0,
                                  line_search=line_search)
    optimizer.step(make_closure(optimizer, x, rosenbrock))

    reference = scipy.optimize.minimize(scipy.optimize.rosen, start, jac=scipy.optimize.rosen_der, method="CG",
                                        options={"gtol": 1e-9})
    assert np.allclose(x.detach().numpy(), reference.x, atol=1e-6)
    assert np.allclose(x.detach().numpy(), [1.0, 1.0], atol=1e-6)


def test_float32_quadratic_converges():
    n = 20
    matrix, rhs = spd_quadratic(n, dtype=torch.float32)
    x = torch.zeros(n, dtype=torch.float32, requires_grad=True)
    optimizer = ConjugateGradient([x], max_iter=100, max_eval=1000, tolerance_grad=1e-4, tolerance_change=0.0)
    optimizer.step(make_closure(optimizer, x, lambda v: 0.5 * v @ matrix @ v - rhs @ v))

    solution = torch.linalg.solve(matrix.double(), rhs.double())
    assert x.dtype == torch.float32
    assert optimizer.last_stats.reason in (StopReason.CONVERGED_GRAD, StopReason.LINE_SEARCH_FAILED)
    assert torch.allclose(x.detach().double(), solution, atol=1e-3)


def test_repeated_steps_continue_one_run():
    """max_iter=1 called k times follows the trajectory of one call with max_iter=k."""
    matrix, rhs = spd_quadratic(10)

    def objective(v):
        return 0.5 * v @ matrix @ v - rhs @ v

    x_once = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    once = ConjugateGradient([x_once], max_iter=6, max_eval=100, tolerance_grad=0.0, tolerance_change=0.0)
    once.step(make_closure(once, x_once, objective))

    x_many = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    many = ConjugateGradient([x_many], max_iter=1, tolerance_grad=0.0, tolerance_change=0.0)
    for _ in range(6):
        many.step(make_closure(many, x_many, objective))

    assert torch.equal(x_once.detach(), x_many.detach())
    assert once.state[x_once]["n_iter"] == many.state[x_many]["n_iter"] == 6


def test_stats_fields():
    matrix, rhs = spd_quadratic(10)
    x = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    optimizer = ConjugateGradient([x], max_iter=3, tolerance_grad=0.0, tolerance_change=0.0)
    assert optimizer.last_stats is None

    counter = [0]
    loss = optimizer.step(make_closure(optimizer, x, lambda v: 0.5 * v @ matrix @ v - rhs @ v, counter))
    stats = optimizer.last_stats

    assert loss.item() == 0.0
    assert stats.reason == StopReason.MAX_ITER
    assert stats.iterations == 3
    assert stats.evaluations == counter[0]
    assert optimizer.state[x]["func_evals"] == counter[0]
    assert stats.loss < 0.0
    assert stats.restarted
    assert stats.step_size > 0.0
    assert stats.directional_derivative < 0.0
    eigenvalues = torch.linalg.eigvalsh(matrix)
    assert eigenvalues.min() * 0.99 <= stats.curvature <= eigenvalues.max() * 1.01
    assert "max_iter" in stats.message


def test_converged_change_stops():
    x = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    optimizer = ConjugateGradient([x], max_iter=100, tolerance_grad=0.0, tolerance_change=1e-3)
    optimizer.step(make_closure(optimizer, x, lambda v: (v**2).sum() + 0.01 * (v**4).sum()))
    assert optimizer.last_stats.reason == StopReason.CONVERGED_CHANGE


def test_jacobi_preconditioner_speeds_up_badly_scaled_quadratic():
    """A diagonal preconditioner D = diag(A)^-1 makes a badly scaled diagonal quadratic trivial."""
    torch.manual_seed(0)
    scales = torch.logspace(0, 4, 30, dtype=torch.float64)

    def iterations_to_converge(preconditioner):
        x = torch.nn.Parameter(torch.ones(30, dtype=torch.float64))
        optimizer = ConjugateGradient(
            [x], max_iter=500, max_eval=5000, tolerance_grad=1e-8, preconditioner=preconditioner
        )

        def closure():
            optimizer.zero_grad()
            loss = 0.5 * (scales * x * x).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return optimizer.state[x]["n_iter"], optimizer.last_stats

    plain, plain_stats = iterations_to_converge(None)
    jacobi, jacobi_stats = iterations_to_converge([1.0 / scales])
    assert jacobi_stats.reason.value == "converged_grad"
    assert jacobi <= 2
    assert plain > 5 * jacobi
    assert jacobi_stats.loss < plain_stats.loss


def test_preconditioner_shape_mismatch_rejected():
    x = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="Invalid preconditioner for parameter 0: shape"):
        ConjugateGradient([x], preconditioner=[torch.ones(4)])
    with pytest.raises(ValueError, match="entries must be finite and > 0"):
        ConjugateGradient([x], preconditioner=[torch.zeros(3)])
