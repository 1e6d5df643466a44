"""Nonlinear conjugate gradient as a closure-based ``torch.optim.Optimizer``."""

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_twophase.optim import line_search as searches
from lightning_twophase.optim.beta import BETA_FORMULAS, DirectionProducts, compute_beta
from lightning_twophase.optim.history import StepHistory

__all__ = ["CGStepStats", "ConjugateGradient", "StopReason"]

LINE_SEARCHES = {"strong_wolfe": searches.strong_wolfe, "hager_zhang": searches.hager_zhang}

# Default curvature constant c2 per line search. See the class docstring for the measurements.
DEFAULT_C2 = {"strong_wolfe": 0.1, "hager_zhang": 0.9}

# Default c2 with the quasi-Newton preconditioner (history_size > 0), for either line search.
# A quasi-Newton direction is scaled so that the unit step is usually acceptable. A loose
# curvature test accepts it, which the class docstring's measurements favour.
HISTORY_C2 = 0.9

# Model evaluations one line search may use. The step's max_eval default leaves room for one search.
MAX_LINE_SEARCH_EVALUATIONS = 20

# A direction is used only when g.d <= -SUFFICIENT_DESCENT * g.g. A direction with a smaller slope
# is nearly orthogonal to the gradient, and its line search gains little.
SUFFICIENT_DESCENT = 1e-3

# Bounds on the growth and shrinkage of the initial trial step relative to the last accepted step.
_MAX_STEP_GROWTH = 100.0
_MIN_STEP_SHRINK = 1e-3

_HYPERPARAMETERS = (
    "lr",
    "max_iter",
    "max_eval",
    "tolerance_grad",
    "tolerance_change",
    "beta",
    "line_search",
    "restart",
    "c1",
    "c2",
    "powell_threshold",
    "history_size",
)


class StopReason(enum.Enum):
    """Reason a ``ConjugateGradient.step`` call returned."""

    CONVERGED_GRAD = "converged_grad"
    CONVERGED_CHANGE = "converged_change"
    MAX_ITER = "max_iter"
    MAX_EVAL = "max_eval"
    LINE_SEARCH_FAILED = "line_search_failed"
    NON_FINITE = "non_finite"


_MESSAGES = {
    StopReason.CONVERGED_GRAD: "max |g| = {max_grad:.3e} <= tolerance_grad",
    StopReason.CONVERGED_CHANGE: "step or loss change <= tolerance_change",
    StopReason.MAX_ITER: "reached max_iter iterations in this step",
    StopReason.MAX_EVAL: "reached max_eval closure evaluations in this step",
    StopReason.LINE_SEARCH_FAILED: "line search failed ({detail}); parameters kept at the last accepted point",
    StopReason.NON_FINITE: "non-finite loss or gradient ({detail}); parameters kept at the last accepted point",
}


@dataclass(frozen=True)
class CGStepStats:
    """Statistics of one ``ConjugateGradient.step`` call, for logging.

    Attributes:
        loss: loss at the parameters the step returned with.
        evaluations: closure calls in this step.
        iterations: accepted line searches in this step.
        step_size: last accepted step length :math:`\\alpha` (NaN before the first).
        beta: last conjugacy coefficient used (0 after a restart).
        restarted: whether any iteration of this step restarted with steepest descent.
        directional_derivative: :math:`g^T d` at the start of the last line search.
        grad_norm: :math:`\\lVert g \\rVert_2` over all parameters at the point the step returned with.
        curvature: :math:`(g_{new} - g_{old})^T d / (\\alpha \\lVert d \\rVert^2)` of the last accepted
            line search, a secant estimate of the curvature along d. A step that satisfies the Wolfe
            curvature condition always gives a positive value, so a negative value appears only after
            a failed search that moved to its best point, and is evidence of non-convexity.
        reason: why the step returned.
        message: a human-readable form of ``reason`` with the numbers involved.
    """

    loss: float
    evaluations: int
    iterations: int
    step_size: float
    beta: float
    restarted: bool
    directional_derivative: float
    curvature: float
    reason: StopReason
    message: str
    grad_norm: float = math.nan


@dataclass
class _Progress:
    """Mutable bookkeeping of one ``step`` call."""

    evaluations: int = 0
    iterations: int = 0
    restarted: bool = False
    beta: float = 0.0
    directional_derivative: float = math.nan
    curvature: float = math.nan
    loss: float = math.nan
    max_grad: float = math.nan
    grad_norm: float = math.nan
    detail: str = ""


@dataclass(frozen=True)
class _Measurements:
    """Host copies of the loss and of the inner products at the current point.

    ``scaled_grads`` is :math:`H g` when the step history preconditions the direction, and
    ``euclidean_direction_sq`` is :math:`d^T d` for the reported curvature.
    """

    loss: float
    max_grad: float
    max_direction: float
    products: DirectionProducts
    euclidean_direction_sq: float
    scaled_grads: list[Tensor] | None = None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.max_grad) and math.isfinite(self.products.grad_sq)


