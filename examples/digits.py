"""Two-phase training of a small CNN on scikit-learn's bundled handwritten digits.

Runs on CPU in well under a minute on an idle machine. It swaps Adam for conjugate gradient
once the gradient norm falls with the loss as near a minimum (the default log-slope detector),
and logs the run to TensorBoard:

    python examples/digits.py
    tensorboard --logdir logs/digits

No download is needed: the 1,797 8x8 images ship with scikit-learn.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from lightning_twophase import ConvexitySwitch


class DigitsData(L.LightningDataModule):
    """The digits images scaled to [0, 1], split 80/20 into training and validation sets."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str) -> None:
        images, labels = load_digits(return_X_y=True)
        inputs = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        dataset = TensorDataset(inputs, torch.tensor(labels))
        generator = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set = random_split(dataset, [0.8, 0.2], generator=generator)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsCNN(L.LightningModule):
    """Two 3x3 convolutions and a dense layer; 9.9k parameters."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        loss = F.cross_entropy(self(inputs), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        logits = self(inputs)
        self.log("val_loss", F.cross_entropy(logits, labels))
        self.log("val_acc", (logits.argmax(dim=1) == labels).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=15, help="epochs in total, both phases (default 15)")
    parser.add_argument("--logdir", default="logs", help="TensorBoard root directory (default logs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the initial weights")
    args = parser.parse_args()

    L.seed_everything(args.seed, verbose=False)
    switch = ConvexitySwitch(min_epochs=3)
    logger = TensorBoardLogger(args.logdir, name="digits")
    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[switch],
        logger=logger,
        log_every_n_steps=5,
        enable_checkpointing=False,
        deterministic=True,
    )
    trainer.fit(DigitsCNN(), datamodule=DigitsData(seed=args.seed))

    final_loss = switch.history[-1].loss if switch.history else float("nan")
    print()
    if switch.swaps:
        # Swaps and swaps back alternate: swap, back, retry, back, ...
        for index, swap in enumerate(switch.swaps):
            print(
                f"Swapped Adam for conjugate gradient after epoch {swap['epoch']} (counted from 0),"
                f" step {swap['step']}."
            )
            if index < len(switch.switch_backs):
                back = switch.switch_backs[index]
                print(f"Swapped back to Adam at epoch {back['epoch']}, step {back['step']}: {back['reason']}")
    else:
        print("No swap happened: the gradient norm never fell below the threshold. Try more epochs.")
    print(f"Final training loss on the CG batch: {final_loss:.3e}")
    print(f"Sample gradients spent: {switch.sample_gradients}")
    print(f"TensorBoard logs: {logger.log_dir}")
    print(f"  tensorboard --logdir {args.logdir}")
    print("  Custom Scalars tab: 'Two-phase'; Images tab: twophase/grad_norm_vs_loss; Text tab: twophase/switch")


if __name__ == "__main__":
    main()
