"""Dynamic CG batch: the variance test of Byrd, Chin, Nocedal and Wu (2012), its estimate, and growth in a Trainer."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import MemoryLogger, TinyClassifier, make_trainer
from lightning_twophase import ConjugateGradient, ConvexitySwitch
from lightning_twophase.batch_policy import DynamicBatchPolicy, VarianceEstimate, estimate_gradient_variance
from lightning_twophase.detection import FixedEpochDetector
from lightning_twophase.objective import FixedBatchObjective, MicroBatchSource
from lightning_twophase.tensorboard import TAG

# ---------------------------------------------------------------------- the test and the growth rule


@pytest.mark.parametrize(
    ("variance_l1", "grad_norm_sq", "expected_pass"),
    [
        (10.0, 1.0, True),
        (25.0, 1.0, True),
        (25.01, 1.0, False),
        (100.0, 1.0, False),
        (0.0, 0.0, True),
        (1.0, 0.0, False),
    ],
)
def test_passes_hand_computed(variance_l1, grad_norm_sq, expected_pass):
    # theta = 0.5: the test is variance_l1 / 100 <= 0.25 * grad_norm_sq; 25 / 100 = 0.25 is the boundary.
    policy = DynamicBatchPolicy(initial_size=100, theta=0.5)

    assert policy.passes(VarianceEstimate(variance_l1, grad_norm_sq, 100)) is expected_pass


@pytest.mark.parametrize(
    ("variance_l1", "grad_norm_sq", "dataset_size", "expected"),
    [
        (10.0, 1.0, 1000, 100),  # passes: unchanged
        (100.0, 1.0, 1000, 400),  # Var / (theta^2 |g|^2) = 100 / 0.25
        (30.0, 1.0, 1000, 150),  # 120 is below min_growth * 100 = 150
        (10_000.0, 1.0, 1000, 1000),  # capped at the data set
        (1.0, 0.0, 1000, 1000),  # zero gradient: grow to the whole set
        (100.1, 1.0, 1000, 401),  # rounded up
    ],
)
def test_next_size_hand_computed(variance_l1, grad_norm_sq, dataset_size, expected):
    policy = DynamicBatchPolicy(initial_size=100, theta=0.5, min_growth=1.5)

    assert policy.next_size(VarianceEstimate(variance_l1, grad_norm_sq, 100), dataset_size) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_size": 1}, "Invalid initial_size: 1"),
        ({"initial_size": True}, "Invalid initial_size: True"),
        ({"theta": 0.0}, "Invalid theta: 0.0"),
        ({"theta": 1.0}, "Invalid theta: 1.0"),
        ({"min_growth": 1.0}, "Invalid min_growth: 1.0"),
        ({"test_every": 0}, "Invalid test_every: 0"),
    ],
)
def test_invalid_arguments(kwargs, message):
    arguments = {"initial_size": 64, **kwargs}
    with pytest.raises(ValueError, match=message):
        DynamicBatchPolicy(**arguments)


# ---------------------------------------------------------------------- the variance estimate

FEATURES = 3


def regression_data(samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, FEATURES, generator=generator, dtype=torch.float64)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    noise = torch.randn(samples, generator=generator, dtype=torch.float64)
    return inputs, (inputs @ weights + noise).unsqueeze(1)


def linear_model() -> nn.Linear:
    model = nn.Linear(FEATURES, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, 0.1, -0.2]], dtype=torch.float64))
        model.bias.fill_(0.05)
    return model


def per_sample_gradients(model: nn.Linear, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""Return the (N, 4) per-sample gradients of :math:`\tfrac12 (w^\top x + b - y)^2`: :math:`r_i (x_i, 1)`."""
    with torch.no_grad():
        residuals = model(inputs) - targets
    return residuals * torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)


def micro_batch_gradient(model: nn.Linear):
    """Return ``gradient_of`` for ``estimate_gradient_variance``: autograd on one micro-batch's mean loss."""

    def gradient_of(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        inputs, targets = batch
        model.zero_grad(set_to_none=True)
        (0.5 * (model(inputs) - targets).pow(2).mean()).backward()
        return [model.weight.grad, model.bias.grad], len(inputs)

    return gradient_of


def split(inputs: torch.Tensor, targets: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(inputs.split(size), targets.split(size)))


def test_variance_single_sample_micro_batches_exact():
    model = linear_model()
    inputs, targets = regression_data(64)
    gradients = per_sample_gradients(model, inputs, targets)

    estimate = estimate_gradient_variance(split(inputs, targets, 1), micro_batch_gradient(model))

    assert estimate.batch_size == 64
    assert estimate.variance_l1 == pytest.approx(float(gradients.var(dim=0).sum()), rel=1e-10)
    assert estimate.grad_norm_sq == pytest.approx(float(gradients.mean(dim=0).pow(2).sum()), rel=1e-10)


def test_variance_scales_micro_batch_spread():
    # With micro-batches of 4 the estimate is 4 * (unbiased variance of the micro-batch means).
    model = linear_model()
    inputs, targets = regression_data(64)
    means = per_sample_gradients(model, inputs, targets).reshape(16, 4, FEATURES + 1).mean(dim=1)

    estimate = estimate_gradient_variance(split(inputs, targets, 4), micro_batch_gradient(model))

    assert estimate.variance_l1 == pytest.approx(4.0 * float(means.var(dim=0).sum()), rel=1e-10)
    assert estimate.grad_norm_sq == pytest.approx(float(means.mean(dim=0).pow(2).sum()), rel=1e-10)


def test_variance_estimates_per_sample_variance():
    # i.i.d. samples: b * Var(micro-batch mean) estimates the per-sample variance; 512 micro-batches
    # give a relative standard error of a few percent.
    model = linear_model()
    inputs, targets = regression_data(4096, seed=3)
    exact = float(per_sample_gradients(model, inputs, targets).var(dim=0).sum())

    estimate = estimate_gradient_variance(split(inputs, targets, 8), micro_batch_gradient(model))

    assert estimate.variance_l1 == pytest.approx(exact, rel=0.15)


def test_variance_unbiased_with_short_last_micro_batch():
    # Micro-batches of 32, 32, 32 and 4 i.i.d. samples: averaged over 300 draws the estimate must
    # match the per-sample variance. Treating the 4-sample mean like the others overestimates it
    # about 2.1 times, because its spread is 8 times larger.
    model = linear_model()
    ratios, gradient_errors = [], []
    for seed in range(300):
        inputs, targets = regression_data(100, seed=seed)
        gradients = per_sample_gradients(model, inputs, targets)
        batches = [(inputs[a:b], targets[a:b]) for a, b in ((0, 32), (32, 64), (64, 96), (96, 100))]

        estimate = estimate_gradient_variance(batches, micro_batch_gradient(model))

        ratios.append(estimate.variance_l1 / float(gradients.var(dim=0).sum()))
        gradient_errors.append(abs(estimate.grad_norm_sq / float(gradients.mean(dim=0).pow(2).sum()) - 1.0))

    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.15)
    assert max(gradient_errors) < 1e-10, "grad_norm_sq must be the squared norm of the CG-batch gradient"


