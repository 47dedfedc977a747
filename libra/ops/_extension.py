"""Loads the compiled extension ``libra._C`` once and says whether it is there.

Importing ``libra._C`` runs the ``TORCH_LIBRARY(libra, ...)`` registrations, after
which the kernels are reachable as ``torch.ops.libra.*``. When the import fails
(the package was not built), the wrappers in ``libra.ops`` fall back to the
pure-PyTorch references and emit ONE warning explaining how to build.
"""
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which libra._C links against)

EXTENSION_ERROR: str | None = None
try:
    from libra import _C  # noqa: F401  (import registers the ops)

    EXTENSION_AVAILABLE = True
except ImportError as error:  # not built, or built against another torch
    EXTENSION_AVAILABLE = False
    EXTENSION_ERROR = str(error)

_warned = False


def use_extension(stacklevel: int = 4) -> bool:
    """True when ``torch.ops.libra`` kernels can be used; warns once when they cannot.

    ``stacklevel`` points the warning at the user's call (wrapper depth + 1).
    """
    global _warned
    if not EXTENSION_AVAILABLE and not _warned:
        _warned = True
        warnings.warn(
            "libra._C is not built ({}); libra.ops uses the slower pure-PyTorch reference ops. "
            "Build it with `pip install --no-build-isolation -e .`.".format(EXTENSION_ERROR),
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    return EXTENSION_AVAILABLE
