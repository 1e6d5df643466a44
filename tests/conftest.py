"""Session-wide test settings."""

import torch


def pytest_configure(config):
    # The test models are tiny: one intra-op thread is faster than a pool that competes with the
    # DDP worker processes and other jobs for the cores of a small CI machine.
    torch.set_num_threads(1)
