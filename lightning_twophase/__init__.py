"""Convexity-aware two-phase training for PyTorch Lightning.

Train with Adam while the loss landscape is non-convex, detect the point where it turns
convex from how the gradient norm depends on the loss, then continue with nonlinear
conjugate gradient on a fixed large batch.
"""

from lightning_twophase.batch_policy import DynamicBatchPolicy
from lightning_twophase.callback import ConvexitySwitch, Phase
from lightning_twophase.detection import FixedEpochDetector, IntervalStatistics, PeakRatioDetector, SwapDetector
from lightning_twophase.detectors import CostAwareDetector, CurvatureDetector, LogSlopeDetector
from lightning_twophase.optim.cg import ConjugateGradient

__all__ = [
    "ConjugateGradient",
    "ConvexitySwitch",
    "CostAwareDetector",
    "CurvatureDetector",
    "DynamicBatchPolicy",
    "FixedEpochDetector",
    "IntervalStatistics",
    "LogSlopeDetector",
    "PeakRatioDetector",
    "Phase",
    "SwapDetector",
]
__version__ = "0.1.0"
