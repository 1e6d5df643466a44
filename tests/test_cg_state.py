"""ConjugateGradient state, parameter handling, failures, argument checks and Lightning use."""

import io
import math

import pytest
import torch

from lightning_twophase.optim import ConjugateGradient
from lightning_twophase.optim.cg import StopReason


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def make_closure(optimizer, params, objective):
    def closure():
        optimizer.zero_grad()
        loss = objective(*params)
        loss.backward()
        return loss

    return closure


def test_state_dict_round_trip_identical_trajectory():
    x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    optimizer = ConjugateGradient([x], max_iter=3)
    for _ in range(4):
        optimizer.step(make_closure(optimizer, [x], rosenbrock))

    # Serialize as a checkpoint does, so the two optimizers share no tensors.
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored_x = torch.nn.Parameter(x.detach().clone())
    restored = ConjugateGradient([restored_x], max_iter=3)
    restored.load_state_dict(torch.load(buffer))

    for _ in range(5):
        optimizer.step(make_closure(optimizer, [x], rosenbrock))
        restored.step(make_closure(restored, [restored_x], rosenbrock))
        assert torch.equal(x.detach(), restored_x.detach())
    assert restored.state[restored_x]["func_evals"] == optimizer.state[x]["func_evals"]
    assert restored.state[restored_x]["n_iter"] == optimizer.state[x]["n_iter"]


def test_state_dict_carries_scalar_state():
    x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    optimizer = ConjugateGradient([x], max_iter=2)
    optimizer.step(make_closure(optimizer, [x], rosenbrock))
    state = optimizer.state_dict()["state"][0]
    for key in ("func_evals", "n_iter", "step_size", "directional_derivative", "direction", "previous_grad"):
        assert key in state


def test_param_groups_match_single_group():
    def objective(a, b):
        return rosenbrock(torch.stack([a[0], b[0]])) + ((a[1:] - 2) ** 2).sum()

    single = [torch.tensor([-1.2, 0.5, 0.1], dtype=torch.float64, requires_grad=True),
              torch.tensor([1.0], dtype=torch.float64, requires_grad=True)]
    grouped = [tensor.detach().clone().requires_grad_() for tensor in single]

    single_group = ConjugateGradient(single, max_iter=5)
    two_groups = ConjugateGradient([{"params": [grouped[0]]}, {"params": [grouped[1]]}], max_iter=5)
    for _ in range(3):
        single_group.step(make_closure(single_group, single, objective))
        two_groups.step(make_closure(two_groups, grouped, objective))

    for left, right in zip(single, grouped):
        assert torch.equal(left.detach(), right.detach())


def test_param_groups_must_agree():
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid lr in parameter group 1"):
        ConjugateGradient([{"params": [a]}, {"params": [b], "lr": 0.5}])


