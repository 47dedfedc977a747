"""Libra R-CNN: a readable PyTorch reference implementation with C++/CUDA ops."""

__version__ = "0.1.0"
