"""Compare ConjugateGradient with SciPy's CG and torch's L-BFGS on standard test problems.

All methods run in float64 from the same starting point until max |g| <= --gtol (SciPy's default
gtol, in the max-norm). An evaluation is one computation of the objective and its gradient,
counted inside the objective, so the counts of all methods are comparable.

Problems: J. J. Moré, B. S. Garbow and K. E. Hillstrom, "Testing unconstrained optimization
software", ACM TOMS 7(1), 1981, plus an ill-conditioned diagonal quadratic.

Usage::

    python benchmarks/cg_vs_scipy.py            # all problems and the beta / line-search table
    python benchmarks/cg_vs_scipy.py --quick    # four small problems, a few seconds
"""

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch

from lightning_twophase.optim import ConjugateGradient
from lightning_twophase.optim.beta import BETA_FORMULAS

Objective = Callable[[torch.Tensor], torch.Tensor]

# Final values that differ by more than this (relative to max(1, |f|)) are flagged as different minima.
VALUE_AGREEMENT = 1e-6

# Step pairs tried in the quasi-Newton variant table.
HISTORY_SIZES = (5, 10, 20)
MAX_ITERATIONS = 20_000


@dataclass(frozen=True)
class Problem:
    name: str
    objective: Objective
    start: list[float]


@dataclass(frozen=True)
class Outcome:
    evaluations: int
    value: float
    max_grad: float


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    odd, even = x[0::2], x[1::2]
    return (100.0 * (even - odd**2) ** 2 + (1.0 - odd) ** 2).sum()


def powell_singular(x: torch.Tensor) -> torch.Tensor:
    x1, x2, x3, x4 = x[0::4], x[1::4], x[2::4], x[3::4]
    return ((x1 + 10 * x2) ** 2 + 5 * (x3 - x4) ** 2 + (x2 - 2 * x3) ** 4 + 10 * (x1 - x4) ** 4).sum()