def test_mixed_dtypes_rejected():
    a = torch.zeros(2, dtype=torch.float32, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid parameter dtypes"):
        ConjugateGradient([a, b])


def test_nan_for_large_steps_keeps_parameters_finite():
    """The loss is NaN beyond a radius: every trial outside it is rejected and the search shrinks."""
    x = torch.tensor([3.0, -2.0], dtype=torch.float64, requires_grad=True)

    def objective(v):
        loss = ((v - 1) ** 2).sum()
        return loss + torch.where(v.norm() > 4.0, torch.tensor(math.nan, dtype=v.dtype), torch.tensor(0.0, dtype=v.dtype))

    optimizer = ConjugateGradient([x], lr=100.0, max_iter=20)
    optimizer.step(make_closure(optimizer, [x], objective))

    assert torch.isfinite(x).all()
    assert torch.allclose(x.detach(), torch.ones(2, dtype=torch.float64), atol=1e-6)


def test_always_non_finite_trials_restore_start_point():
    x = torch.tensor([3.0, -2.0], dtype=torch.float64, requires_grad=True)
    start = x.detach().clone()
    first = [True]

    def objective(v):
        loss = ((v - 1) ** 2).sum()
        if first[0]:
            first[0] = False
            return loss
        return loss * torch.tensor(math.inf, dtype=v.dtype)

    optimizer = ConjugateGradient([x], max_iter=5)
    optimizer.step(make_closure(optimizer, [x], objective))

    assert optimizer.last_stats.reason == StopReason.NON_FINITE
    assert torch.equal(x.detach(), start)
    assert optimizer.state[x]["restart_pending"]
    assert torch.isfinite(x.grad).all()


def test_inf_gradient_at_trial_rejected():
    x = torch.tensor([3.0, -2.0], dtype=torch.float64, requires_grad=True)
    calls = [0]

    def objective(v):
        calls[0] += 1
        loss = ((v - 1) ** 2).sum()
        if calls[0] == 2:
            # Finite loss but an infinite gradient at the first trial point.
            loss = loss + 0.0 * torch.sqrt(v[0] - v[0].detach())
        return loss

    optimizer = ConjugateGradient([x], max_iter=10)
    for _ in range(3):
        optimizer.step(make_closure(optimizer, [x], objective))
        assert torch.isfinite(x).all()

    assert torch.allclose(x.detach(), torch.ones(2, dtype=torch.float64), atol=1e-6)


def test_non_finite_first_evaluation_leaves_parameters():
    x = torch.tensor([3.0, -2.0], dtype=torch.float64, requires_grad=True)
    start = x.detach().clone()
    optimizer = ConjugateGradient([x])
    loss = optimizer.step(make_closure(optimizer, [x], lambda v: (v * math.nan).sum()))

    assert math.isnan(loss.item())
    assert optimizer.last_stats.reason == StopReason.NON_FINITE
    assert torch.equal(x.detach(), start)


def test_sparse_gradient_rejected():
    embedding = torch.nn.Embedding(5, 3, sparse=True)
    optimizer = ConjugateGradient(embedding.parameters())

    def closure():
        optimizer.zero_grad()
        loss = embedding(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step(closure)


def test_step_without_closure_rejected():
    optimizer = ConjugateGradient([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="Invalid closure: None"):
        optimizer.step()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"lr": 0.0}, "Invalid lr: 0.0"),
        ({"max_iter": 0}, "Invalid max_iter: 0"),
        ({"max_eval": 1}, "Invalid max_eval: 1"),
        ({"tolerance_grad": -1.0}, "Invalid tolerance_grad: -1.0"),
        ({"tolerance_change": -1.0}, "Invalid tolerance_change: -1.0"),
        ({"beta": "xx"}, "Invalid beta: 'xx'. Expected one of 'pr\\+', 'fr', 'hs', 'dy', 'hz'."),
        ({"line_search": "armijo"}, "Invalid line_search: 'armijo'"),
        ({"restart": 0}, "Invalid restart: 0"),
        ({"c1": 0.5, "c2": 0.1}, "Invalid c1, c2: 0.5, 0.1"),
        ({"c2": 1.0}, "Invalid c1, c2"),
        ({"powell_threshold": 0.0}, "Invalid powell_threshold: 0.0"),
    ],
)
def test_invalid_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        ConjugateGradient([torch.zeros(2, requires_grad=True)], **arguments)


def test_lightning_trainer_fit_decreases_loss():
    lightning = pytest.importorskip("lightning")

    torch.manual_seed(0)
    inputs = torch.randn(64, 4)
    targets = inputs @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1

    class Regression(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.losses = []

        def training_step(self, batch, batch_index):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return ConjugateGradient(self.parameters(), max_iter=3)

    dataset = torch.utils.data.TensorDataset(inputs, targets)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    model = Regression()
    initial = torch.nn.functional.mse_loss(model.layer(inputs), targets).item()

    trainer = lightning.Trainer(
        max_steps=4, accelerator="cpu", enable_checkpointing=False, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)

    final = torch.nn.functional.mse_loss(model.layer(inputs), targets).item()
    assert isinstance(trainer.optimizers[0], ConjugateGradient)
    assert final < 0.01 * initial
