"""Limited-memory BFGS inverse-Hessian approximation, used as a preconditioner of conjugate gradient.

From the last :math:`m` step pairs :math:`s_i = x_{i+1} - x_i` and :math:`y_i = g_{i+1} - g_i`
with :math:`s_i^T y_i > 0`, the BFGS update applied :math:`m` times to
:math:`H_0 = \\gamma I`, :math:`\\gamma = s^T y / y^T y` of the newest pair, gives

.. math::

    H_{i+1} = (I - \\rho_i s_i y_i^T) H_i (I - \\rho_i y_i s_i^T) + \\rho_i s_i s_i^T,
    \\qquad \\rho_i = 1 / (s_i^T y_i).

:math:`H` is symmetric positive definite and satisfies the secant equation :math:`H y = s` for the
newest pair. The product :math:`H g` costs :math:`4mn` multiply-adds by the two-loop recursion
(Nocedal and Wright, Numerical Optimization, 2nd ed., algorithm 7.4) and is never formed as a
matrix.

Storage: for :math:`n` parameter elements, :math:`2mn` elements, kept per parameter as tensors of
shape ``(m, *param.shape)`` in the optimizer state so that ``state_dict`` carries them. The
coefficients :math:`\\rho_i` and the slot order are host floats in the run state.
"""

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["StepHistory"]


def _total_dot(left: list[Tensor], right: list[Tensor]) -> Tensor:
    """Return :math:`\\sum_p l_p^T r_p` over the parameter tensors as a 0-d tensor (no host sync)."""
    terms = [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(left, right)]
    return torch.stack([term.to(terms[0].device) for term in terms]).sum()


class StepHistory:
    """Ring buffer of the last ``size`` step pairs of one optimizer, kept in its per-parameter and run state.

    Args:
        params: the parameters, in the optimizer's order.
        param_state: returns the state dict of a parameter (``optimizer.state[param]``).
        run_state: the optimizer's scalar run state, with ``history_order`` (slot indices, oldest
            first), ``history_rho`` (:math:`\\rho` per slot) and ``history_gamma``.
        size: the number of pairs kept, :math:`m \\ge 1`.
    """

    def __init__(self, params: list[Tensor], param_state: Callable[[Tensor], dict], run_state: dict, size: int) -> None:
        self.params = params
        self.param_state = param_state
        self.run_state = run_state
        self.size = size
        run_state.setdefault("history_order", [])
        run_state.setdefault("history_rho", [0.0] * size)
        run_state.setdefault("history_gamma", 1.0)

    def __len__(self) -> int:
        return len(self.run_state["history_order"])

    def _slots(self, key: str) -> list[Tensor]:
        """Return the per-parameter buffers ``key`` of shape ``(size, *param.shape)``, allocated on first use."""
        buffers = []
        for param in self.params:
            state = self.param_state(param)
            if key not in state:
                state[key] = torch.zeros((self.size, *param.shape), dtype=param.dtype, device=param.device)
            buffers.append(state[key])
        return buffers

    def push(self, directions: list[Tensor], step_size: float, gradient_changes: list[Tensor], s_dot_y: float, y_dot_y: float) -> bool:
        """Store the pair :math:`s = \\alpha d`, :math:`y`, replacing the oldest one when full.

        Args:
            directions: the direction :math:`d` of the accepted line search.
            step_size: its accepted step :math:`\\alpha`, so that :math:`s = \\alpha d`.
            gradient_changes: :math:`y = g_{k+1} - g_k`.
            s_dot_y: :math:`s^T y`, already computed by the caller.
            y_dot_y: :math:`y^T y`.

        Returns:
            Whether the pair was stored. A pair with :math:`s^T y \\le 0` (no positive curvature
            along the step) or :math:`y = 0` is skipped, because it would make :math:`H` indefinite.
        """
        if not (s_dot_y > 0.0 and y_dot_y > 0.0 and s_dot_y < float("inf") and y_dot_y < float("inf")):
            return False

        order = self.run_state["history_order"]
        slot = order.pop(0) if len(order) == self.size else len(order)
        for buffer, direction in zip(self._slots("history_s"), directions):
            torch.mul(direction, step_size, out=buffer[slot])
        for buffer, change in zip(self._slots("history_y"), gradient_changes):
            buffer[slot].copy_(change)

        order.append(slot)
        self.run_state["history_rho"][slot] = 1.0 / s_dot_y
        self.run_state["history_gamma"] = s_dot_y / y_dot_y
        return True

    def apply(self, vectors: list[Tensor]) -> list[Tensor]:
        """Return :math:`H v` by the two-loop recursion; :math:`v` itself (``H = I``) while empty."""
        order = self.run_state["history_order"]
        if not order:
            return vectors

        rho = self.run_state["history_rho"]
        s_buffers, y_buffers = self._slots("history_s"), self._slots("history_y")
        result = [vector.clone() for vector in vectors]
        coefficients = {}

        for slot in reversed(order):
            s = [buffer[slot] for buffer in s_buffers]
            coefficients[slot] = _total_dot(s, result) * rho[slot]
            torch._foreach_sub_(result, torch._foreach_mul([buffer[slot] for buffer in y_buffers], coefficients[slot]))

        torch._foreach_mul_(result, self.run_state["history_gamma"])

        for slot in order:
            y = [buffer[slot] for buffer in y_buffers]
            correction = coefficients[slot] - _total_dot(y, result) * rho[slot]
            torch._foreach_add_(result, torch._foreach_mul([buffer[slot] for buffer in s_buffers], correction))
        return result
