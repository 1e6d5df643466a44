"""ConjugateGradient with the quasi-Newton (limited-memory BFGS) preconditioner, ``history_size > 0``."""

import io

import pytest
import torch

from lightning_twophase.optim import ConjugateGradient
from lightning_twophase.optim.history import StepHistory


def extended_rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def minimize(objective, start, steps=1, **kwargs):
    """Run ``steps`` step calls from ``start`` and return the parameter and the optimizer."""
    x = start.detach().clone().requires_grad_(True)
    optimizer = ConjugateGradient([x], **kwargs)

    def closure():
        optimizer.zero_grad()
        loss = objective(x)
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
    return x, optimizer


def dense_bfgs_inverse(pairs, gamma, n):
    """Build the BFGS inverse-Hessian approximation as a dense matrix, oldest pair first."""
    inverse = gamma * torch.eye(n, dtype=torch.float64)
    identity = torch.eye(n, dtype=torch.float64)
    for s, y in pairs:
        rho = 1.0 / torch.dot(s, y)
        left = identity - rho * torch.outer(s, y)
        inverse = left @ inverse @ left.T + rho * torch.outer(s, s)
    return inverse


def test_two_loop_matches_dense_bfgs_across_parameters():
    """H v from the two-loop recursion over two parameter tensors equals the dense BFGS matrix."""
    torch.manual_seed(0)
    shapes = [(3, 2), (4,)]
    params = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
    state = {id(param): {} for param in params}
    run_state = {}
    history = StepHistory(params, lambda param: state[id(param)], run_state, size=3)

    # Five pairs into three slots: the ring keeps the newest three, oldest first.
    matrix = torch.randn(10, 10, dtype=torch.float64)
    hessian = matrix @ matrix.T + 10 * torch.eye(10, dtype=torch.float64)
    pairs = []
    for _ in range(5):
        s = torch.randn(10, dtype=torch.float64)
        y = hessian @ s
        stored = history.push(
            [s[:6].reshape(3, 2) / 0.5, s[6:] / 0.5], 0.5, [y[:6].reshape(3, 2), y[6:]],
            float(s @ y), float(y @ y),
        )
        assert stored
        pairs.append((s, y))

    vector = torch.randn(10, dtype=torch.float64)
    result = history.apply([vector[:6].reshape(3, 2), vector[6:]])
    flat = torch.cat([part.reshape(-1) for part in result])
    gamma = float(pairs[-1][0] @ pairs[-1][1] / (pairs[-1][1] @ pairs[-1][1]))
    expected = dense_bfgs_inverse(pairs[-3:], gamma, 10) @ vector
    torch.testing.assert_close(flat, expected, rtol=1e-10, atol=1e-12)
    assert len(history) == 3


def test_secant_equation_holds_for_newest_pair():
    params = [torch.zeros(5, dtype=torch.float64)]
    param_state: dict = {}
    history = StepHistory(params, lambda param: param_state, {}, size=4)
    torch.manual_seed(1)
    for _ in range(3):
        s, y = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
        y = y if float(s @ y) > 0 else -y
        history.push([s], 1.0, [y], float(s @ y), float(y @ y))
    torch.testing.assert_close(history.apply([y])[0], s)


def test_pair_without_positive_curvature_is_skipped():
    params = [torch.zeros(2, dtype=torch.float64)]
    param_state: dict = {}
    history = StepHistory(params, lambda param: param_state, {}, size=2)
    s, y = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 0.0], dtype=torch.float64)
    assert not history.push([s], 1.0, [y], float(s @ y), float(y @ y))
    assert len(history) == 0
    vector = [torch.tensor([3.0, 4.0], dtype=torch.float64)]
    assert history.apply(vector) is vector


