"""Shared test fixtures: tiny LightningModules, small data sets and a CPU trainer factory.

Everything here runs in seconds on one CPU core. The modules log ``train_loss`` in
``training_step`` and return Adam from ``configure_optimizers`` unless an option changes that.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

__all__ = [
    "FullLossRecorder",
    "MemoryLogger",
    "OptimizerRecorder",
    "TinyClassifier",
    "TinyCNN",
    "StreamDataset",
    "blobs_dataset",
    "digits_dataset",
    "make_loader",
    "make_trainer",
    "parameter_snapshot",
    "assert_parameters_unchanged",
    "history_without_samples",
    "fit_logged_two_phase_run",
    "limit_cpu_threads",
]


# ---------------------------------------------------------------------- data


def blobs_dataset(
    samples: int = 256,
    features: int = 8,
    classes: int = 3,
    label_noise: float = 0.0,
    seed: int = 0,
) -> TensorDataset:
    """Return Gaussian blobs with unit noise around class centres of norm about ``3 * sqrt(features)``.

    Without label noise the classes are separable in practice, and a closure-based optimizer
    drives the loss towards 0, where float32 arithmetic reaches subnormal numbers and runs
    very slowly on CPU. ``label_noise`` relabels that fraction of the samples at random,
    which keeps the minimum of the training loss well above 0.
    """
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(classes, features, generator=generator)
    labels = torch.arange(samples) % classes
    inputs = centres[labels] + torch.randn(samples, features, generator=generator)

    flipped = torch.rand(samples, generator=generator) < label_noise
    random_labels = torch.randint(classes, (samples,), generator=generator)
    labels = torch.where(flipped, random_labels, labels)
    return TensorDataset(inputs, labels)


def digits_dataset(samples: int | None = None, image: bool = False) -> TensorDataset:
    """Return scikit-learn's 8x8 digits scaled to [0, 1], flat (64 features) or as 1x8x8 images.

    Args:
        samples: Keep only the first this many samples; ``None`` keeps all 1,797.
        image: Shape the inputs as ``(N, 1, 8, 8)`` for :class:`TinyCNN`.
    """
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(images, dtype=torch.float32) / 16.0
    targets = torch.tensor(labels)
    if samples is not None:
        inputs, targets = inputs[:samples], targets[:samples]
    if image:
        inputs = inputs.reshape(-1, 1, 8, 8)
    return TensorDataset(inputs, targets)


class StreamDataset(IterableDataset):
    """An ``IterableDataset`` that yields the samples of a ``TensorDataset`` in order, without ``len``."""

    def __init__(self, dataset: TensorDataset) -> None:
        super().__init__()
        self.dataset = dataset

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for index in range(len(self.dataset)):
            yield self.dataset[index]


def make_loader(dataset: Any, batch_size: int = 32, shuffle: bool | None = None) -> DataLoader:
    """Return a single-process ``DataLoader``; map-style data is shuffled unless ``shuffle`` is given."""
    if shuffle is None:
        shuffle = not isinstance(dataset, IterableDataset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0)


# ---------------------------------------------------------------------- modules


class TinyClassifier(L.LightningModule):
    """A one-hidden-layer tanh MLP classifier with switchable optimizer configurations.

    Args:
        features: Input features.
        classes: Output classes.
        hidden: Hidden units.
        lr: Learning rate of the first optimizer.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` for the first optimizer.
        weight_decay: Weight decay of the first optimizer.
        scheduler: ``None``, ``"step"`` (``StepLR`` every epoch) or ``"step_interval"``
            (``StepLR`` stepped every optimizer step).
        two_optimizers: Return two optimizers (one per layer) from ``configure_optimizers``.
        manual: Use manual optimization.
        dict_output: Return ``{"loss": loss}`` from ``training_step`` instead of the tensor.
        nan_epochs: Epochs in which the loss value is NaN. The NaN is added as a constant, so
            the gradient stays finite and the parameters stay usable.
        logged_loss_scale: ``train_loss`` is logged as this factor times the returned loss, so
            a test can tell the logged metric from the returned loss.
        dataset: Training data; ``None`` uses :func:`blobs_dataset` with matching sizes and 20%
            label noise, so the training loss stays well above 0.
        batch_size: Training batch size.
        iterable: Wrap the training data in :class:`StreamDataset`.

    Attributes:
        training_steps: Calls of ``training_step``, including those of CG-phase evaluations.
        step_losses: The loss of every ``training_step`` call, in call order.
    """

    def __init__(
        self,
        features: int = 8,
        classes: int = 3,
        hidden: int = 16,
        lr: float = 0.01,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        two_optimizers: bool = False,
        manual: bool = False,
        dict_output: bool = False,
        nan_epochs: Sequence[int] = (),
        logged_loss_scale: float = 1.0,
        dataset: Any = None,
        batch_size: int = 32,
        iterable: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_layer = nn.Linear(features, hidden)
        self.output_layer = nn.Linear(hidden, classes)
        self.lr = lr
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.scheduler = scheduler
        self.two_optimizers = two_optimizers
        self.automatic_optimization = not manual
        self.dict_output = dict_output
        self.nan_epochs = set(nan_epochs)
        self.logged_loss_scale = logged_loss_scale
        self.dataset = dataset if dataset is not None else blobs_dataset(features=features, classes=classes, label_noise=0.2)
        self.batch_size = batch_size
        self.iterable = iterable
        self.training_steps = 0
        self.step_losses: list[float] = []

    def forward(self, inputs: Tensor) -> Tensor:
        return self.output_layer(torch.tanh(self.hidden_layer(inputs)))

    def loss(self, batch: Any) -> Tensor:
        inputs, labels = batch
        loss = F.cross_entropy(self(inputs), labels)
        if self.training and self.current_epoch in self.nan_epochs:
            loss = loss + torch.tensor(float("nan"))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.training_steps += 1
        loss = self.loss(batch)
        self.step_losses.append(float(loss.detach()))
        self.log("train_loss", self.logged_loss_scale * loss)
        if not self.automatic_optimization:
            return self._manual_step(loss)
        if self.dict_output:
            return {"loss": loss}
        return loss

    def _manual_step(self, loss: Tensor) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss

    def _make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    def configure_optimizers(self) -> Any:
        if self.two_optimizers:
            return [
                self._make_optimizer(self.hidden_layer.parameters()),
                self._make_optimizer(self.output_layer.parameters()),
            ]
        optimizer = self._make_optimizer(self.parameters())
        if self.scheduler is None:
            return optimizer
        interval = "step" if self.scheduler == "step_interval" else "epoch"
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def train_dataloader(self) -> DataLoader:
        data = StreamDataset(self.dataset) if self.iterable else self.dataset
        return make_loader(data, batch_size=self.batch_size)


class TinyCNN(TinyClassifier):
    """:class:`TinyClassifier` with a small convolutional body, for 1x8x8 digit images."""

    def __init__(self, channels: int = 4, classes: int = 10, **kwargs: Any) -> None:
        kwargs.setdefault("dataset", digits_dataset(image=True))
        super().__init__(features=channels * 16, classes=classes, **kwargs)
        self.conv = nn.Conv2d(1, channels, 3, padding=1)

    def forward(self, inputs: Tensor) -> Tensor:
        features = F.avg_pool2d(torch.tanh(self.conv(inputs)), 2).flatten(1)
        return super().forward(features)


# ---------------------------------------------------------------------- trainer and checks


class OptimizerRecorder(Callback):
    """Records ``(global_step, optimizer class name)`` for every optimizer step Lightning runs.

    ``on_before_optimizer_step`` receives the optimizer that Lightning is stepping, so this
    shows which optimizer really ran, independent of ``trainer.optimizers``.
    """

    def __init__(self) -> None:
        self.steps: list[tuple[int, str]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.steps.append((trainer.global_step, type(optimizer).__name__))


class FullLossRecorder(Callback):
    """Records the module's mean loss over its whole training set at the end of every epoch.

    Works with modules that have a ``dataset`` attribute and a ``loss(batch)`` method, as
    :class:`TinyClassifier` does. Place it after ``ConvexitySwitch`` in the callback list to
    see the parameters after that epoch's swap decision.

    Attributes:
        losses: ``(epoch, global_step, loss)`` per epoch.
    """

    def __init__(self) -> None:
        self.losses: list[tuple[int, int, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        inputs, labels = pl_module.dataset.tensors
        parameter = next(pl_module.parameters())
        batch = (inputs.to(parameter.device, parameter.dtype), labels.to(parameter.device))
        with torch.no_grad():
            pl_module.eval()
            loss = pl_module.loss(batch)
            pl_module.train()
        self.losses.append((trainer.current_epoch, trainer.global_step, float(loss)))


class MemoryLogger(Logger):
    """A Lightning logger that keeps every ``log_metrics`` call in memory.

    Attributes:
        records: ``(step, metrics)`` in call order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def values(self, key: str) -> list[tuple[int | None, float]]:
        """Return ``(step, value)`` of every record that contains ``key``."""
        return [(step, float(metrics[key])) for step, metrics in self.records if key in metrics]


def limit_cpu_threads() -> None:
    """Run torch on one CPU thread.

    On a small shared machine, torch's default intra-op thread pool makes these tiny models
    tens of times slower once other processes compete for the cores.
    """
    torch.set_num_threads(1)


def make_trainer(root: Path | str | None = None, **kwargs: Any) -> L.Trainer:
    """Return a CPU ``Trainer`` without progress bar, model summary or checkpointing.

    ``logger`` defaults to ``False``; keyword arguments override every default.
    """
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 10,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
    }
    if root is not None:
        defaults["default_root_dir"] = str(root)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def parameter_snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Return detached copies of all parameters, keyed by name."""
    return {name: param.detach().clone() for name, param in module.named_parameters()}


def assert_parameters_unchanged(module: nn.Module, snapshot: dict[str, Tensor]) -> None:
    """Assert that every parameter of ``module`` equals its copy in ``snapshot`` bit for bit."""
    for name, param in module.named_parameters():
        assert torch.equal(param.detach(), snapshot[name]), f"parameter {name} changed"


def fit_logged_two_phase_run(save_dir: Path | str, name: str = "tiny", max_epochs: int = 3, **trainer_kwargs: Any):
    """Fit :class:`TinyClassifier` with ``ConvexitySwitch`` and a ``TensorBoardLogger``; return the callback.

    The blobs data makes the gradient norm peak in epoch 0 and fall below 0.9 times the peak in
    epoch 1, so the run swaps to CG at epoch 1 and trains ``max_epochs - 2`` CG epochs. The
    default 3 epochs took about 5 s on one CPU core.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_twophase import ConvexitySwitch

    L.seed_everything(0, verbose=False)
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, min_epochs=1, cg_kwargs={"max_iter": 2})
    logger = TensorBoardLogger(str(save_dir), name=name)
    trainer = make_trainer(max_epochs=max_epochs, callbacks=[switch], logger=logger, **trainer_kwargs)
    trainer.fit(TinyClassifier())
    return switch


def history_without_samples(switch: Any) -> list[dict[str, Any]]:
    """Return a ConvexitySwitch's check history as dicts without the ``samples`` counts.

    A run resumed in the CG phase evaluates the CG batch once more than the uninterrupted
    run (the objective's cache of its last evaluation is not checkpointed). That repeat is
    not counted when the cache was current at the checkpoint; otherwise the sample counts differ.
    """
    return [{key: value for key, value in vars(point).items() if key != "samples"} for point in switch.history]
