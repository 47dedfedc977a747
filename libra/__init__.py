"""Libra R-CNN: a readable PyTorch reference implementation with C++/CUDA ops."""

# torch first: the compiled extension libra._C links against torch's shared libraries
# (libc10.so ...), which are found only once torch has been imported.
import torch  # noqa: F401

__version__ = "0.1.0"