def beale(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[0], x[1]
    return (1.5 - x1 * (1 - x2)) ** 2 + (2.25 - x1 * (1 - x2**2)) ** 2 + (2.625 - x1 * (1 - x2**3)) ** 2


def ill_conditioned_quadratic(x: torch.Tensor) -> torch.Tensor:
    eigenvalues = torch.logspace(0, 4, x.numel(), dtype=x.dtype)
    return 0.5 * (eigenvalues * x**2).sum()


def freudenstein_roth(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[0], x[1]
    f1 = -13 + x1 + ((5 - x2) * x2 - 2) * x2
    f2 = -29 + x1 + ((x2 + 1) * x2 - 14) * x2
    return f1**2 + f2**2


def helical_valley(x: torch.Tensor) -> torch.Tensor:
    x1, x2, x3 = x[0], x[1], x[2]
    theta = torch.atan(x2 / x1) / (2 * math.pi) + (0.5 if x1.item() < 0 else 0.0)
    f1 = 10 * (x3 - 10 * theta)
    f2 = 10 * (torch.sqrt(x1**2 + x2**2) - 1)
    return f1**2 + f2**2 + x3**2


def brown_badly_scaled(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[0], x[1]
    return (x1 - 1e6) ** 2 + (x2 - 2e-6) ** 2 + (x1 * x2 - 2) ** 2


def wood(x: torch.Tensor) -> torch.Tensor:
    x1, x2, x3, x4 = x[0], x[1], x[2], x[3]
    return (
        100 * (x2 - x1**2) ** 2
        + (1 - x1) ** 2
        + 90 * (x4 - x3**2) ** 2
        + (1 - x3) ** 2
        + 10 * (x2 + x4 - 2) ** 2
        + 0.1 * (x2 - x4) ** 2
    )


def trigonometric(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    index = torch.arange(1, n + 1, dtype=x.dtype)
    residuals = n - torch.cos(x).sum() + index * (1 - torch.cos(x)) - torch.sin(x)
    return (residuals**2).sum()


def penalty_one(x: torch.Tensor) -> torch.Tensor:
    return 1e-5 * ((x - 1) ** 2).sum() + ((x**2).sum() - 0.25) ** 2


PROBLEMS = [
    Problem("rosenbrock-2", rosenbrock, [-1.2, 1.0]),
    Problem("rosenbrock-10", rosenbrock, [-1.2, 1.0] * 5),
    Problem("rosenbrock-100", rosenbrock, [-1.2, 1.0] * 50),
    Problem("powell-singular-4", powell_singular, [3.0, -1.0, 0.0, 1.0]),
    Problem("powell-singular-20", powell_singular, [3.0, -1.0, 0.0, 1.0] * 5),
    Problem("beale", beale, [1.0, 1.0]),
    Problem("quadratic-cond1e4-100", ill_conditioned_quadratic, [1.0] * 100),
    Problem("freudenstein-roth", freudenstein_roth, [0.5, -2.0]),
    Problem("helical-valley", helical_valley, [-1.0, 0.0, 0.0]),
    Problem("brown-badly-scaled", brown_badly_scaled, [1.0, 1.0]),
    Problem("wood", wood, [-3.0, -1.0, -3.0, -1.0]),
    Problem("trigonometric-10", trigonometric, [0.1] * 10),
    Problem("penalty-one-10", penalty_one, [float(i) for i in range(1, 11)]),
]

QUICK_PROBLEMS = {"rosenbrock-2", "beale", "wood", "powell-singular-4"}


class CountingObjective:
    """Wraps an objective and counts value-and-gradient evaluations."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.evaluations = 0

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        point = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        value = self.objective(point)
        (grad,) = torch.autograd.grad(value, point)
        self.evaluations += 1
        return value.item(), grad.numpy()


def _final_outcome(problem: Problem, x: np.ndarray, evaluations: int) -> Outcome:
    value, grad = CountingObjective(problem.objective).value_and_grad(x)
    return Outcome(evaluations, value, float(np.abs(grad).max()))


def run_scipy(problem: Problem, gtol: float) -> Outcome:
    counter = CountingObjective(problem.objective)
    result = scipy.optimize.minimize(
        counter.value_and_grad,
        np.array(problem.start),
        jac=True,
        method="CG",
        options={"gtol": gtol, "maxiter": MAX_ITERATIONS},
    )
    return _final_outcome(problem, result.x, counter.evaluations)


def _run_closure_optimizer(problem: Problem, build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> Outcome:
    x = torch.tensor(problem.start, dtype=torch.float64, requires_grad=True)
    optimizer = build([x])
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad()
        value = problem.objective(x)
        value.backward()
        return value

    optimizer.step(closure)
    return _final_outcome(problem, x.detach().numpy(), evaluations)


def run_ours(problem: Problem, gtol: float, **options) -> Outcome:
    def build(params):
        return ConjugateGradient(
            params, max_iter=MAX_ITERATIONS, max_eval=10 * MAX_ITERATIONS, tolerance_grad=gtol, tolerance_change=0.0,
            **options,
        )

    return _run_closure_optimizer(problem, build)


def run_lbfgs(problem: Problem, gtol: float) -> Outcome:
    def build(params):
        return torch.optim.LBFGS(
            params, lr=1.0, max_iter=MAX_ITERATIONS, max_eval=10 * MAX_ITERATIONS, tolerance_grad=gtol,
            tolerance_change=0.0, history_size=10, line_search_fn="strong_wolfe",
        )

    return _run_closure_optimizer(problem, build)


def _differs(value: float, reference: float) -> bool:
    return abs(value - reference) > VALUE_AGREEMENT * max(1.0, abs(reference))


def print_comparison(problems: list[Problem], gtol: float) -> None:
    """Print the main table and the total ratio line."""
    header = f"{'problem':<22} {'n':>4} {'ours':>6} {'scipy':>6} {'lbfgs':>6}  {'f ours':>10} {'f scipy':>10} {'f lbfgs':>10}  {'max|g| ours':>11}  note"
    print(header)
    print("-" * len(header))

    totals = {"ours": 0, "scipy": 0, "lbfgs": 0}
    for problem in problems:
        ours, scipy_result, lbfgs = run_ours(problem, gtol), run_scipy(problem, gtol), run_lbfgs(problem, gtol)
        totals["ours"] += ours.evaluations
        totals["scipy"] += scipy_result.evaluations
        totals["lbfgs"] += lbfgs.evaluations

        notes = []
        if _differs(ours.value, scipy_result.value):
            notes.append("DIFFERENT MINIMUM")
        for name, outcome in (("ours", ours), ("scipy", scipy_result), ("lbfgs", lbfgs)):
            if outcome.max_grad > gtol:
                notes.append(f"{name} stopped above gtol")
        print(
            f"{problem.name:<22} {len(problem.start):>4} {ours.evaluations:>6} {scipy_result.evaluations:>6} "
            f"{lbfgs.evaluations:>6}  {ours.value:>10.3e} {scipy_result.value:>10.3e} {lbfgs.value:>10.3e}  "
            f"{ours.max_grad:>11.2e}  {'; '.join(notes)}"
        )

    print()
    print(f"Total evaluations: ours {totals['ours']}, scipy {totals['scipy']}, lbfgs {totals['lbfgs']}")
    print(f"Total ratio ours/SciPy: {totals['ours'] / totals['scipy']:.3f}")
    print(f"Total ratio L-BFGS/SciPy: {totals['lbfgs'] / totals['scipy']:.3f}")


def _print_variant_table(problems: list[Problem], gtol: float, variants: dict[str, dict], width: int, legend: str) -> None:
    """Print the evaluations of ``run_ours`` per problem for each named set of options, then the totals."""
    print(f"{'problem':<22} " + " ".join(f"{name:>{width}}" for name in variants))

    totals = [0] * len(variants)
    for problem in problems:
        counts = []
        for index, options in enumerate(variants.values()):
            outcome = run_ours(problem, gtol, **options)
            mark = "*" if outcome.max_grad > gtol else ""
            counts.append(f"{outcome.evaluations}{mark}")
            totals[index] += outcome.evaluations
        print(f"{problem.name:<22} " + " ".join(f"{count:>{width}}" for count in counts))
    print(f"{'total':<22} " + " ".join(f"{total:>{width}}" for total in totals))
    print(legend)


def print_variants(problems: list[Problem], gtol: float) -> None:
    """Print evaluations of every beta formula with both line searches."""
    variants = {
        f"{beta}/{'sw' if search == 'strong_wolfe' else 'hz'}": {"beta": beta, "line_search": search}
        for search in ("strong_wolfe", "hager_zhang")
        for beta in BETA_FORMULAS
    }
    legend = "(* = stopped above gtol; sw = strong Wolfe with c2=0.1, hz = Hager-Zhang approximate Wolfe with c2=0.9)"
    _print_variant_table(problems, gtol, variants, width=7, legend=legend)


def print_history_variants(problems: list[Problem], gtol: float) -> None:
    """Print evaluations of the quasi-Newton preconditioned CG for each history size and c2."""
    variants = {
        f"m{size}/c{c2:g}": {"history_size": size, "c2": c2} for size in HISTORY_SIZES for c2 in (0.1, 0.9)
    }
    legend = "(* = stopped above gtol; mM/cC = history_size M with strong Wolfe c2 = C, beta 'hs')"
    _print_variant_table(problems, gtol, variants, width=8, legend=legend)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run four small problems only, without the variant table")
    parser.add_argument("--gtol", type=float, default=1e-5, help="gradient tolerance in the max-norm (default 1e-5)")
    args = parser.parse_args(argv)

    problems = [problem for problem in PROBLEMS if not args.quick or problem.name in QUICK_PROBLEMS]
    print(f"float64, gtol {args.gtol:g} (max-norm); counts are objective-and-gradient evaluations\n")
    print_comparison(problems, args.gtol)

    if not args.quick:
        print("\nEvaluations per beta formula and line search (ours)\n")
        print_variants(problems, args.gtol)
        print("\nEvaluations with the quasi-Newton preconditioner (history_size > 0)\n")
        print_history_variants(problems, args.gtol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