def _validate_arguments(
    lr: float,
    max_iter: int,
    max_eval: int | None,
    tolerance_grad: float,
    tolerance_change: float,
    beta: str,
    line_search: str,
    restart: int | None,
    c1: float,
    c2: float,
    powell_threshold: float | None,
    history_size: int,
) -> None:
    """Raise ValueError for the first invalid constructor argument."""
    if not (isinstance(lr, (int, float)) and lr > 0.0 and math.isfinite(lr)):
        raise ValueError(f"Invalid lr: {lr}. Expected a finite number > 0 (the scale of the first trial step).")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"Invalid max_iter: {max_iter}. Expected an integer >= 1.")
    if max_eval is not None and not (isinstance(max_eval, int) and max_eval >= 2):
        raise ValueError(
            f"Invalid max_eval: {max_eval}. Expected None or an integer >= 2 "
            "(one evaluation at the start point and at least one line-search trial)."
        )
    if not tolerance_grad >= 0.0:
        raise ValueError(f"Invalid tolerance_grad: {tolerance_grad}. Expected a number >= 0.")
    if not tolerance_change >= 0.0:
        raise ValueError(f"Invalid tolerance_change: {tolerance_change}. Expected a number >= 0.")
    if beta not in BETA_FORMULAS:
        expected = ", ".join(repr(name) for name in BETA_FORMULAS)
        raise ValueError(f"Invalid beta: {beta!r}. Expected one of {expected}.")
    if line_search not in LINE_SEARCHES:
        expected = ", ".join(repr(name) for name in LINE_SEARCHES)
        raise ValueError(f"Invalid line_search: {line_search!r}. Expected one of {expected}.")
    if restart is not None and not (isinstance(restart, int) and not isinstance(restart, bool) and restart >= 1):
        raise ValueError(f"Invalid restart: {restart}. Expected None (no periodic restart) or an integer >= 1.")
    if not 0.0 < c1 < c2 < 1.0:
        raise ValueError(f"Invalid c1, c2: {c1}, {c2}. Expected 0 < c1 < c2 < 1.")
    if powell_threshold is not None and not powell_threshold > 0.0:
        raise ValueError(f"Invalid powell_threshold: {powell_threshold}. Expected None (no Powell test) or a number > 0.")
    if not (isinstance(history_size, int) and not isinstance(history_size, bool) and history_size >= 0):
        raise ValueError(
            f"Invalid history_size: {history_size!r}. Expected an integer >= 0 (0 turns the quasi-Newton "
            "preconditioner off; 5 to 20 step pairs are typical)."
        )


def _gradients(params: list[Tensor]) -> list[Tensor]:
    """Collect the gradients, with zeros for parameters that received none.

    Raises:
        RuntimeError: if a gradient is sparse.
    """
    grads = []
    for index, param in enumerate(params):
        grad = param.grad
        if grad is None:
            grad = torch.zeros_like(param)
        elif grad.is_sparse:
            raise RuntimeError(
                f"ConjugateGradient does not support sparse gradients, but parameter {index} "
                f"(shape {tuple(param.shape)}) has one. Use dense gradients, for example "
                "torch.nn.Embedding(..., sparse=False)."
            )
        grads.append(grad)
    return grads


def _dots(pairs: list[tuple[list[Tensor], list[Tensor]]], device: torch.device) -> Tensor:
    """Return the inner products of the tensor-list pairs as one tensor on ``device``."""
    sums = []
    for left, right in pairs:
        terms = [torch.dot(x.reshape(-1), y.reshape(-1)).to(device) for x, y in zip(left, right)]
        sums.append(torch.stack(terms).sum())
    return torch.stack(sums)


def _max_abs(tensors: list[Tensor], device: torch.device) -> Tensor:
    norms = torch._foreach_norm(tensors, math.inf)
    return torch.stack([norm.to(device) for norm in norms]).max()


def _loss_scalar(loss: Tensor | float, like: Tensor) -> Tensor:
    """Return the loss as a 0-d tensor with the dtype and device of ``like`` (a Python float stays exact in float64)."""
    if isinstance(loss, Tensor):
        return loss.detach().to(device=like.device, dtype=like.dtype).reshape(())
    return torch.tensor(float(loss), device=like.device, dtype=like.dtype)


class _LineModel:
    """The 1-D model :math:`\\alpha \\mapsto (f(x + \\alpha d), \\nabla f(x + \\alpha d)^T d)` over the parameters.

    Each call sets the parameters to ``start + step * direction`` from the saved start point, so
    parameters never accumulate rounding from earlier trials.
    """

    def __init__(self, closure: Callable[[], Tensor], params: list[Tensor], start: list[Tensor], directions: list[Tensor]):
        self.closure = closure
        self.params = params
        self.start = start
        self.directions = directions
        self.last_step = 0.0
        self.non_finite_trials = 0

    def __call__(self, step: float) -> tuple[float, float]:
        torch._foreach_copy_(self.params, self.start)
        torch._foreach_add_(self.params, self.directions, alpha=step)
        self.last_step = step

        loss = self.closure()
        grads = _gradients(self.params)
        device = self.params[0].device
        slope = _dots([(grads, self.directions)], device)[0]
        value, derivative = torch.stack([_loss_scalar(loss, self.params[0]), slope]).tolist()

        if not (math.isfinite(value) and math.isfinite(derivative)):
            self.non_finite_trials += 1
        return value, derivative


