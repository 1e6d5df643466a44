"""Closure-based optimizers for the second, convex phase of training."""

from lightning_twophase.optim.cg import ConjugateGradient

__all__ = ["ConjugateGradient"]
