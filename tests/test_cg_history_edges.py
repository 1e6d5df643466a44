"""Edge cases of the quasi-Newton preconditioner of ConjugateGradient (``history_size > 0``).

The stored step pairs are checked against the iterates themselves: every pair must equal
:math:`(x_{k+1} - x_k, g_{k+1} - g_k)` of the points the optimizer really visited, also after a
failed line search that moved to its best point and after non-finite trials. Directions are
checked against a dense BFGS matrix built from those iterates.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from helpers import TinyClassifier, digits_dataset, make_trainer
from lightning_twophase import ConvexitySwitch
from lightning_twophase.detection import FixedEpochDetector
from lightning_twophase.optim import ConjugateGradient

FLOAT64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    # Bit-identical comparisons need one summation order, and one thread is faster for these sizes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def spd_matrix(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(size, size, dtype=FLOAT64, generator=generator)
    return matrix @ matrix.T / size + 0.1 * torch.eye(size, dtype=FLOAT64)


def objective_closure(optimizer: ConjugateGradient, objective: Any, x: torch.Tensor) -> Any:
    """Return the closure that clears the gradients, evaluates ``objective(x)`` and backpropagates."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective(x)
        loss.backward()
        return loss

    return closure


def gradient_at(objective: Any, point: torch.Tensor) -> torch.Tensor:
    """Return the gradient of ``objective`` at a copy of ``point``, independent of the optimizer."""
    copy = point.detach().clone().requires_grad_(True)
    objective(copy).backward()
    return copy.grad


def dense_inverse_hessian(pairs: list[tuple[torch.Tensor, torch.Tensor]], size: int) -> torch.Tensor:
    """Build the BFGS inverse-Hessian matrix from the pairs (oldest first), or the identity without pairs."""
    identity = torch.eye(size, dtype=FLOAT64)
    if not pairs:
        return identity

    newest_s, newest_y = pairs[-1]
    inverse = float(newest_s @ newest_y / (newest_y @ newest_y)) * identity
    for s, y in pairs:
        rho = 1.0 / float(s @ y)
        left = identity - rho * torch.outer(s, y)
        inverse = left @ inverse @ left.T + rho * torch.outer(s, s)
    return inverse


def dense_beta(name: str, grad: torch.Tensor, inverse: torch.Tensor, pair: tuple, direction: torch.Tensor,
               prev_grad_sq: float) -> float:
    """Return the beta formula ``name`` with every gradient inner product taken in the metric of ``inverse``."""
    s, y = pair
    scaled = inverse @ grad
    d_dot_y = float(direction @ y)
    grad_sq = float(grad @ scaled)
    if name == "hs":
        return float(scaled @ y) / d_dot_y
    if name == "pr+":
        return max(0.0, float(scaled @ y) / prev_grad_sq)
    if name == "fr":
        return grad_sq / prev_grad_sq
    if name == "dy":
        return grad_sq / d_dot_y
    # Hager-Zhang, with y^T H y and d^T H^-1 d from the dense matrices instead of the secant shortcut.
    y_h_y = float(y @ inverse @ y)
    direction_norm = math.sqrt(float(direction @ torch.linalg.solve(inverse, direction)))
    unbounded = (float(scaled @ y) - 2.0 * y_h_y * float(grad @ direction) / d_dot_y) / d_dot_y
    return max(unbounded, -1.0 / (direction_norm * min(0.01, math.sqrt(prev_grad_sq))))