def test_variance_world_size_scaling():
    model = linear_model()
    inputs, targets = regression_data(64)
    single = estimate_gradient_variance(split(inputs, targets, 4), micro_batch_gradient(model))

    double = estimate_gradient_variance(split(inputs, targets, 4), micro_batch_gradient(model), world_size=2)

    assert double.batch_size == 2 * single.batch_size
    assert double.variance_l1 == pytest.approx(2.0 * single.variance_l1, rel=1e-12)
    assert double.grad_norm_sq == pytest.approx(single.grad_norm_sq, rel=1e-12)


def test_variance_rejects_one_micro_batch():
    model = linear_model()
    inputs, targets = regression_data(8)

    with pytest.raises(ValueError, match="1 micro-batch"):
        estimate_gradient_variance(split(inputs, targets, 8), micro_batch_gradient(model))


def test_objective_gradient_variance_matches_direct():
    model = linear_model()
    inputs, targets = regression_data(64)
    counted: list[int] = []
    objective = FixedBatchObjective(
        MicroBatchSource(loader=DataLoader(TensorDataset(inputs, targets), batch_size=4, shuffle=False), total=64),
        prepare_batch=lambda batch: batch,
        training_step=lambda batch, index: 0.5 * (model(batch[0]) - batch[1]).pow(2).mean(),
        backward=lambda loss: loss.backward(),
        zero_grad=lambda: model.zero_grad(set_to_none=True),
        count_samples=counted.append,
        params=lambda: list(model.parameters()),
    )
    objective()
    assert objective.last_loss is not None

    estimate = objective.gradient_variance()
    assert all(p.grad is None for p in model.parameters())
    assert objective.last_loss is None, "the evaluation cache must be dropped"
    direct = estimate_gradient_variance(split(inputs, targets, 4), micro_batch_gradient(model))

    assert estimate.variance_l1 == pytest.approx(direct.variance_l1, rel=1e-12)
    assert estimate.grad_norm_sq == pytest.approx(direct.grad_norm_sq, rel=1e-12)
    assert counted == [64, 64]


# ---------------------------------------------------------------------- growth in a Trainer


class CGOptimizers(Callback):
    """Records every distinct optimizer object stepped after the swap; place it after the switch."""

    def __init__(self, switch: ConvexitySwitch) -> None:
        self.switch = switch
        self.optimizers: list[Any] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        optimizer = trainer.optimizers[0]
        if self.switch.switched and all(optimizer is not seen for seen in self.optimizers):
            self.optimizers.append(optimizer)


def test_cg_batch_grows_in_trainer():
    L.seed_everything(0, verbose=False)
    switch = ConvexitySwitch(
        detector=FixedEpochDetector(epoch=0),
        cg_kwargs={"max_iter": 2},
        cg_batch_policy=DynamicBatchPolicy(initial_size=64, theta=0.1, test_every=1),
    )
    optimizers, logger = CGOptimizers(switch), MemoryLogger()
    trainer = make_trainer(max_epochs=3, callbacks=[switch, optimizers], logger=logger)
    trainer.fit(TinyClassifier())

    sizes = [value for _, value in logger.values(TAG.CG_BATCH_SIZE)]
    cg_losses = [value for step, value in logger.values(TAG.LOSS) if step > switch.switch_step]
    assert switch.switched
    assert sizes, "no twophase/cg/batch_size scalar logged"
    assert sizes == sorted(sizes)
    assert switch.cg_batch_size_used > 64
    assert switch.cg_batch_size_used == max(sizes)
    # The objective behind the installed CG optimizer evaluates the grown batch (a private attribute).
    assert switch._objective.source.total == switch.cg_batch_size_used
    assert len(optimizers.optimizers) >= 2, "the CG optimizer was not rebuilt after growth"
    assert all(isinstance(optimizer, ConjugateGradient) for optimizer in optimizers.optimizers)
    assert trainer.optimizers[0] is optimizers.optimizers[-1]
    assert cg_losses and all(math.isfinite(loss) for loss in cg_losses)
    assert cg_losses[-1] < cg_losses[0]
