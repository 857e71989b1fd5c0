"""Structured segmentation heads and RANP pruning at initialization for PyTorch Lightning."""

__version__ = "0.1.0"
