"""LightningCLI over the digits example: the model, data, optimizer and ``ConvexitySwitch`` from YAML.

    python examples/cli.py fit --config examples/config.yaml
    python examples/cli.py fit --config examples/config.yaml --trainer.max_epochs=10
    python examples/cli.py fit --print_config      # every option with its default

The model and data module are the ones of ``examples/digits.py``. The ``optimizer`` section of
the configuration replaces ``DigitsCNN.configure_optimizers``; LightningCLI warns about that
once, at startup.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import ArgsType, LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsCNN, DigitsData  # noqa: E402


def main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """Build the CLI; with ``run=False`` it only parses the configuration and instantiates the objects."""
    return LightningCLI(DigitsCNN, DigitsData, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