class ConjugateGradient(Optimizer):
    r"""Nonlinear conjugate gradient with a Wolfe line search, used like ``torch.optim.LBFGS``.

    All parameters of all groups form one vector :math:`x` with one joint line search. Iteration k
    moves along the direction :math:`d_k` and updates it:

    .. math::

        x_{k+1} = x_k + \alpha_k d_k, \qquad d_{k+1} = -g_{k+1} + \beta_k d_k, \qquad d_0 = -g_0.

    With :math:`y_k = g_{k+1} - g_k`, the ``beta`` argument selects

    .. math::

        \beta^{PR+} = \max\Big(0, \frac{g_{k+1}^T y_k}{g_k^T g_k}\Big), \quad
        \beta^{FR} = \frac{g_{k+1}^T g_{k+1}}{g_k^T g_k}, \quad
        \beta^{HS} = \frac{g_{k+1}^T y_k}{d_k^T y_k}, \quad
        \beta^{DY} = \frac{g_{k+1}^T g_{k+1}}{d_k^T y_k},

        \beta^{HZ} = \max\Big(\frac{1}{d_k^T y_k}\Big(y_k - 2 d_k \frac{y_k^T y_k}{d_k^T y_k}\Big)^T g_{k+1},
        \frac{-1}{\lVert d_k \rVert \min(0.01, \lVert g_k \rVert)}\Big).

    ``line_search="strong_wolfe"`` accepts a step :math:`\alpha` that satisfies the strong Wolfe
    conditions for :math:`\phi(\alpha) = f(x_k + \alpha d_k)`:

    .. math::

        \phi(\alpha) \le \phi(0) + c_1 \alpha \phi'(0), \qquad |\phi'(\alpha)| \le c_2 |\phi'(0)|.

    ``line_search="hager_zhang"`` accepts Wolfe points (with :math:`\phi'(\alpha) \ge c_2 \phi'(0)`)
    or Hager and Zhang's approximate Wolfe points,
    :math:`(2 c_1 - 1)\phi'(0) \ge \phi'(\alpha) \ge c_2 \phi'(0)` with
    :math:`\phi(\alpha) \le \phi(0) + 10^{-6}|\phi(0)|`.

    The direction restarts with :math:`d_k = -g_k` (steepest descent) on the first iteration, when
    :math:`g_k^T d_k > -10^{-3} \lVert g_k \rVert^2` (not a sufficient descent direction), when
    Powell's test :math:`|g_k^T g_{k-1}| \ge` ``powell_threshold`` :math:`\lVert g_k \rVert^2` finds
    the gradients far from orthogonal, every ``restart`` iterations if set, and after a failed or
    non-finite line search.

    The first trial step of the very first iteration is :math:`\alpha = \mathrm{lr} / \lVert g_0
    \rVert_2`, a move of length ``lr``. Later iterations start from
    :math:`\alpha_{k-1} \, g_{k-1}^T d_{k-1} / g_k^T d_k` (Nocedal and Wright, eq. 3.60), kept within
    [1e-3, 100] times :math:`\alpha_{k-1}`.

    With a diagonal preconditioner :math:`D` (``preconditioner``), the iteration is CG in the
    variables :math:`D^{-1/2} x`: the direction becomes :math:`d_{k+1} = -D g_{k+1} + \beta_k d_k`
    and every inner product of gradients in the beta formulas and Powell's test is taken in the
    :math:`D` metric (:math:`g^T g \to g^T D g`, :math:`g^T y \to (D g)^T y`,
    :math:`y^T y \to y^T D y`, :math:`d^T d \to d^T D^{-1} d`). Adam's second-moment estimate gives
    such a :math:`D = 1 / (\sqrt{\hat v} + \epsilon)`; the reported ``curvature`` is then measured
    in the :math:`D^{-1}` norm of :math:`d`.

    With ``history_size = m > 0``, :math:`D` is replaced by the limited-memory BFGS approximation
    :math:`H_k` of the inverse Hessian built from the last :math:`m` accepted steps
    :math:`s_i = \alpha_i d_i` and gradient changes :math:`y_i` (Nocedal and Wright, algorithm 7.4;
    :class:`~lightning_twophase.optim.history.StepHistory`), so
    :math:`d_{k+1} = -H_{k+1} g_{k+1} + \beta_k d_k` with the inner products in the :math:`H_{k+1}`
    metric. This is the variable-storage conjugate gradient of Buckley and LeNir (Math.
    Programming 27, 1983): the secant equation :math:`H_{k+1} y_k = s_k` turns the Hestenes-Stiefel
    coefficient into :math:`\beta_k = \alpha_k g_{k+1}^T d_k / d_k^T y_k`, which vanishes under an exact line
    search, so the direction is the quasi-Newton one plus a conjugacy correction for the inexact
    search. Powell's test in the :math:`H` metric compares :math:`(H g_{k+1})^T g_k =
    g_{k+1}^T H g_{k+1} - \alpha_k g_{k+1}^T d_k` with :math:`g_{k+1}^T H g_{k+1}`, so at the
    default threshold it restarts on most iterations and the method runs mostly as L-BFGS with
    a strong Wolfe search. A pair with :math:`s^T y \le 0` is skipped and the direction restarts with
    :math:`-H g`. A failed line search that restores the start point drops all pairs (one cut short by
    ``max_eval`` keeps them). Once pairs
    are stored, every line search first tries the unit step, and ``c2``
    defaults to 0.9 (``HISTORY_C2``). On the 13 problems below, ``history_size=10`` with
    ``c2=0.9`` used 1293 evaluations, 0.53 times the plain default and 0.40 times SciPy's CG.

    The direction, the previous gradient and the scalar run state (iteration count, previous step,
    previous :math:`g^T d`, evaluation count) live in the optimizer state, so repeated ``step``
    calls continue one conjugate-gradient run and ``state_dict`` carries it. Each ``step`` first
    re-evaluates the closure at the current parameters.

    Memory: for :math:`n` parameter elements, the state stores :math:`2n` elements (direction and
    previous gradient), and each ``step`` call allocates :math:`n` more for the start point of the
    line search, which restores the last accepted point exactly. Total: :math:`3n` besides the
    gradients, plus :math:`2mn` for the step history and :math:`n` for :math:`H g` with
    ``history_size = m``. No flattened copy of the parameters is made.

    When it helps: close to a minimum, where the loss is nearly convex, on a deterministic objective
    (full batch, or one fixed large batch). A line search on a different mini-batch per evaluation
    breaks the Wolfe tests, so this optimizer is not a mini-batch method.

    Defaults: on the 13 float64 problems of ``benchmarks/cg_vs_scipy.py`` (Moré, Garbow and
    Hillstrom 1981, plus a quadratic with condition number 1e4), ``beta="hs"``,
    ``line_search="strong_wolfe"``, ``c2=0.1`` and ``powell_threshold=0.5`` used 2435 evaluations
    to reach max |g| <= 1e-5, 0.76 times SciPy's CG (3200). Hestenes-Stiefel keeps
    :math:`d_{k+1}^T y_k = 0` whatever the step, so it loses less conjugacy to inexact line
    searches than Polak-Ribiere+ (2540 with the same settings). Neighbouring settings differ by
    up to 10%; ``docs/benchmarks.md`` lists them. The Hager-Zhang search used 2.7 to 6.2 times more
    evaluations.

    Args:
        params: iterable of parameters or parameter groups. All groups must share the
            hyperparameters below, because one line search moves all parameters together, and all
            parameters must share one floating-point dtype.
        lr: length of the first trial move (the first trial step is ``lr / ||g||_2``).
        max_iter: maximum iterations (line searches) per ``step`` call.
        max_eval: maximum closure evaluations per ``step`` call. Default
            ``max(max_iter * 5 // 4, 1 + 20)``, so one full line search fits.
            NOTE: a smaller value can cut every search short. The step then restores its start
            point, and the next step repeats the same search without progress or a warning.
        tolerance_grad: stop when :math:`\max_i |g_i| \le` ``tolerance_grad``.
        tolerance_change: stop when the last accepted move :math:`\max_i |\alpha d_i|` or the loss
            change is below this value.
        beta: the conjugacy formula, one of 'pr+', 'fr', 'hs', 'dy', 'hz'.
        line_search: 'strong_wolfe' or 'hager_zhang'.
        restart: restart with steepest descent every this many iterations; None never restarts by count.
        c1: sufficient-decrease constant (``delta`` of Hager and Zhang).
        c2: curvature constant, ``c1 < c2 < 1``. None selects 0.1 for 'strong_wolfe' and 0.9 for
            'hager_zhang', and 0.9 for both when ``history_size > 0``.
        powell_threshold: Powell's restart threshold; None disables the test.
        history_size: step pairs of the quasi-Newton preconditioner; 0 (the default) turns it off.
            Cannot be combined with ``preconditioner``.
        preconditioner: optional diagonal preconditioner :math:`D`, one positive tensor per
            parameter (see :meth:`set_preconditioner`).

    Raises:
        ValueError: for an invalid argument, parameter groups with different hyperparameters, or
            parameters of different dtypes.

    Example::

        >>> model = torch.nn.Linear(3, 1).double()
        >>> x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
        >>> optimizer = ConjugateGradient(model.parameters(), max_iter=50)
        >>> def closure():
        ...     optimizer.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
        >>> optimizer.last_stats.reason
        <StopReason.CONVERGED_GRAD: 'converged_grad'>
    """

    def __init__(
        self,
        params,
        lr: float = 1.0,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        beta: str = "hs",
        line_search: str = "strong_wolfe",
        restart: int | None = None,
        c1: float = 1e-4,
        c2: float | None = None,
        powell_threshold: float | None = 0.5,
        history_size: int = 0,
        preconditioner: Sequence[Tensor] | None = None,
    ) -> None:
        if c2 is None:
            c2 = DEFAULT_C2.get(line_search, DEFAULT_C2["strong_wolfe"])
            if history_size:
                c2 = HISTORY_C2
        if max_eval is None and isinstance(max_iter, int):
            max_eval = max(max_iter * 5 // 4, 1 + MAX_LINE_SEARCH_EVALUATIONS)
        _validate_arguments(
            lr, max_iter, max_eval, tolerance_grad, tolerance_change, beta, line_search, restart, c1, c2,
            powell_threshold, history_size,
        )

        defaults = dict(
            lr=lr,
            max_iter=max_iter,
            max_eval=max_eval,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            beta=beta,
            line_search=line_search,
            restart=restart,
            c1=c1,
            c2=c2,
            powell_threshold=powell_threshold,
            history_size=history_size,
        )
        super().__init__(params, defaults)
        self._check_param_groups()
        self.last_stats: CGStepStats | None = None
        if preconditioner is not None:
            self.set_preconditioner(preconditioner)

    def set_preconditioner(self, preconditioner: Sequence[Tensor] | None) -> None:
        """Set the diagonal preconditioner :math:`D`, one positive tensor per parameter, or remove it.

        The tensors are copied into the per-parameter state, so ``state_dict`` carries them. The
        CG direction restarts, because the metric of all inner products changes.

        Raises:
            ValueError: On a count or shape that does not match the parameters, or a
                non-positive or non-finite entry.
        """
        params = self._params()
        if preconditioner is None:
            for param in params:
                self.state[param].pop("preconditioner", None)
            self._run_state()["restart_pending"] = True
            return

        if self.param_groups[0]["history_size"] > 0:
            raise ValueError(
                f"Invalid preconditioner with history_size={self.param_groups[0]['history_size']}: the step "
                "history already preconditions the direction. Pass history_size=0 to use a diagonal preconditioner."
            )
        scales = list(preconditioner)
        if len(scales) != len(params):
            raise ValueError(
                f"Invalid preconditioner: {len(scales)} tensors for {len(params)} parameters. Pass one tensor"
                " per parameter, in parameter-group order."
            )
        for index, (param, scale) in enumerate(zip(params, scales)):
            if scale.shape != param.shape:
                raise ValueError(
                    f"Invalid preconditioner for parameter {index}: shape {tuple(scale.shape)}, expected"
                    f" {tuple(param.shape)}."
                )
            if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
                raise ValueError(f"Invalid preconditioner for parameter {index}: entries must be finite and > 0.")
            self.state[param]["preconditioner"] = scale.detach().to(param.dtype).clone()
        self._run_state()["restart_pending"] = True

    def _preconditioned(self, params: list[Tensor], tensors: list[Tensor]) -> list[Tensor]:
        """Return :math:`D t` for each tensor, or ``tensors`` itself without a preconditioner."""
        if "preconditioner" not in self.state[params[0]]:
            return tensors
        return torch._foreach_mul(tensors, [self.state[param]["preconditioner"] for param in params])

    def _params(self) -> list[Tensor]:
        return [param for group in self.param_groups for param in group["params"]]

    def _check_param_groups(self) -> dict:
        """Return the shared hyperparameters after checking that all groups and dtypes agree."""
        options = self.param_groups[0]
        for index, group in enumerate(self.param_groups[1:], start=1):
            for key in _HYPERPARAMETERS:
                if group[key] != options[key]:
                    raise ValueError(
                        f"Invalid {key} in parameter group {index}: {group[key]!r}. ConjugateGradient runs one "
                        f"line search over all groups, so every group must use {key}={options[key]!r}."
                    )

        dtypes = {param.dtype for param in self._params()}
        if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(
                f"Invalid parameter dtypes: {sorted(str(dtype) for dtype in dtypes)}. ConjugateGradient needs "
                "all parameters in one floating-point dtype; convert the model with .float() or .double()."
            )
        return options

    def _run_state(self) -> dict:
        """Return the scalar run state, stored in the state of the first parameter like LBFGS does."""
        state = self.state[self._params()[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        state.setdefault("step_size", None)
        state.setdefault("directional_derivative", None)
        state.setdefault("prev_loss", None)
        state.setdefault("prev_grad_sq", None)
        state.setdefault("restart_pending", True)
        state.setdefault("pair_pending", False)
        state.setdefault("current_pair_stored", False)
        return state

    def _history(self, params: list[Tensor]) -> StepHistory | None:
        """Return the step history of the quasi-Newton preconditioner, or None when it is off."""
        size = self.param_groups[0]["history_size"]
        if size == 0:
            return None
        return StepHistory(params, lambda param: self.state[param], self._run_state(), size)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """Run up to ``max_iter`` conjugate-gradient iterations.

        Args:
            closure: clears the gradients, computes the loss, calls ``backward`` and returns the loss.

        Returns:
            The loss of the first closure evaluation of this call.

        Raises:
            ValueError: if ``closure`` is None, or the parameter groups disagree.
            RuntimeError: if a gradient is sparse.
        """
        if closure is None:
            raise ValueError(
                "Invalid closure: None. ConjugateGradient.step(closure) needs a closure that clears the "
                "gradients, computes the loss, calls backward() and returns the loss, as for torch.optim.LBFGS."
            )

        options = self._check_param_groups()
        closure = torch.enable_grad()(closure)
        params = self._params()
        state = self._run_state()
        progress = _Progress()

        first_loss = closure()
        self._count_evaluation(state, progress)

        reason = self._iterate(closure, params, state, options, first_loss, progress)
        self.last_stats = self._stats(state, progress, reason)
        return first_loss

    def _count_evaluation(self, state: dict, progress: _Progress, count: int = 1) -> None:
        state["func_evals"] += count
        progress.evaluations += count

    def _iterate(
        self,
        closure: Callable,
        params: list[Tensor],
        state: dict,
        options: dict,
        loss: Tensor | float,
        progress: _Progress,
    ) -> StopReason:
        """Alternate direction updates and line searches until a stop test fires."""
        start: list[Tensor] | None = None

        while True:
            measured = self._measure(params, loss)
            progress.loss = measured.loss
            progress.max_grad = measured.max_grad
            progress.grad_norm = math.sqrt(measured.products.grad_sq) if measured.finite else math.nan
            reason = self._stop_reason(measured, state, options, progress)
            if reason is not None:
                return reason

            self._update_direction(params, measured, state, options, progress)

            if start is None:
                start = [param.detach().clone() for param in params]
            else:
                torch._foreach_copy_(start, params)

            reason, loss = self._search(closure, params, start, measured, state, options, progress)
            if reason is not None:
                return reason

    def _measure(self, params: list[Tensor], loss: Tensor | float) -> _Measurements:
        """Compute the loss and all inner products at the current point with one read to the host."""
        grads = _gradients(params)
        device = params[0].device
        has_direction = "direction" in self.state[params[0]]
        directions = [self.state[param]["direction"] for param in params] if has_direction else grads
        previous = [self.state[param]["previous_grad"] for param in params] if has_direction else grads

        diffs = torch._foreach_sub(grads, previous)
        history = self._history(params)
        if history is not None:
            return self._measure_with_history(params, loss, grads, directions, diffs, history)

        scaled_grads = self._preconditioned(params, grads)
        scaled_diffs = self._preconditioned(params, diffs)
        # In the preconditioned metric, d^T D^-1 d; D^-1 d equals -g after a restart.
        unscaled_directions = directions
        if scaled_grads is not grads:
            inverse = [1.0 / self.state[param]["preconditioner"] for param in params]
            unscaled_directions = torch._foreach_mul(directions, inverse)
        products = _dots([(grads, scaled_grads), (scaled_grads, diffs), (directions, diffs), (diffs, scaled_diffs),
                          (grads, directions), (directions, unscaled_directions)], device)
        extremes = torch.stack([_max_abs(grads, device), _max_abs(directions, device)])
        values = torch.cat([_loss_scalar(loss, params[0]).reshape(1), extremes, products]).tolist()
        del diffs

        prev_grad_sq = self.state[params[0]]["prev_grad_sq"]
        if prev_grad_sq is None:
            prev_grad_sq = values[3]
        return _Measurements(
            loss=values[0],
            max_grad=values[1],
            max_direction=values[2],
            products=DirectionProducts(
                grad_sq=values[3],
                prev_grad_sq=prev_grad_sq,
                grad_dot_diff=values[4],
                direction_dot_diff=values[5],
                diff_sq=values[6],
                grad_dot_direction=values[7],
                direction_sq=values[8],
            ),
            euclidean_direction_sq=values[8],
        )

    def _measure_with_history(
        self,
        params: list[Tensor],
        loss: Tensor | float,
        grads: list[Tensor],
        directions: list[Tensor],
        diffs: list[Tensor],
        history: StepHistory,
    ) -> _Measurements:
        """Measure in the metric of the quasi-Newton matrix :math:`H`, first storing the newest step pair.

        With the newest pair :math:`s = \alpha d` in the history, the secant equation
        :math:`H y = s` gives :math:`y^T H y = s^T y` and :math:`d^T H^{-1} d = d^T y / \alpha`
        without another pass over the parameters.
        """
        device = params[0].device
        state = self._run_state()
        plain = _dots([(directions, diffs), (diffs, diffs), (grads, directions), (directions, directions)], device)
        extremes = torch.stack([_max_abs(grads, device), _max_abs(directions, device)])
        values = torch.cat([_loss_scalar(loss, params[0]).reshape(1), extremes, plain]).tolist()
        loss_value, max_grad, max_direction, d_dot_y, y_dot_y, g_dot_d, d_dot_d = values

        step_size = state["step_size"]
        if state["pair_pending"]:
            state["pair_pending"] = False
            state["current_pair_stored"] = history.push(directions, step_size, diffs, step_size * d_dot_y, y_dot_y)
            state["restart_pending"] = state["restart_pending"] or not state["current_pair_stored"]

        scaled_grads = history.apply(grads)
        grad_sq, grad_dot_diff = _dots([(grads, scaled_grads), (scaled_grads, diffs)], device).tolist()
        secant = state["current_pair_stored"]

        prev_grad_sq = state["prev_grad_sq"]
        return _Measurements(
            loss=loss_value,
            max_grad=max_grad,
            max_direction=max_direction,
            products=DirectionProducts(
                grad_sq=grad_sq,
                prev_grad_sq=grad_sq if prev_grad_sq is None else prev_grad_sq,
                grad_dot_diff=grad_dot_diff,
                direction_dot_diff=d_dot_y,
                diff_sq=step_size * d_dot_y if secant else y_dot_y,
                grad_dot_direction=g_dot_d,
                direction_sq=d_dot_y / step_size if secant else d_dot_d,
            ),
            euclidean_direction_sq=d_dot_d,
            scaled_grads=scaled_grads,
        )

    def _stop_reason(self, measured: _Measurements, state: dict, options: dict, progress: _Progress) -> StopReason | None:
        """Apply the stop tests in order: finiteness, gradient, change, iteration and evaluation limits."""
        if not measured.finite:
            progress.detail = "at the start point of the step"
            state["restart_pending"] = True
            return StopReason.NON_FINITE

        # A zero gradient difference means no line search has moved since the previous gradient was saved.
        if state["step_size"] is not None and measured.products.diff_sq > 0.0:
            direction_sq = measured.products.direction_sq
            if measured.scaled_grads is not None:
                direction_sq = measured.euclidean_direction_sq
            progress.curvature = measured.products.direction_dot_diff / (state["step_size"] * direction_sq)

        if measured.max_grad <= options["tolerance_grad"]:
            return StopReason.CONVERGED_GRAD

        if progress.iterations > 0:
            moved = state["step_size"] * measured.max_direction
            loss_change = abs(measured.loss - state["prev_loss"])
            if moved <= options["tolerance_change"] or loss_change < options["tolerance_change"]:
                return StopReason.CONVERGED_CHANGE

        if progress.iterations >= options["max_iter"]:
            return StopReason.MAX_ITER
        if progress.evaluations >= options["max_eval"]:
            return StopReason.MAX_EVAL
        return None

    def _restart_due(self, measured: _Measurements, state: dict, options: dict) -> bool:
        """Decide whether to restart with steepest descent before computing beta."""
        if state["restart_pending"]:
            return True
        if options["restart"] is not None and state["n_iter"] % options["restart"] == 0:
            return True

        threshold = options["powell_threshold"]
        products = measured.products
        return threshold is not None and abs(products.grad_dot_prev_grad) >= threshold * products.grad_sq

    def _update_direction(
        self, params: list[Tensor], measured: _Measurements, state: dict, options: dict, progress: _Progress
    ) -> None:
        """Set the direction to :math:`-g + \\beta d` in place, or to :math:`-g` on a restart."""
        products = measured.products
        restart = self._restart_due(measured, state, options)
        beta = 0.0 if restart else compute_beta(options["beta"], products)
        slope = -products.grad_sq + beta * products.grad_dot_direction

        if not restart and not slope <= -SUFFICIENT_DESCENT * products.grad_sq:
            restart, beta, slope = True, 0.0, -products.grad_sq

        grads = measured.scaled_grads
        if grads is None:
            grads = self._preconditioned(params, _gradients(params))
        directions = self._buffers(params, "direction")
        if restart:
            torch._foreach_copy_(directions, grads)
            torch._foreach_neg_(directions)
        else:
            torch._foreach_mul_(directions, beta)
            torch._foreach_sub_(directions, grads)

        state["restart_pending"] = False
        progress.restarted = progress.restarted or restart
        progress.beta = beta
        progress.directional_derivative = slope

    def _buffers(self, params: list[Tensor], key: str) -> list[Tensor]:
        """Return the per-parameter state tensors called ``key``, allocating zeros on first use."""
        buffers = []
        for param in params:
            param_state = self.state[param]
            if key not in param_state:
                param_state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
            buffers.append(param_state[key])
        return buffers

    def _initial_step(self, measured: _Measurements, state: dict, options: dict, slope: float) -> float:
        """Choose the first trial step of the line search."""
        previous_step = state["step_size"]
        if state.get("history_order"):
            # -H g is scaled like a Newton step, so the unit step is the natural first trial.
            return 1.0
        if previous_step is None:
            return options["lr"] / math.sqrt(measured.products.grad_sq)

        candidate = previous_step * state["directional_derivative"] / slope
        if not math.isfinite(candidate) or candidate <= 0.0:
            return previous_step
        return min(max(candidate, _MIN_STEP_SHRINK * previous_step), _MAX_STEP_GROWTH * previous_step)

    def _search(
        self,
        closure: Callable,
        params: list[Tensor],
        start: list[Tensor],
        measured: _Measurements,
        state: dict,
        options: dict,
        progress: _Progress,
    ) -> tuple[StopReason | None, float]:
        """Run one line search from ``start`` and accept its step, or restore ``start``."""
        slope = progress.directional_derivative
        initial_step = self._initial_step(measured, state, options, slope)
        torch._foreach_copy_(self._buffers(params, "previous_grad"), _gradients(params))

        directions = self._buffers(params, "direction")
        model = _LineModel(closure, params, start, directions)
        budget = min(MAX_LINE_SEARCH_EVALUATIONS, options["max_eval"] - progress.evaluations)
        result = self._run_line_search(model, measured.loss, slope, initial_step, budget, options, params[0].dtype)
        self._count_evaluation(state, progress, result.evaluations)

        if result.success or (result.step > 0.0 and result.step == model.last_step):
            self._accept(result, measured, state, progress, slope)
            state["restart_pending"] = not result.success
            return None, result.value

        return self._reject(model, result, measured, start, state, options, progress, budget)

    def _run_line_search(
        self, model: _LineModel, value0: float, slope: float, initial_step: float, budget: int, options: dict, dtype
    ) -> searches.LineSearchResult:
        step_tolerance = float(torch.finfo(dtype).eps)
        if options["line_search"] == "hager_zhang":
            return searches.hager_zhang(
                model, value0, slope, initial_step, delta=options["c1"], sigma=options["c2"],
                max_evaluations=budget, step_tolerance=step_tolerance,
            )
        return searches.strong_wolfe(
            model, value0, slope, initial_step, c1=options["c1"], c2=options["c2"],
            max_evaluations=budget, step_tolerance=step_tolerance,
        )

    def _accept(
        self, result: searches.LineSearchResult, measured: _Measurements, state: dict, progress: _Progress, slope: float
    ) -> None:
        state["step_size"] = result.step
        state["directional_derivative"] = slope
        state["prev_loss"] = measured.loss
        state["prev_grad_sq"] = measured.products.grad_sq
        state["pair_pending"] = True
        state["current_pair_stored"] = False
        state["n_iter"] += 1
        progress.iterations += 1

    def _reject(
        self,
        model: _LineModel,
        result: searches.LineSearchResult,
        measured: _Measurements,
        start: list[Tensor],
        state: dict,
        options: dict,
        progress: _Progress,
        budget: int,
    ) -> tuple[StopReason | None, float]:
        """Handle a failed search: move to its best point if one exists, else restore the start point.

        The best point was not the last trial, so the gradient in ``.grad`` belongs to another
        point and the closure runs once more at the best point.
        """
        state["restart_pending"] = True

        if result.step > 0.0 and progress.evaluations < options["max_eval"]:
            value, _ = model(result.step)
            self._count_evaluation(state, progress)
            if math.isfinite(value):
                self._accept(result, measured, state, progress, progress.directional_derivative)
                return None, value

        self._restore(model.params, start)
        progress.detail = result.reason
        if model.non_finite_trials > 0 and result.step == 0.0:
            self._forget_history()
            return StopReason.NON_FINITE, measured.loss
        if budget < MAX_LINE_SEARCH_EVALUATIONS and result.reason == "evaluation budget exhausted":
            return StopReason.MAX_EVAL, measured.loss

        self._forget_history()
        return StopReason.LINE_SEARCH_FAILED, measured.loss

    def _forget_history(self) -> None:
        """Drop the step pairs of the quasi-Newton preconditioner after a failed search.

        Otherwise the next step would repeat the same search from the same point. Without the
        pairs it searches along :math:`-g` with another first trial step, as L-BFGS-B does
        after a failed line search. The buffers stay allocated.
        """
        state = self._run_state()
        if state.get("history_order"):
            state["history_order"] = []
            state["current_pair_stored"] = False

    def _restore(self, params: list[Tensor], start: list[Tensor]) -> None:
        """Return to the start point, with its gradient (saved as the previous gradient) in ``.grad``."""
        torch._foreach_copy_(params, start)
        previous_grads = self._buffers(params, "previous_grad")
        for param, previous in zip(params, previous_grads):
            if param.grad is None:
                param.grad = previous.clone()
            else:
                param.grad.copy_(previous)

    def _stats(self, state: dict, progress: _Progress, reason: StopReason) -> CGStepStats:
        step_size = state["step_size"]
        message = _MESSAGES[reason].format(max_grad=progress.max_grad, detail=progress.detail or "no detail")
        return CGStepStats(
            loss=progress.loss,
            evaluations=progress.evaluations,
            iterations=progress.iterations,
            step_size=math.nan if step_size is None else step_size,
            beta=progress.beta,
            restarted=progress.restarted,
            directional_derivative=progress.directional_derivative,
            curvature=progress.curvature,
            reason=reason,
            message=message,
            grad_norm=progress.grad_norm,
        )
