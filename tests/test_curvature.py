r"""Secant curvature of ``IntervalAccumulator(track_curvature=True)`` on a quadratic loss.

For :math:`L(\theta) = \tfrac12 \theta^\top A \theta` the gradient is :math:`A\theta`, so the
mean gradient of an interval is :math:`A \bar\theta` exactly and the secant curvature between two
intervals is :math:`d^\top A d / d^\top d` with :math:`d` the change of the mean parameters.
"""

from __future__ import annotations

import pytest
import torch

from lightning_twophase.statistics import IntervalAccumulator

#: Split of the 5-dimensional parameter vector over two tensors, so the multi-tensor sums are exercised.
SPLIT = (3, 2)


def quadratic_matrix(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """Return :math:`Q \\operatorname{diag}(\\lambda) Q^\\top` for a random orthogonal :math:`Q`, in float64."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def run_sgd_intervals(matrix: torch.Tensor, intervals: int, steps: int, lr: float, track: bool = True):
    """Run plain SGD on the quadratic, one accumulator check per interval.

    Returns the accumulator's statistics per interval and the mean parameter vector per interval.
    """
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(matrix.shape[0], generator=generator, dtype=torch.float64)
    params = [chunk.clone().requires_grad_(True) for chunk in start.split(SPLIT)]
    accumulator = IntervalAccumulator(track_curvature=track)
    records, means = [], []

    for interval in range(intervals):
        visited = []
        for _ in range(steps):
            theta = torch.cat(params)
            loss = 0.5 * theta @ matrix @ theta
            for param in params:
                param.grad = None
            loss.backward()
            visited.append(torch.cat([p.detach() for p in params]).clone())

            accumulator.update_gradients(params)
            accumulator.update_loss(loss)
            with torch.no_grad():
                for param in params:
                    param -= lr * param.grad

        records.append(accumulator.compute(epoch=interval, step=(interval + 1) * steps))
        accumulator.reset()
        means.append(torch.stack(visited).mean(dim=0))
    return records, means


def closed_form(matrix: torch.Tensor, change: torch.Tensor) -> float:
    return float(change @ matrix @ change / (change @ change))


def test_first_interval_has_no_curvature():
    records, _ = run_sgd_intervals(quadratic_matrix([1.0, 2.0, 3.0, 4.0, 5.0]), intervals=1, steps=4, lr=0.05)

    assert records[0].curvature is None


def test_secant_matches_closed_form():
    matrix = quadratic_matrix([0.5, 1.0, 2.0, 4.0, 8.0])

    records, means = run_sgd_intervals(matrix, intervals=4, steps=5, lr=0.05)

    for k in range(1, 4):
        expected = closed_form(matrix, means[k] - means[k - 1])
        assert records[k].curvature == pytest.approx(expected, rel=1e-9), f"interval {k}"
        assert 0.5 <= records[k].curvature <= 8.0


def test_secant_negative_on_saddle():
    # One negative eigenvalue: SGD escapes along it, so the mean update ends up dominated by that
    # direction and the secant curvature turns negative.
    matrix = quadratic_matrix([-1.0, 1.0, 2.0, 3.0, 4.0])

    records, means = run_sgd_intervals(matrix, intervals=6, steps=5, lr=0.1)

    expected = closed_form(matrix, means[-1] - means[-2])
    assert records[-1].curvature == pytest.approx(expected, rel=1e-9)
    assert records[-1].curvature < 0.0


def test_curvature_off_by_default():
    matrix = quadratic_matrix([1.0, 2.0, 3.0, 4.0, 5.0])

    records, _ = run_sgd_intervals(matrix, intervals=2, steps=3, lr=0.05, track=False)

    assert records[1].curvature is None


def test_release_forgets_previous_interval():
    matrix = quadratic_matrix([1.0, 2.0, 3.0, 4.0, 5.0])
    params = [torch.ones(n, dtype=torch.float64, requires_grad=True) for n in SPLIT]
    accumulator = IntervalAccumulator(track_curvature=True)

    for _ in range(2):
        theta = torch.cat(params)
        for param in params:
            param.grad = None
        (0.5 * theta @ matrix @ theta).backward()
        accumulator.update_gradients(params)
        accumulator.update_loss(torch.tensor(1.0))
        first = accumulator.compute(0, 1)
        accumulator.release()

    assert first.curvature is None


def sgd_steps(
    params: list[torch.Tensor], matrix: torch.Tensor, accumulators: list[IntervalAccumulator], steps: int
) -> None:
    """Take ``steps`` SGD steps on the quadratic, recording each gradient in every accumulator."""
    for _ in range(steps):
        theta = torch.cat(params)
        loss = 0.5 * theta @ matrix @ theta
        for param in params:
            param.grad = None
        loss.backward()
        for accumulator in accumulators:
            accumulator.update_gradients(params)
            accumulator.update_loss(loss)
        with torch.no_grad():
            for param in params:
                param -= 0.05 * param.grad


@pytest.mark.parametrize("steps_before_save", [0, 2], ids=["interval_boundary", "mid_interval"])
def test_state_round_trip_keeps_curvature(steps_before_save):
    # A checkpoint at the end of an interval (the usual epoch-end case) or inside one must give
    # the same next curvature as the uninterrupted accumulator.
    matrix = quadratic_matrix([0.5, 1.0, 2.0, 4.0, 8.0])
    params = [torch.ones(n, dtype=torch.float64, requires_grad=True) for n in SPLIT]
    original = IntervalAccumulator(track_curvature=True)
    sgd_steps(params, matrix, [original], 4)
    original.compute(0, 4)
    original.reset()
    sgd_steps(params, matrix, [original], steps_before_save)

    restored = IntervalAccumulator(track_curvature=True)
    restored.load_state_dict(original.state_dict(), params)
    sgd_steps(params, matrix, [original, restored], 4 - steps_before_save)
    expected = original.compute(1, 8)
    actual = restored.compute(1, 8)

    assert expected.curvature is not None
    assert actual.curvature == pytest.approx(expected.curvature, rel=1e-12)
    assert actual.batches == expected.batches == 4
    assert actual.loss == pytest.approx(expected.loss, rel=1e-6)