def test_history_needs_fewer_evaluations_on_rosenbrock():
    """On the 10-dimensional Rosenbrock function, 10 pairs cut the evaluations at least threefold."""
    start = torch.full((10,), -1.2, dtype=torch.float64)
    settings = dict(max_iter=1000, max_eval=10000, tolerance_grad=1e-6)
    plain_x, plain = minimize(extended_rosenbrock, start, **settings)
    history_x, with_history = minimize(extended_rosenbrock, start, history_size=10, **settings)

    torch.testing.assert_close(history_x.detach(), torch.ones(10, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(plain_x.detach(), torch.ones(10, dtype=torch.float64), atol=1e-3, rtol=0)
    assert with_history.state[history_x]["func_evals"] * 3 <= plain.state[plain_x]["func_evals"]


def test_quadratic_minimum_with_history_in_float32():
    torch.manual_seed(2)
    matrix = torch.randn(30, 30)
    hessian = matrix @ matrix.T / 30 + torch.eye(30)
    target = torch.randn(30)

    def quadratic(x):
        return 0.5 * (x - target) @ hessian @ (x - target)

    x, optimizer = minimize(quadratic, torch.zeros(30), max_iter=200, tolerance_grad=1e-5, history_size=5)
    torch.testing.assert_close(x.detach(), target, atol=1e-3, rtol=0)
    assert optimizer.last_stats.reason.value in ("converged_grad", "converged_change")


def test_resume_from_state_dict_follows_same_trajectory():
    start = torch.full((6,), -1.2, dtype=torch.float64)
    x, optimizer = minimize(extended_rosenbrock, start, steps=3, max_iter=4, history_size=5)
    assert len(optimizer.state_dict()["state"][0]["history_order"]) == 5

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored_x = x.detach().clone().requires_grad_(True)
    restored = ConjugateGradient([restored_x], max_iter=4, history_size=5)
    restored.load_state_dict(torch.load(buffer))

    def closure_for(opt, param):
        def closure():
            opt.zero_grad()
            loss = extended_rosenbrock(param)
            loss.backward()
            return loss
        return closure

    for _ in range(4):
        optimizer.step(closure_for(optimizer, x))
        restored.step(closure_for(restored, restored_x))
        assert torch.equal(x.detach(), restored_x.detach())


def test_split_steps_match_one_long_step():
    """Step calls of 2 iterations continue one run: the pair of the last search is stored once."""
    start = torch.full((6,), -1.2, dtype=torch.float64)
    long_x, _ = minimize(extended_rosenbrock, start, steps=1, max_iter=12, max_eval=1000, history_size=5)
    split_x, _ = minimize(extended_rosenbrock, start, steps=6, max_iter=2, history_size=5)
    torch.testing.assert_close(split_x.detach(), long_x.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("history_size", [-1, 2.5, True, "10"])
def test_invalid_history_size(history_size):
    with pytest.raises(ValueError, match=r"Invalid history_size: .*Expected an integer >= 0"):
        ConjugateGradient([torch.zeros(2, requires_grad=True)], history_size=history_size)


def test_diagonal_preconditioner_with_history_rejected():
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"Invalid preconditioner with history_size=4.*history_size=0"):
        ConjugateGradient([x], history_size=4, preconditioner=[torch.ones(3)])


def test_failed_search_forgets_pairs():
    """A search that finds no decrease restores the start point and drops the pairs."""
    torch.manual_seed(3)
    target = torch.randn(8, dtype=torch.float64)
    weights = torch.logspace(0, 2, 8, dtype=torch.float64)

    def quadratic(v):
        return (weights * (v - target) ** 2).sum()

    x, optimizer = minimize(quadratic, torch.zeros(8, dtype=torch.float64), steps=2, max_iter=1, history_size=5)
    assert len(optimizer.state[x]["history_order"]) == 2
    anchor = x.detach().clone()

    def kinked():
        # ||x - anchor|| grows at rate 1e3 in every direction, faster than the quadratic falls,
        # but autograd reports a zero subgradient at the anchor, so the slope looks negative.
        optimizer.zero_grad()
        loss = quadratic(x) + 1e3 * torch.linalg.vector_norm(x - anchor)
        loss.backward()
        return loss

    optimizer.step(kinked)
    assert optimizer.last_stats.reason.value == "line_search_failed"
    assert torch.equal(x.detach(), anchor)
    assert optimizer.state[x]["history_order"] == []