def newest_pair(optimizer: ConjugateGradient, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    state = optimizer.state[param]
    slot = state["history_order"][-1]
    return state["history_s"][slot], state["history_y"][slot]


def run_one_iteration_per_step(objective: Any, start: torch.Tensor, steps: int, **kwargs: Any) -> dict[str, Any]:
    """Step ``steps`` times with ``max_iter=1`` and compare every new pair with the iterates.

    Returns counts of stored pairs, pair mismatches and non-finite trial losses. A trial point seen
    twice in one step is the re-evaluation at the best point of a failed search, counted as
    ``repeated``. The ``*_pairs`` counts are the pairs stored in steps with such a repeat or with
    a non-finite trial.
    """
    x = start.detach().clone().requires_grad_(True)
    optimizer = ConjugateGradient([x], max_iter=1, **kwargs)
    trials: list[tuple[tuple[float, ...], float]] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective(x)
        loss.backward()
        trials.append((tuple(x.detach().tolist()), float(loss.detach())))
        return loss

    counts = {"stored": 0, "mismatched": 0, "repeated": 0, "best_point_pairs": 0, "non_finite": 0, "non_finite_pairs": 0}
    counts.update(optimizer=optimizer, param=x)
    for _ in range(steps):
        before = x.detach().clone()
        order_before = list(optimizer.state[x].get("history_order", []))
        trials.clear()
        optimizer.step(closure)

        points = [point for point, _ in trials[1:]]
        repeated = len(points) - len(set(points))
        counts["repeated"] += repeated
        non_finite = sum(not math.isfinite(loss) for _, loss in trials)
        counts["non_finite"] += non_finite
        order_after = optimizer.state[x]["history_order"]
        # An emptied order is a failed search that dropped the pairs, not a stored pair.
        if order_after == order_before or not order_after:
            continue

        counts["stored"] += 1
        counts["best_point_pairs"] += repeated > 0
        counts["non_finite_pairs"] += non_finite > 0
        s, y = newest_pair(optimizer, x)
        after = x.detach().clone()
        expected_y = gradient_at(objective, after) - gradient_at(objective, before)
        matches = torch.allclose(s, after - before, rtol=1e-9, atol=1e-13) and torch.allclose(
            y, expected_y, rtol=1e-9, atol=1e-13
        )
        counts["mismatched"] += not matches
    return counts


@pytest.mark.parametrize("beta", ["hs", "pr+", "fr", "dy", "hz"])
def test_directions_match_dense_bfgs(beta: str) -> None:
    """d = -H g + beta d_prev with H built from the visited iterates, and beta from dense matrices."""
    size, memory = 6, 3
    x = torch.full((size,), -1.2, dtype=FLOAT64, requires_grad=True)
    # Powell's test is off so that beta is used on most iterations instead of restarting.
    optimizer = ConjugateGradient([x], max_iter=1, history_size=memory, powell_threshold=None, beta=beta)

    closure = objective_closure(optimizer, rosenbrock, x)

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    previous_inverse = torch.eye(size, dtype=FLOAT64)
    previous_grad = torch.zeros(size, dtype=FLOAT64)
    checked_betas = 0
    for step in range(12):
        point = x.detach().clone()
        grad = gradient_at(rosenbrock, point)
        previous_direction = optimizer.state[x].get("direction", torch.zeros(size, dtype=FLOAT64)).clone()
        optimizer.step(closure)
        stats = optimizer.last_stats
        assert stats.iterations == 1, f"step {step}: {stats.message}"

        inverse = dense_inverse_hessian(pairs[-memory:], size)
        expected = -inverse @ grad + stats.beta * previous_direction
        torch.testing.assert_close(optimizer.state[x]["direction"], expected, rtol=1e-9, atol=1e-12)

        if not stats.restarted:
            prev_grad_sq = float(previous_grad @ previous_inverse @ previous_grad)
            reference = dense_beta(beta, grad, inverse, pairs[-1], previous_direction, prev_grad_sq)
            assert stats.beta == pytest.approx(reference, rel=1e-8), f"step {step}"
            checked_betas += 1

        after = x.detach().clone()
        s, y = after - point, gradient_at(rosenbrock, after) - grad
        assert float(s @ y) > 0.0, "a Wolfe step must have positive curvature"
        torch.testing.assert_close(newest_pair(optimizer, x)[0], s, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(newest_pair(optimizer, x)[1], y, rtol=1e-9, atol=1e-13)
        pairs.append((s, y))
        previous_inverse, previous_grad = inverse, grad

    assert checked_betas >= 3, "too few non-restarted iterations to check beta"


def test_pairs_after_best_point_move() -> None:
    """A failed search that moves to its best point stores the pair of that point."""
    size = 6
    hessian = spd_matrix(size, seed=3)
    centre = torch.randn(size, dtype=FLOAT64, generator=torch.Generator().manual_seed(4))

    def kinked(x: torch.Tensor) -> torch.Tensor:
        # The kinks make the strong Wolfe curvature condition unreachable near the minimum.
        return 0.5 * x @ hessian @ x + (x - centre).abs().sum()

    # max_eval above 1 + 20 leaves an evaluation for the move to the best point.
    counts = run_one_iteration_per_step(kinked, torch.zeros(size, dtype=FLOAT64), steps=16, history_size=4, max_eval=100)

    assert counts["repeated"] >= 1, "no failed search moved to its best point"
    assert counts["best_point_pairs"] >= 1, "no pair was stored after a move to the best point"
    assert counts["stored"] >= 10
    assert counts["mismatched"] == 0


def test_pairs_after_non_finite_trials() -> None:
    """Trials beyond a log barrier are non-finite, but the stored pairs still come from finite iterates."""
    size = 6
    hessian = spd_matrix(size, seed=2)
    linear = torch.randn(size, dtype=FLOAT64, generator=torch.Generator().manual_seed(3))

    def barrier(x: torch.Tensor) -> torch.Tensor:
        # log of a negative number is NaN, so every trial with some x_i > 1 is non-finite.
        return 0.5 * x @ hessian @ x - 10.0 * linear @ x - torch.log(1.0 - x).sum()

    counts = run_one_iteration_per_step(barrier, torch.zeros(size, dtype=FLOAT64), steps=12, history_size=4)
    optimizer, x = counts["optimizer"], counts["param"]

    assert counts["non_finite"] >= 3, "the unit step never crossed the barrier"
    assert counts["non_finite_pairs"] >= 2, "no pair was stored after a non-finite trial"
    assert counts["mismatched"] == 0
    assert bool(torch.isfinite(optimizer.state[x]["history_s"]).all())
    assert bool(torch.isfinite(optimizer.state[x]["history_y"]).all())
    assert all(math.isfinite(rho) for rho in optimizer.state[x]["history_rho"])


def test_skipped_pair_keeps_older_pairs() -> None:
    """Steps with s^T y < 0 store nothing, keep the older pairs and restart with -H g of those pairs."""
    size = 6
    hessian = spd_matrix(size, seed=0)
    target = torch.full((size,), 0.5, dtype=FLOAT64)
    concave = False

    def objective(x: torch.Tensor) -> torch.Tensor:
        if not concave:
            return 0.5 * (x - target) @ hessian @ (x - target)
        # Concave, with non-finite values beyond x_i = 1 that end every line search below the wall.
        wall = torch.where((x > 1.0).any(), float("nan"), 0.0)
        return -0.5 * (x**2).sum() + wall

    x = torch.full((size,), 0.1, dtype=FLOAT64, requires_grad=True)
    optimizer = ConjugateGradient([x], max_iter=1, history_size=3)

    closure = objective_closure(optimizer, objective, x)

    for _ in range(3):
        optimizer.step(closure)
    state = optimizer.state[x]
    assert state["history_order"] == [0, 1, 2]
    stored_s, stored_y = state["history_s"].clone(), state["history_y"].clone()
    stored_rho = list(state["history_rho"])
    inverse = dense_inverse_hessian([(stored_s[slot], stored_y[slot]) for slot in range(3)], size)

    concave = True
    optimizer.step(closure)
    for step in range(3):
        grad = gradient_at(objective, x)
        optimizer.step(closure)
        stats = optimizer.last_stats
        assert stats.iterations == 1, stats.message
        assert stats.curvature < 0.0, f"step {step}"
        assert stats.restarted, f"step {step}"
        torch.testing.assert_close(state["direction"], -inverse @ grad, rtol=1e-9, atol=1e-12)

    assert state["history_order"] == [0, 1, 2]
    assert torch.equal(state["history_s"], stored_s)
    assert torch.equal(state["history_y"], stored_y)
    assert state["history_rho"] == stored_rho


def make_grouped_problem(dtype: torch.dtype, history_size: int = 4) -> tuple[list[torch.Tensor], ConjugateGradient, Any]:
    """Return parameters in two groups (the last one never used, so its grad stays None), an optimizer and a closure."""
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(64, 5, generator=generator, dtype=dtype)
    targets = torch.randn(64, 2, generator=generator, dtype=dtype)
    weight = torch.randn(5, 8, generator=generator, dtype=dtype).requires_grad_(True)
    output = torch.randn(8, 2, generator=generator, dtype=dtype).requires_grad_(True)
    unused = torch.randn(3, generator=generator, dtype=dtype).requires_grad_(True)
    params = [weight, output, unused]
    optimizer = ConjugateGradient([{"params": [weight]}, {"params": [output, unused]}], max_iter=3,
                                  history_size=history_size)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = ((torch.tanh(inputs @ weight) @ output - targets) ** 2).mean()
        loss.backward()
        return loss

    return params, optimizer, closure


def reload(optimizer: ConjugateGradient, into: ConjugateGradient) -> None:
    """Load ``optimizer``'s state into ``into`` through bytes, as a checkpoint does."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    into.load_state_dict(torch.load(buffer, weights_only=True))


def test_round_trip_mixed_groups_float32() -> None:
    params, optimizer, closure = make_grouped_problem(torch.float32)
    for _ in range(3):
        optimizer.step(closure)
    assert len(optimizer.state[params[0]]["history_order"]) >= 2

    restored_params, restored, restored_closure = make_grouped_problem(torch.float32)
    with torch.no_grad():
        for target, source in zip(restored_params, params):
            target.copy_(source)
    reload(optimizer, restored)
    unused_start = params[2].detach().clone()

    for step in range(4):
        optimizer.step(closure)
        restored.step(restored_closure)
        for index, (original, copy) in enumerate(zip(params, restored_params)):
            assert torch.equal(original.detach(), copy.detach()), f"step {step}, parameter {index}"
        assert optimizer.state[params[0]]["history_order"] == restored.state[restored_params[0]]["history_order"]

    assert torch.equal(params[2].detach(), unused_start), "a parameter without gradient moved"
    assert not bool(optimizer.state[params[2]]["history_s"].any())
    for param in restored_params:
        assert restored.state[param]["history_s"].dtype == torch.float32
        assert restored.state[param]["history_y"].shape == (4, *param.shape)


def test_load_casts_history_to_param_dtype() -> None:
    params, optimizer, closure = make_grouped_problem(torch.float32)
    for _ in range(3):
        optimizer.step(closure)

    wide_params, wide, wide_closure = make_grouped_problem(FLOAT64)
    with torch.no_grad():
        for target, source in zip(wide_params, params):
            target.copy_(source)
    reload(optimizer, wide)

    for param in wide_params:
        assert wide.state[param]["history_s"].dtype == FLOAT64
        assert wide.state[param]["history_y"].dtype == FLOAT64
    loss_before = float(wide_closure().detach())
    wide.step(wide_closure)
    assert wide.last_stats.iterations >= 1, wide.last_stats.message
    assert float(wide_closure().detach()) < loss_before


def test_load_keeps_saved_history_size() -> None:
    """Loading a state with 4 pairs into an optimizer built with 2 keeps 4, like every saved hyperparameter."""
    params, optimizer, closure = make_grouped_problem(FLOAT64, history_size=4)
    for _ in range(3):
        optimizer.step(closure)

    restored_params, restored, restored_closure = make_grouped_problem(FLOAT64, history_size=2)
    with torch.no_grad():
        for target, source in zip(restored_params, params):
            target.copy_(source)
    reload(optimizer, restored)

    assert restored.param_groups[0]["history_size"] == 4
    for _ in range(3):
        optimizer.step(closure)
        restored.step(restored_closure)
    assert torch.equal(params[0].detach(), restored_params[0].detach())


def test_removing_preconditioner_keeps_history() -> None:
    """set_preconditioner(None) restarts the direction with -H g and keeps the stored pairs."""
    x = torch.full((6,), -1.2, dtype=FLOAT64, requires_grad=True)
    optimizer = ConjugateGradient([x], max_iter=1, history_size=3, powell_threshold=None)

    closure = objective_closure(optimizer, rosenbrock, x)

    for _ in range(4):
        optimizer.step(closure)
    state = optimizer.state[x]
    pairs = [(state["history_s"][slot].clone(), state["history_y"][slot].clone()) for slot in state["history_order"]]
    grad = gradient_at(rosenbrock, x)

    optimizer.set_preconditioner(None)
    optimizer.step(closure)

    assert optimizer.last_stats.restarted
    assert optimizer.last_stats.beta == 0.0
    expected = -dense_inverse_hessian(pairs, 6) @ grad
    torch.testing.assert_close(state["direction"], expected, rtol=1e-9, atol=1e-12)


def test_setting_preconditioner_mid_run_rejected() -> None:
    params, optimizer, closure = make_grouped_problem(FLOAT64)
    optimizer.step(closure)
    state = optimizer.state[params[0]]
    order, restart = list(state["history_order"]), state["restart_pending"]

    with pytest.raises(ValueError, match="Invalid preconditioner with history_size=4"):
        optimizer.set_preconditioner([torch.ones_like(param) for param in params])

    assert state["history_order"] == order
    assert state["restart_pending"] == restart
    assert "preconditioner" not in state


# ---------------------------------------------------------------------- Lightning resume

EPOCHS = 6
RESUME_EPOCH = 3


class ReshuffledClassifier(TinyClassifier):
    """:class:`TinyClassifier` whose shuffle order depends only on the seed and the epoch, so a resume draws the same batches."""

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self.dataset, num_replicas=1, rank=0, shuffle=True, seed=7)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=0)


def fit_two_phase(root: Path, cg_dtype: torch.dtype | None, ckpt_path: Path | None = None) -> tuple[L.LightningModule, L.Trainer]:
    """Swap to CG at epoch 1 and train ``EPOCHS`` epochs, saving a checkpoint after every epoch."""
    L.seed_everything(0, verbose=False)
    model = ReshuffledClassifier(features=64, classes=10, hidden=16, lr=0.01, dataset=digits_dataset(256), batch_size=64)
    # cg_kwargs as in the DDP worker and the resume tests: merged over the default history_size=10.
    switch = ConvexitySwitch(detector=FixedEpochDetector(epoch=1), cg_micro_batch_size=256, cg_kwargs={"max_iter": 2},
                             switch_back_patience=None, cg_dtype=cg_dtype)
    checkpoints = ModelCheckpoint(dirpath=root, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    trainer = make_trainer(root, max_epochs=EPOCHS, callbacks=[switch, checkpoints], enable_checkpointing=True,
                           deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize("cg_dtype", [None, FLOAT64], ids=["float32", "float64"])
def test_resume_in_cg_phase_bit_identical(tmp_path: Path, cg_dtype: torch.dtype | None) -> None:
    model, trainer = fit_two_phase(tmp_path / "reference", cg_dtype)
    checkpoint = tmp_path / "reference" / f"epoch={RESUME_EPOCH}.ckpt"
    saved = torch.load(checkpoint, weights_only=False)["optimizer_states"][0]
    expected_dtype = cg_dtype or torch.float32

    assert saved["param_groups"][0]["history_size"] == 10
    assert len(saved["state"][0]["history_order"]) == 10
    assert saved["state"][0]["history_order"][0] != 0, "the ring had not wrapped at the checkpoint"
    assert saved["state"][0]["history_s"].dtype == expected_dtype

    resumed_model, resumed_trainer = fit_two_phase(tmp_path / "resumed", cg_dtype, ckpt_path=checkpoint)

    assert resumed_trainer.global_step == trainer.global_step
    for (name, param), resumed in zip(model.named_parameters(), resumed_model.parameters()):
        assert resumed.dtype == expected_dtype, name
        assert torch.equal(param.detach(), resumed.detach()), f"parameter {name} differs after the resume"

    optimizer, resumed_optimizer = trainer.optimizers[0], resumed_trainer.optimizers[0]
    for param, resumed in zip(optimizer.param_groups[0]["params"], resumed_optimizer.param_groups[0]["params"]):
        for key in ("history_s", "history_y", "direction"):
            assert torch.equal(optimizer.state[param][key], resumed_optimizer.state[resumed][key]), key
    first, resumed_first = optimizer.param_groups[0]["params"][0], resumed_optimizer.param_groups[0]["params"][0]
    assert optimizer.state[first]["history_rho"] == resumed_optimizer.state[resumed_first]["history_rho"]
