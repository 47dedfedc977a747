"""Libra R-CNN: a readable PyTorch reference implementation with C++/CUDA ops."""

# torch first: the compiled extension libra._C links against torch's shared libraries
# (libc10.so ...), which are found only once torch has been imported.
import torch  # noqa: F401

__version__ = "0.1.0"


def load_detector(checkpoint, **kwargs):
    """A libra or MMDetection checkpoint as a ready detector: ``libra.load_detector(path).predict(images)``
    (:func:`libra.engine.loading.load_detector`; imported on first use so that ``import libra`` stays light)."""
    from libra.engine.loading import load_detector as load

    return load(checkpoint, **kwargs)
